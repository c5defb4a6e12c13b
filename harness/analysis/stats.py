"""Dense-versus-MoE differences over seeds, with the test that says whether to believe them.

    rows = seed_comparison(records)      # one row per (MoE model, budget), naming its seeds
    noise = seed_components(records)     # seed effect sd, residual sd, their dof and the ICC
    test = paired_gain(dense - moe, alpha=0.05, delta_min=0.01)   # one-sided, with power

Runs with the same seed share the data order (``TokenShard.train_batch`` depends only on seed
and step), so seed effects are shared by every model (ICC
about 0.66 on the `cpu` study). Every comparison is therefore within seed: an MoE run and its
dense peer of the same seed form a pair, a mean over seeds uses only the seeds both share, and
the tests are paired over seeds (``scipy.stats.ttest_rel``; the exact Wilcoxon signed-rank test
as a check). Effects between routing variants are of the order of 0.005 nats: one seed supports
no claim, and the rows say so."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from harness.analysis.fits import Noise
from harness.study.spec import PrimaryContrast

ALPHA = 0.05
DEFAULT_ALPHA = 0.05  # R1 without a registered contrast: the level of the one-sided test
DEFAULT_DELTA_MIN = 0.01  # ... and the smallest gain of interest, nats


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def arm_label(rec: dict[str, Any]) -> str:
    """How the report names a run's architecture: 'dense', or the MoE's E and k followed by each
    choice that changes its parameter count beyond them (``models.config.MoEConfig``): shared
    experts ('+1 shared', 'gated' with a shared-expert gate), an expert width other than the
    compute-matched d_ff / (k + shared) of ``models.matching`` ('d_expert d_ff/8', or 'd_expert 64'
    where the config has no d_ff), a noisy router (its noise projection doubles the router), and
    MoE layers in only some blocks ('MoE in every 2nd block', 'first 1 block dense'). Every part is
    the same at every width of one design, so a label names one arm across model sizes."""
    if rec["arm"] == "dense":
        return "dense"
    cfg = rec.get("config") or {}
    moe = cfg.get("moe") or {}
    k, shared = rec["top_k"], moe.get("shared_experts") or 0
    label = f"MoE E{rec['experts']} k{k}"
    if shared:
        label += f" +{shared} shared" + (" (gated)" if moe.get("shared_gate") else "")
    parts = []
    width, d_ff = moe.get("d_expert"), cfg.get("d_ff")
    if width and not d_ff:
        parts.append(f"d_expert {width}")
    elif width and width * (k + shared) != d_ff:
        parts.append(f"d_expert d_ff/{d_ff / width:.3g}")
    if moe.get("routing") == "noisy-topk":
        parts.append("noisy router")
    if (moe.get("every") or 1) > 1:
        parts.append(f"MoE in every {_ordinal(moe['every'])} block")
    if first := moe.get("first_dense"):
        parts.append(f"first {first} block{'s' * (first > 1)} dense")
    return ", ".join([label, *parts])


def dense_peer(moe: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The dense run of the same budget and seed with the closest active parameter count."""
    peers = [
        d
        for d in records
        if d["arm"] == "dense" and d["budget_flops"] == moe["budget_flops"] and d["seed"] == moe["seed"]
    ]
    if not peers:
        return None
    return min(peers, key=lambda p: abs(p["params"]["active_non_embedding"] - moe["params"]["active_non_embedding"]))


