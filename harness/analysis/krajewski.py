"""The fine-grained MoE scaling law of Krajewski et al. 2024, as a cross-check inside its range.

    rows = krajewski_check(records)      # per run: prediction, or why the law does not apply

Krajewski et al. 2024 ("Scaling Laws for Fine-Grained Mixture of Experts") fit two laws:

    MoE:    L(N, D, G) = c + (g / G**gamma + a) / N**alpha + b / D**beta
    dense:  L(N, D)    = c + a / N**alpha + b / D**beta          (its own constants)

where N is the model's *total* non-embedding parameter count, D the training tokens and
G = d_ff / d_expert the granularity. The MoE law was fitted at one expansion rate, 64 (the
routed experts' parameters over a dense feed-forward layer's, E * d_expert / d_ff): G = 1 is a
64-expert MoE, not a dense model, which is why dense runs take the dense row. Both were fitted
to runs of 16B tokens or more (Krajewski et al. 2024). Outside that range the law is not evaluated: the
row's ``reason`` says which condition fails, and no gap is predicted. The absolute level belongs
to the paper's data and tokenizer, so only MoE - dense gaps compare with ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.analysis.stats import arm_label, dense_peer, finite_runs

EXPANSION_RATE = 64.0  # the expansion rate of the MoE law's fits
MIN_TOKENS = 16e9  # the shortest training runs of the fits


@dataclass(frozen=True)
class KrajewskiConstants:
    """The fitted constants of one row of Krajewski et al. 2024 (valid for their data and tokenizer only)."""

    a: float
    alpha: float
    b: float
    beta: float
    c: float
    g: float = 0.0  # granularity term: MoE row only
    gamma: float = 0.0


MOE = KrajewskiConstants(a=18.1, alpha=0.115, b=30.8, beta=0.147, c=0.47, g=2.1, gamma=0.58)
DENSE = KrajewskiConstants(a=16.3, alpha=0.126, b=26.7, beta=0.127, c=0.47)


def krajewski_loss(
    n_total_non_embedding: float | np.ndarray,
    tokens: float | np.ndarray,
    granularity: float | np.ndarray | None = None,
    k: KrajewskiConstants = MOE,
) -> float | np.ndarray:
    """L = c + (g / G**gamma + a) / N**alpha + b / D**beta; the dense row (``k=DENSE``) has no G term.

    N: total non-embedding parameters; D: training tokens; G: granularity (MoE row only)."""
    n = np.asarray(n_total_non_embedding, dtype=float)
    d = np.asarray(tokens, dtype=float)
    g_term = 0.0 if granularity is None else k.g / np.asarray(granularity, dtype=float) ** k.gamma
    out = k.c + (g_term + k.a) / n**k.alpha + k.b / d**k.beta
    return float(out) if np.ndim(out) == 0 else out


def granularity_of(rec: dict[str, Any]) -> float | None:
    """G = d_ff / d_expert of an MoE run's config; None for a dense run or where d_ff is not set."""
    moe = (rec.get("config") or {}).get("moe")
    d_ff = (rec.get("config") or {}).get("d_ff")
    if rec["arm"] == "dense" or not moe or not d_ff or not moe.get("d_expert"):
        return None
    return d_ff / moe["d_expert"]


def expansion_rate_of(rec: dict[str, Any]) -> float | None:
    """E * d_expert / d_ff: the routed experts' parameters over one dense feed-forward layer's."""
    g = granularity_of(rec)
    return None if g is None else rec["experts"] / g


def out_of_range(rec: dict[str, Any]) -> str:
    """Why the law does not apply to this run ('' when it does)."""
    reasons = []
    if rec["tokens"] < MIN_TOKENS:
        reasons.append(f"{rec['tokens']:.3g} tokens, the fits start at {MIN_TOKENS:.3g}")
    if rec["arm"] == "moe":
        rate = expansion_rate_of(rec)
        if rate is None:
            reasons.append("granularity unknown: the config has no d_ff")
        elif abs(rate - EXPANSION_RATE) > 1e-6 * EXPANSION_RATE:
            reasons.append(f"expansion rate {rate:.3g}, the MoE law was fitted at {EXPANSION_RATE:g} only")
    return "; ".join(reasons)


def predict(rec: dict[str, Any]) -> tuple[float | None, str]:
    """The law's loss for a run (MoE or dense row), or (None, why it does not apply)."""
    if reason := out_of_range(rec):
        return None, "outside the law's fitted range: " + reason
    n = rec["params"]["total_non_embedding"]
    if rec["arm"] == "dense":
        return krajewski_loss(n, rec["tokens"], k=DENSE), ""
    return krajewski_loss(n, rec["tokens"], granularity_of(rec), k=MOE), ""


def krajewski_check(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: the law's prediction next to the observed loss, and for an MoE run with a dense
    peer (same budget and seed, closest active count) the predicted and observed gap. Runs outside
    the fitted range get no prediction and a ``reason``."""
    runs = finite_runs(records)
    predicted = {r["run_id"]: predict(r) for r in runs}
    rows = []
    for r in runs:
        value, reason = predicted[r["run_id"]]
        row = {
            "run_id": r["run_id"],
            "model": r["model"],
            "arm": arm_label(r),
            "budget_flops": r["budget_flops"],
            "seed": r["seed"],
            "n_total_non_embedding": r["params"]["total_non_embedding"],
            "tokens": r["tokens"],
            "granularity": granularity_of(r),
            "expansion_rate": expansion_rate_of(r),
            "predicted": value,
            "observed": r["final_val_loss"],
            "dense_peer": None,
            "predicted_gap": None,
            "observed_gap": None,
            "reason": reason,
        }
        peer = dense_peer(r, runs) if r["arm"] == "moe" else None
        if peer is not None:
            row["dense_peer"] = peer["model"]
            row["observed_gap"] = r["final_val_loss"] - peer["final_val_loss"]
            peer_value, peer_reason = predicted[peer["run_id"]]
            if value is not None and peer_value is not None:
                row["predicted_gap"] = value - peer_value
            elif value is not None:
                row["reason"] = f"dense peer {peer['model']}: {peer_reason}"
        elif r["arm"] == "moe":
            row["reason"] = row["reason"] or "no dense run of the same budget and seed"
        rows.append(row)
    return rows
