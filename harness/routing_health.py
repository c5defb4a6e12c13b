"""Routing health of a trained MoE run, from the per-layer statistics in its metrics.jsonl.

    rows = routing_health(read_metrics(run_dir / "metrics.jsonl"), experts=8)

Each logged training step holds, per MoE layer, the tokens each expert received in that
batch, the dropped fraction, router entropy and the balance and z losses (``harness.train``).
Over the final tenth of training (the end state) this gives per layer: the load coefficient of
variation, the busiest expert's load over the mean, dead experts (no tokens in any logged step
of that window), dropped fraction, router entropy relative to log E, and z-loss. A layer has
**collapsed** when an expert is dead or the busiest expert takes at least half of all
assignments while E > 2: the failure balancing losses exist to prevent (Shazeer et al. 2017
sec. 4; Fedus et al. 2022 sec. 2.2).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

END_FRACTION = 0.1  # the end state: the last tenth of logged steps


@dataclass(frozen=True)
class LayerHealth:
    layer: int
    load_cv: float  # std / mean of tokens per expert, mean over the window's steps
    max_over_mean: float  # busiest expert's tokens over the mean, mean over the window
    dead_experts: int  # experts with no tokens in any step of the window
    dropped_fraction: float
    entropy_over_log_e: float  # router entropy / log E: 1 is uniform routing probabilities
    z_loss: float
    collapsed: bool
    reason: str  # why it counts as collapsed ('' when it does not)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def routing_series(metrics: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per logged step and layer: step, tokens per expert (S, L, E), load_cv, max/mean,
    dropped, entropy, z-loss (S, L)."""
    rows = [m for m in metrics if m.get("routing")]
    if not rows:
        return {}
    out = {"step": np.array([m["step"] for m in rows])}
    out["tokens_per_expert"] = np.array([[layer["tokens_per_expert"] for layer in m["routing"]] for m in rows])
    for key, name in [
        ("load_cv", "load_cv"),
        ("load_max_over_mean", "max_over_mean"),
        ("dropped_fraction", "dropped_fraction"),
        ("router_entropy", "router_entropy"),
        ("z_loss", "z_loss"),
    ]:
        out[name] = np.array([[layer[key] for layer in m["routing"]] for m in rows], dtype=float)
    return out


def routing_health(metrics: list[dict[str, Any]], experts: int) -> list[LayerHealth]:
    """One row per MoE layer for the final tenth of training; [] for a dense run."""
    s = routing_series(metrics)
    if not s:
        return []
    n = len(s["step"])
    window = slice(n - max(1, math.ceil(END_FRACTION * n)), n)
    rows = []
    for layer in range(s["tokens_per_expert"].shape[1]):
        tokens = s["tokens_per_expert"][window, layer]  # (steps, E)
        dead = int((tokens.sum(0) == 0).sum())
        share = tokens.sum(0).max() / max(tokens.sum(), 1)
        max_over_mean = float(s["max_over_mean"][window, layer].mean())
        reasons = []
        if dead:
            reasons.append(f"{dead} dead expert{'s' * (dead > 1)}")
        if experts > 2 and share >= 0.5:
            reasons.append(f"one expert takes {share:.0%} of assignments")
        rows.append(
            LayerHealth(
                layer=layer,
                load_cv=float(s["load_cv"][window, layer].mean()),
                max_over_mean=max_over_mean,
                dead_experts=dead,
                dropped_fraction=float(s["dropped_fraction"][window, layer].mean()),
                entropy_over_log_e=float(s["router_entropy"][window, layer].mean() / math.log(experts))
                if experts > 1
                else 1.0,
                z_loss=float(s["z_loss"][window, layer].mean()),
                collapsed=bool(reasons),
                reason="; ".join(reasons),
            )
        )
    return rows


def health_dicts(rows: list[LayerHealth]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
