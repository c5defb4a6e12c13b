"""Routing health of a trained MoE run, from the per-layer statistics in its metrics.jsonl.

    rows = routing_health(read_metrics(run_dir / "metrics.jsonl"), experts=8, top_k=2)

Each logged training step holds, per MoE layer, the tokens each expert received in that
batch, the dropped fraction, router entropy and the balance and z losses (``harness.train``).
Over the final tenth of training (the end state) this gives per layer: the load coefficient of
variation, the busiest expert's load over the mean, dead experts (no tokens in any logged step
of that window), dropped fraction, router entropy relative to log E, and z-loss. A layer has
**collapsed** when an expert is dead or the busiest expert carries a large multiple of its
balanced share of the tokens: max/mean load over the window at least 3, or, where E/k is small,
halfway from balanced (1) to every token on the same k experts (E/k), whichever is lower. This is
the failure balancing losses exist to prevent (Shazeer et al. 2017 sec. 4 and Table 6: max/mean
load 17.8 without a balancing loss against about 1.1 with one; Fedus et al. 2022 sec. 2.2);
balanced runs at small scale reach about 2 in single steps.

Collapse is judged on tokens, not on the T*k assignments: an expert can take at most one of a
token's k slots, so its share of assignments is at most 1/k and a rule such as "one expert takes
half of the assignments" can never fire for k >= 3 (SCIENCE.md, R3). Max/mean load is the same
in both views: an expert's token share over its balanced share k/E.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.io import read_jsonl

END_FRACTION = 0.1  # the end state: the last tenth of logged steps
COLLAPSE_MAX_OVER_MEAN = 3.0  # the busiest expert carries three times its balanced share of tokens


def collapse_threshold(experts: int, top_k: int) -> float:
    """Max/mean load at and above which a layer counts as collapsed: 3, or halfway to its maximum
    E/k where that is lower, so that it can be reached for any E > k."""
    return min(COLLAPSE_MAX_OVER_MEAN, (1 + experts / top_k) / 2)


@dataclass(frozen=True)
class LayerHealth:
    layer: int
    load_cv: float  # std / mean of tokens per expert, mean over the window's steps
    max_over_mean: float  # busiest expert's tokens over the mean, mean over the window's steps
    busiest_token_share: float  # fraction of the window's tokens the busiest expert received (balanced: k/E)
    window_max_over_mean: float  # busiest expert's tokens over the mean, window totals (the collapse test)
    dead_experts: int  # experts with no tokens in any step of the window
    dropped_fraction: float
    entropy_over_log_e: float  # router entropy / log E: 1 is uniform routing probabilities
    z_loss: float
    collapsed: bool
    reason: str  # why it counts as collapsed ('' when it does not)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, made_by="harness train")


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


def routing_health(metrics: list[dict[str, Any]], experts: int, top_k: int) -> list[LayerHealth]:
    """One row per MoE layer for the final tenth of training; [] for a dense run."""
    s = routing_series(metrics)
    if not s:
        return []
    n = len(s["step"])
    window = slice(n - max(1, math.ceil(END_FRACTION * n)), n)
    rows = []
    for layer in range(s["tokens_per_expert"].shape[1]):
        tokens = s["tokens_per_expert"][window, layer]  # (steps, E)
        per_expert = tokens.sum(0)  # (E,) assignments over the window
        dead = int((per_expert == 0).sum())
        total = max(int(per_expert.sum()), 1)
        token_share = float(per_expert.max() * top_k / total)  # each token holds k assignments
        window_max_over_mean = float(per_expert.max() * experts / total)
        threshold = collapse_threshold(experts, top_k)
        reasons = []
        if dead:
            reasons.append(f"{dead} dead expert{'s' * (dead > 1)}")
        if experts > top_k and window_max_over_mean >= threshold:
            reasons.append(
                f"one expert takes {token_share:.0%} of tokens (balanced {top_k / experts:.0%}; "
                f"max/mean load {window_max_over_mean:.2f} >= {threshold:.2f})"
            )
        rows.append(
            LayerHealth(
                layer=layer,
                load_cv=float(s["load_cv"][window, layer].mean()),
                max_over_mean=float(s["max_over_mean"][window, layer].mean()),
                busiest_token_share=token_share,
                window_max_over_mean=window_max_over_mean,
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
