"""The theta implied by Clark et al. 2022's routed scaling law at a study's N and E: a reference point.

    rows = clark_theta(records)     # per MoE model with E > k: N_eff / N and theta_Clark

Clark et al. 2022 ("Unified Scaling Laws for Routed Language Models") fit, at a fixed 130B
training tokens, log10 L = a log10 N + b log10 Ê + c log10 N log10 Ê + d with, for S-BASE,
a = -0.082, b = -0.108, c = 0.009, d = 1.104 (N: the dense base model's parameters; Ê: the expert
count, saturating at E_max ≈ 315). The effective parameter count N_eff is the dense N of equal
loss: log10 N_eff = log10 N + log10 Ê (b + c log10 N) / a. Its multiplier N_eff / N expressed as
(N_t / N_a)^theta gives theta_Clark = ln(N_eff / N) / ln(N_t / N_a), comparable with the fitted
theta of the joint law (``harness.analysis.law``). Caveats: their models had 15M to 1.3B base
parameters, top-1 routing and 130B tokens; here Ê = E (saturation changes Ê by under 5% for
E ≤ 16 against E_max ≈ 315, and the saturation curve's other constant is not used).
"""

from __future__ import annotations

import math
from typing import Any

from harness.analysis.stats import arm_label, finite_runs

S_BASE = {"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104}
E_MAX = 315.0


def clark_multiplier(n: float, experts: int, k: dict[str, float] = S_BASE) -> float:
    """N_eff / N of Clark et al. 2022's law at base size N and E experts (Ê = E)."""
    log_e = math.log10(experts)
    return 10 ** (log_e * (k["b"] + k["c"] * math.log10(n)) / k["a"])


def clark_theta(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per MoE model with total above active parameters: N_eff / N_a and theta_Clark."""
    rows, seen = [], set()
    for r in finite_runs(records):
        if r["arm"] != "moe" or r["model"] in seen:
            continue
        seen.add(r["model"])
        na, nt = r["params"]["active_non_embedding"], r["params"]["total_non_embedding"]
        row = {"model": r["model"], "arm": arm_label(r), "n_active": na, "n_total": nt, "experts": r["experts"]}
        if nt <= na * (1 + 1e-6) or r["experts"] <= 1:
            rows.append(row | {"multiplier": None, "theta": None, "reason": "E = k: no total beyond active"})
            continue
        mult = clark_multiplier(na, r["experts"])
        rows.append(row | {"multiplier": mult, "theta": math.log(mult) / math.log(nt / na), "reason": ""})
    return sorted(rows, key=lambda row: (row["experts"], row["model"]))