def peer_pairs(records: list[dict[str, Any]]) -> dict[tuple[str, float], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """(MoE model, budget) -> its (MoE run, dense peer) pairs, one per seed that has a peer."""
    pairs: dict[tuple[str, float], list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for m in records:
        if m["arm"] != "moe":
            continue
        d = dense_peer(m, records)
        if d is not None:
            pairs[(m["model"], m["budget_flops"])].append((m, d))
    return dict(sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def measured_pairs(
    records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(MoE run, dense peer, MoE measure.json, dense measure.json) for every pair measured on one
    device."""
    out = []
    for pairs in peer_pairs(records).values():
        for m, d in pairs:
            mm, dm = measures.get(m["run_id"]), measures.get(d["run_id"])
            if mm is not None and dm is not None and mm["device_name"] == dm["device_name"]:
                out.append((m, d, mm, dm))
    return out


def state_bytes(measure: dict[str, Any]) -> int:
    """Parameter plus optimizer-state bytes of a measure.json: the memory that follows total parameters."""
    return measure["memory"]["param_bytes"] + measure["memory"]["optimizer_state_bytes"]


def training_memory(measure: dict[str, Any]) -> int | None:
    """The measured training peak of a measure.json (CUDA peak allocated, or the RSS training adds
    on a CPU); None for a measure.json written before it was measured."""
    return measure["memory"].get("peak_training_bytes")


def task_metric(ev: dict[str, Any] | None, task: str, metric: str) -> float | None:
    """One metric of one task from an eval.json, or None where it is absent."""
    value = (ev or {}).get("tasks", {}).get(task, {}).get(metric)
    return value if isinstance(value, (int, float)) else None


def finite_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with a finite final validation loss."""
    return [r for r in records if r.get("final_val_loss") is not None and math.isfinite(r["final_val_loss"])]


def seed_noise(records: list[dict[str, Any]], metric: str = "final_val_loss") -> Noise:
    """The seed-to-seed standard deviation of one run's ``metric``, pooled over every (model, budget)
    that has two or more seeds: sqrt(sum of squared deviations / sum of (seeds - 1)). Its degrees of
    freedom are that sum (0 with one seed per run: no estimate)."""
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in records:
        value = r.get(metric)
        if value is not None and np.isfinite(value):
            groups[(r["model"], r["budget_flops"])].append(float(value))
    replicated = [np.asarray(v) for v in groups.values() if len(v) > 1]
    dof = sum(len(v) - 1 for v in replicated)
    if not dof:
        return Noise(sd=float("nan"), dof=0, source="no replicate seeds")
    ss = sum(float(((v - v.mean()) ** 2).sum()) for v in replicated)
    return Noise(sd=math.sqrt(ss / dof), dof=dof, source=f"{len(replicated)} replicated runs, {dof} degrees of freedom")


def paired_difference(moe: np.ndarray, dense: np.ndarray, confidence: float = 1 - ALPHA) -> dict[str, Any]:
    """Mean of the paired differences moe - dense with its t interval and two-sided p-value
    (``scipy.stats.ttest_rel``); interval and p are None with fewer than two pairs or when every
    pair differs by the same amount (no spread to test against)."""
    diff = np.asarray(moe, dtype=float) - np.asarray(dense, dtype=float)
    out: dict[str, Any] = {"n": len(diff), "mean": float(diff.mean()), "ci": None, "p_value": None}
    if len(diff) < 2 or np.allclose(diff, diff[0]):
        return out
    test = stats.ttest_rel(moe, dense)
    ci = test.confidence_interval(confidence)
    return out | {"ci": (float(ci.low), float(ci.high)), "p_value": float(test.pvalue)}


def seed_comparison(records: list[dict[str, Any]], metric: str = "final_val_loss") -> list[dict[str, Any]]:
    """Per (MoE model, budget): MoE and dense mean ± std over the seeds both have (``seed_ids``;
    a seed where either run's ``metric`` is not finite is left out and named in
    ``excluded_seeds``), the mean paired difference (MoE - dense, within seed) and, with two or
    more seeds, its 95% t interval, the two-sided paired t-test's p-value and a description."""
    rows = []
    for (model, budget), group in peer_pairs(records).items():
        kept = [(m, d) for m, d in group if _finite(m.get(metric)) and _finite(d.get(metric))]
        excluded = sorted(m["seed"] for m, d in group if (m, d) not in kept)
        if not kept:
            continue
        moe = np.array([m[metric] for m, _ in kept], dtype=float)
        dense = np.array([d[metric] for _, d in kept], dtype=float)
        diff = moe - dense
        n = len(kept)
        first = kept[0][0]
        row: dict[str, Any] = {
            "model": model,
            "arm": arm_label(first),
            "experts": first["experts"],
            "top_k": first["top_k"],
            "sparse": first["experts"] > first["top_k"],
            "dense_model": kept[0][1]["model"],
            "budget_flops": budget,
            "seeds": n,
            "seed_ids": sorted(m["seed"] for m, _ in kept),
            "excluded_seeds": excluded,
            "moe_mean": float(moe.mean()),
            "moe_std": float(moe.std(ddof=1)) if n > 1 else None,
            "dense_mean": float(dense.mean()),
            "dense_std": float(dense.std(ddof=1)) if n > 1 else None,
            "difference_mean": float(diff.mean()),
            "difference_std": float(diff.std(ddof=1)) if n > 1 else None,
            "difference_ci": None,
            "p_value": None,
            "verdict": "one seed: no claim of significance",
        }
        test = paired_difference(moe, dense)
        if n > 1 and test["p_value"] is None:
            row["verdict"] = "identical differences across seeds: no test"
        elif test["p_value"] is not None:
            p = row["p_value"] = test["p_value"]
            row["difference_ci"] = test["ci"]
            better = "MoE lower" if diff.mean() < 0 else "MoE higher"
            row["verdict"] = (
                f"{better}, significant (paired t-test, p < {ALPHA})"
                if p < ALPHA
                else f"not significant (paired t-test, p = {p:.2g})"
            )
        rows.append(row)
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Seed effects shared by every model (the same seed is the same data order)


@dataclass(frozen=True)
class SeedComponents:
    """Variance components of a study's losses: loss = mean of its (model, budget) + seed effect
    + residual, the seed effect shared by every model trained on that seed."""

    seed_sd: float
    residual_sd: float
    seed_dof: int
    residual_dof: int
    icc: float
    """seed variance / (seed + residual variance): the correlation of two models' losses at one seed."""
    runs: int
    groups: int
    seeds: list[int]

    def text(self) -> str:
        if not self.residual_dof or not self.seed_dof:
            return f"no estimate of the seed effect: {self.runs} runs share no seed across models"
        return (
            f"seed effect sd {self.seed_sd:.4f} nats ({self.seed_dof} degrees of freedom), residual sd "
            f"{self.residual_sd:.4f} ({self.residual_dof}), intraclass correlation {self.icc:.2f}, from "
            f"{self.runs} runs of {self.groups} (model, budget) groups over seeds {_seed_list(self.seeds)}"
        )


def _seed_list(seeds) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


def _design(codes: np.ndarray) -> np.ndarray:
    """One-hot columns of integer codes."""
    return np.eye(codes.max() + 1)[codes]


def _residual_ss(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Residual sum of squares of the least-squares fit of y on x, and the rank of x."""
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(((y - x @ coef) ** 2).sum()), int(np.linalg.matrix_rank(x))


def seed_components(records: list[dict[str, Any]], metric: str = "final_val_loss") -> SeedComponents:
    """Seed and residual standard deviations by Henderson's method III (fitting constants), which
    is the two-way ANOVA estimator on a balanced design and unbiased on an unbalanced one
    (Searle, Casella & McCulloch 1992, ch. 5): the residual variance from the fit with group and
    seed effects; the seed variance from the reduction in the residual sum of squares that the
    seed effects bring over the groups alone, whose expectation is dof_s * residual variance +
    tr(Z'MZ) * seed variance (Z: the seed indicators, M: the residual projection of the group
    fit). Negative estimates are set to 0. Only runs with a finite ``metric`` whose seed at least
    two groups share enter."""
    finite = [r for r in records if _finite(r.get(metric))]
    groups_of: dict[int, set] = defaultdict(set)
    for r in finite:
        groups_of[r["seed"]].add((r["model"], r["budget_flops"]))
    runs = [r for r in finite if len(groups_of[r["seed"]]) > 1]
    keys = sorted({(r["model"], r["budget_flops"]) for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    empty = SeedComponents(float("nan"), float("nan"), 0, 0, float("nan"), len(runs), len(keys), seeds)
    if len(seeds) < 2 or len(runs) <= len(keys) + len(seeds) - 1:
        return empty
    y = np.array([r[metric] for r in runs], dtype=float)
    x_group = _design(np.array([keys.index((r["model"], r["budget_flops"])) for r in runs]))
    z = _design(np.array([seeds.index(r["seed"]) for r in runs]))
    ss_group, rank_group = _residual_ss(x_group, y)
    ss_full, rank_full = _residual_ss(np.hstack([x_group, z]), y)
    dof_e, dof_s = len(y) - rank_full, rank_full - rank_group
    if not dof_e or not dof_s:
        return empty
    var_e = ss_full / dof_e
    mz = z - x_group @ np.linalg.lstsq(x_group, z, rcond=None)[0]
    var_s = max((ss_group - ss_full - dof_s * var_e) / float((z * mz).sum()), 0.0)
    total = var_s + var_e
    icc = var_s / total if total > 0 else float("nan")
    return SeedComponents(math.sqrt(var_s), math.sqrt(var_e), dof_s, dof_e, icc, len(runs), len(keys), seeds)


# ---------------------------------------------------------------------------------------------
# A one-sided paired test of a registered contrast, with its futility bound and power


def one_sided_power(sd: float, n: int, alpha: float, effect: float) -> float:
    """Probability that the one-sided paired t-test at level ``alpha`` over ``n`` pairs rejects
    when the true mean difference is ``effect`` and the pairs' sd is ``sd``: the noncentral t
    (``scipy.stats.nct``) with n - 1 degrees of freedom and noncentrality effect / (sd / sqrt n)."""
    if n < 2 or not sd > 0:
        return float("nan")
    critical = stats.t.ppf(1 - alpha, n - 1)
    return float(stats.nct.sf(critical, n - 1, effect / (sd / math.sqrt(n))))


def paired_gain(gain: np.ndarray, alpha: float, delta_min: float) -> dict[str, Any] | None:
    """The tests of 'the gain is positive' over per-seed gains: the one-sided paired t (``p``), the
    one-sided (1 - alpha) lower and upper confidence bounds of the mean gain, the exact Wilcoxon
    signed-rank p (a check that does not assume normal differences) and the power of the t-test
    at a true gain of ``delta_min`` and the observed sd. None with fewer than two seeds or no
    spread."""
    gain = np.asarray(gain, dtype=float)
    n = len(gain)
    if n < 2 or np.allclose(gain, gain[0]):
        return None
    zero = np.zeros(n)
    greater = stats.ttest_rel(gain, zero, alternative="greater")
    less = stats.ttest_rel(gain, zero, alternative="less")
    try:
        wilcoxon = float(stats.wilcoxon(gain, alternative="greater", method="exact").pvalue)
    except ValueError:  # zero differences: no exact distribution
        wilcoxon = float(stats.wilcoxon(gain, alternative="greater", method="approx").pvalue)
    sd = float(gain.std(ddof=1))
    return {
        "n": n,
        "mean": float(gain.mean()),
        "sd": sd,
        "p": float(greater.pvalue),
        "lower": float(greater.confidence_interval(1 - alpha).low),
        "upper": float(less.confidence_interval(1 - alpha).high),
        "wilcoxon_p": wilcoxon,
        "power": one_sided_power(sd, n, alpha, delta_min),
    }


DEFAULT_RULE = (
    "the sparse MoE arm, E > k, at the largest budget with the most seeds, ties going to the largest E and then "
    "to the model name last in alphabetical order, against its dense peer"
)
"""How ``default_contrast`` chooses, in the words the report and the plan's warning use."""


def default_contrast(seed_rows: list[dict[str, Any]]) -> PrimaryContrast | None:
    """R1's contrast when the study registers none (``DEFAULT_RULE``): the sparse (E > k) MoE arm
    at the largest budget with the most seeds (ties: the largest E, then the model name) against
    its dense peer, alpha DEFAULT_ALPHA, smallest gain of interest DEFAULT_DELTA_MIN nats."""
    sparse = [r for r in seed_rows if r["sparse"]]
    if not sparse:
        return None
    top = max(r["budget_flops"] for r in sparse)
    best = max((r for r in sparse if r["budget_flops"] == top), key=lambda r: (r["seeds"], r["experts"], r["model"]))
    return PrimaryContrast(best["model"], best["dense_model"], top, DEFAULT_ALPHA, DEFAULT_DELTA_MIN)


def contrast_gains(records: list[dict[str, Any]], c: PrimaryContrast) -> dict[str, Any]:
    """Per seed both arms of ``c`` ran at its budget: gain = dense - MoE validation loss. Seeds
    where either loss is not finite are ``excluded``; seeds only one arm ran are ``unpaired``."""
    at = [r for r in records if math.isclose(r["budget_flops"], c.budget, rel_tol=1e-9)]
    moe = {r["seed"]: r["final_val_loss"] for r in at if r["model"] == c.moe}
    dense = {r["seed"]: r["final_val_loss"] for r in at if r["model"] == c.dense}
    shared = sorted(set(moe) & set(dense))
    excluded = [s for s in shared if not (_finite(moe[s]) and _finite(dense[s]))]
    kept = [s for s in shared if s not in excluded]
    return {
        "seeds": kept,
        "gain": np.array([dense[s] - moe[s] for s in kept], dtype=float),
        "excluded": excluded,
        "unpaired": sorted(set(moe) ^ set(dense)),
        "arms": (bool(moe), bool(dense)),
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): the i-th smallest times (m - i), made
    monotone, capped at 1. A family of tests controls its error rate at alpha when each adjusted
    p is compared with alpha."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[j]))
        adjusted[j] = running
    return adjusted.tolist()


_SCALE_FIELDS = ("experts", "top_k", "d_expert", "name")
_BALANCE_FIELDS = ("load_balance_coef", "seq_balance_coef", "importance_coef", "load_coef")


def routing_variant(rec: dict[str, Any]) -> tuple[str, str]:
    """(key, label) of the MoE settings other than E, k and expert width: runs compared along E
    share all of them (key); the label names the routing and the balancing in use."""
    moe = rec["config"].get("moe") or {}
    key = repr(sorted((k, repr(v)) for k, v in moe.items() if k not in _SCALE_FIELDS))
    balance = [f"{c} {moe[c]:g}" for c in _BALANCE_FIELDS if moe.get(c)]
    if moe.get("routing") == "sigmoid-bias":
        balance.append(f"bias rate {moe.get('bias_update_rate', 0):g}")
    label = f" ({moe.get('routing', 'softmax-topk')}, {', '.join(balance) or 'no balancing'})"
    return key, label


def main_variant_runs(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Dense runs and the MoE runs of the routing variant (``routing_variant``) that most MoE
    runs share (ties: the one with more distinct E): runs that one law or trend may describe
    together. Returns them and the models of other variants (ablations), which are left out."""
    moe = [r for r in records if r["arm"] == "moe"]
    if not moe:
        return list(records), []
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in moe:
        groups[routing_variant(r)[0]].append(r)
    main = max(sorted(groups), key=lambda k: (len(groups[k]), len({r["experts"] for r in groups[k]})))
    kept = [r for r in records if r["arm"] == "dense" or routing_variant(r)[0] == main]
    left_out = sorted({r["model"] for r in moe if routing_variant(r)[0] != main})
    return kept, left_out
