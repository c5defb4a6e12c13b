"""Routing health of a trained MoE run, from the per-layer statistics in its metrics.jsonl.

    rows = routing_health(read_metrics(run_dir / "metrics.jsonl"), experts=8, top_k=2)

Each logged training step holds, per MoE layer, the tokens each expert received in that
batch, the dropped fraction, router entropy and the balance and z losses (``harness.train.loop``).
Over the final tenth of training (the end state) this gives per layer: the load coefficient of
variation, the busiest expert's load over the mean, dead experts (no tokens in any logged step
of that window), dropped fraction, router entropy relative to log E, and z-loss.

**Collapse** has one rule at every E and k, normalised by what is attainable there. Max/mean load
is 1 when balanced and at most E/k (every token on the same k experts), so

    normalised imbalance = (max/mean load - 1) / (E/k - 1)   in [0, 1]

over the window's token totals, and a layer has collapsed at COLLAPSE_IMBALANCE = 0.5 or more:
the busiest expert is at least halfway from its balanced share to taking every token. A fixed
cap on max/mean (3, say) would be halfway at E/k = 5 but 29% of the way at E/k = 8. Layers with
E <= k are never judged: every expert gets every token. Shazeer et al. 2017 (Table 6) saw
max/mean load 17.8 without a balancing loss against about 1.1 with one; Fedus et al. 2022
(sec. 2.2) and Wang et al. 2024 (aux-loss-free bias) balance for the same reason. Dead experts
are counted and shown; they decide nothing on their own (one idle expert of 16 leaves the rest
balanced).

Collapse is judged on tokens, not on the T*k assignments: an expert can take at most one of a
token's k slots, so its share of assignments is at most 1/k and a rule such as "one expert takes
half of the assignments" can never fire for k >= 3 (R3). Max/mean load is the same
in both views: an expert's token share over its balanced share k/E.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

END_FRACTION = 0.1  # the end state: the last tenth of logged steps
COLLAPSE_IMBALANCE = 0.5  # halfway from balanced (max/mean 1) to every token on k experts (E/k)


def normalised_imbalance(max_over_mean: float | np.ndarray, experts: int, top_k: int) -> float | np.ndarray | None:
    """(max/mean load - 1) / (E/k - 1): 0 balanced, 1 every token on the same k experts; None for
    E <= k, where every expert gets every token."""
    if experts <= top_k:
        return None
    return (max_over_mean - 1) / (experts / top_k - 1)


def run_imbalance(layers: list[dict[str, Any]]) -> float | None:
    """The largest normalised imbalance over a run's layers (``health_dicts``); None when no layer
    is judged."""
    values = [layer["imbalance"] for layer in layers if layer.get("imbalance") is not None]
    return max(values) if values else None


@dataclass(frozen=True)
class LayerHealth:
    layer: int
    load_cv: float  # std / mean of tokens per expert, mean over the window's steps
    max_over_mean: float  # busiest expert's tokens over the mean, mean over the window's steps
    busiest_token_share: float  # fraction of the window's tokens the busiest expert received (balanced: k/E)
    window_max_over_mean: float  # busiest expert's tokens over the mean, window totals
    imbalance: float | None  # (window_max_over_mean - 1) / (E/k - 1), the collapse test; None for E <= k
    dead_experts: int  # experts with no tokens in any step of the window
    dropped_fraction: float
    entropy_over_log_e: float  # router entropy / log E: 1 is uniform routing probabilities
    z_loss: float
    collapsed: bool  # imbalance >= COLLAPSE_IMBALANCE
    reason: str  # why it counts as collapsed ('' when it does not)


def read_metrics(path: Path, study: str = "STUDY") -> list[dict[str, Any]]:
    """A run's metrics.jsonl, each row checked; a damaged line is named with what to do
    (``study``: as the user names it; harness.study.records)."""
    from harness.study.records import read_metrics as checked

    return checked(path, study)


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
        imbalance = normalised_imbalance(window_max_over_mean, experts, top_k)
        collapsed = imbalance is not None and imbalance >= COLLAPSE_IMBALANCE
        reason = (
            f"one expert takes {token_share:.0%} of tokens (balanced {top_k / experts:.0%}; "
            f"normalised imbalance {imbalance:.2f} >= {COLLAPSE_IMBALANCE})"
            if collapsed
            else ""
        )
        rows.append(
            LayerHealth(
                layer=layer,
                load_cv=float(s["load_cv"][window, layer].mean()),
                max_over_mean=float(s["max_over_mean"][window, layer].mean()),
                busiest_token_share=token_share,
                window_max_over_mean=window_max_over_mean,
                imbalance=None if imbalance is None else float(imbalance),
                dead_experts=dead,
                dropped_fraction=float(s["dropped_fraction"][window, layer].mean()),
                entropy_over_log_e=float(s["router_entropy"][window, layer].mean() / math.log(experts))
                if experts > 1
                else 1.0,
                z_loss=float(s["z_loss"][window, layer].mean()),
                collapsed=collapsed,
                reason=reason,
            )
        )
    return rows


def health_dicts(rows: list[LayerHealth]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
