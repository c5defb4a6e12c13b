"""Records and measurements built to have known answers, shaped like the tiny and cpu studies':
the report, figure and plausibility tests share them."""

from __future__ import annotations

import re

import numpy as np

from harness.study.spec import budget_label

SIZES = {"dense-d48": 1.43e5, "dense-d64": 2.46e5, "dense-d96": 5.5e5}


MOES = {  # model: (E, k, active non-embedding, total non-embedding, moe settings beyond E and k)
    "moe-d64-e2k2": (2, 2, 2.47e5, 2.47e5, {}),
    "moe-d64-e4k2": (4, 2, 2.475e5, 4.44e5, {}),
    "moe-d64-e8k2": (8, 2, 2.48e5, 8.38e5, {}),
    "moe-d64-e8k2-auxfree": (8, 2, 2.48e5, 8.38e5, {"routing": "sigmoid-bias"}),
    "moe-d64-e8k2-nobalance": (8, 2, 2.48e5, 8.38e5, {"load_balance_coef": 0.0}),
    "moe-d64-e16k2": (16, 2, 2.49e5, 1.63e6, {}),
}


def _rec(model, arm, budget, active, total, loss, seed=0, experts=None, top_k=None, moe=None, **kw):
    return {
        "run_id": f"{model}_{budget_label(budget)}_s{seed}",
        "model": model,
        "arm": arm,
        "experts": experts,
        "top_k": top_k,
        "seed": seed,
        "budget_flops": budget,
        "flops_spent": budget * (1 + 1e-5 * seed),
        "train_seconds": budget / 7e10 * (1.3 if arm == "moe" else 1.0),
        "final_val_loss": loss,
        "tokens": int(budget / (6 * active)),
        "params": {
            "active": active + 1.3e5,
            "active_non_embedding": active,
            "total": total + 1.3e5,
            "total_non_embedding": total,
        },
        "config": {
            "d_model": int(found[1]) if (found := re.search(r"-d(\d+)", model)) else 64,
            "moe": None if arm == "dense" else {"experts": experts, "top_k": top_k, **(moe or {})},
        },
        "flops_per_token": {"detailed": 6.0 * active},
        "flop_convention": "detailed",
        "provenance": {"host": {"device": "cpu"}},
    } | kw


def written(rec: dict, study: str, **fields) -> dict:
    """``rec`` as record.json holds it on disk: with ``study`` and the fields the synthetic records
    leave out that harness.study.records checks before anyone reads one (``fields`` override)."""
    provenance = {"git": {"commit": None, "dirty": False}, "packages": {}} | rec.get("provenance", {})
    return (
        {
            "study": study,
            "steps": 100,
            "final_train_loss": rec["final_val_loss"] + 0.1,
            "tokens_per_s": rec["tokens"] / rec["train_seconds"],
            "data_fingerprint": "f" * 64,
            "recipe": {"batch_size": 16, "seq_len": 128},
        }
        | rec
        | {"provenance": provenance}
        | fields
    )


def study_records() -> list[dict]:
    """Like the cpu study: three dense sizes at 7e12 FLOPs, dense-d64 also at 2.5e12, six MoEs of
    nearly the active parameters of dense-d64 (three of them E8 k2 variants)."""
    records = [_rec(m, "dense", 7e12, n, n, 3.3 + n / 2e6) for m, n in SIZES.items()]
    records.append(_rec("dense-d64", "dense", 2.5e12, SIZES["dense-d64"], SIZES["dense-d64"], 4.0))
    for i, (model, (e, k, active, total, moe)) in enumerate(MOES.items()):
        records.append(_rec(model, "moe", 7e12, active, total, 3.35 - 0.005 * i, experts=e, top_k=k, moe=moe))
    return records


def tiny_records() -> list[dict]:
    """Like the tiny study: dense-d64 and its E8 k2 twin, 0.8% apart in active parameters."""
    return [
        _rec("dense-d64", "dense", 7e12, 2.463e5, 2.463e5, 2.761),
        _rec("moe-d64-e8k2", "moe", 7e12, 2.483e5, 8.38e5, 2.727, experts=8, top_k=2),
    ]


def measure_of(rec: dict, windows: list[float] | None = None, fraction: float = 0.3) -> dict:
    windows = windows or [40_000.0 + 500 * i for i in range(10)]
    return {
        "device_name": "cpu",
        "train": {
            "tokens_per_s_median": float(np.median(windows)),
            "tokens_per_s_min": min(windows),
            "tokens_per_s_max": max(windows),
            "tokens_per_s_windows": windows,
        },
        "memory": {
            "param_bytes": 4 * rec["params"]["total"],
            "gradient_bytes": 4 * rec["params"]["total"],
            "optimizer_state_bytes": 8 * rec["params"]["total"],
            "peak_training_bytes": 100 * 2**20 + 16 * rec["params"]["total"],
        },
        "mfu": {"conventions": {"detailed": {"fraction_of_measured_matmul": fraction, "mfu_vs_spec_peak": None}}},
    }


DISTURBED = [3.3, 27.7, 25.1, 26.0, 24.9, 3.9, 26.3, 27.0, 25.5, 26.8]  # decode b1 tokens/s, one run


CLEAN = [25.1, 26.0, 24.9, 26.3, 27.0, 25.5, 26.8, 25.7, 26.1, 25.9]


def _section(windows: list[float]) -> dict:
    s = sorted(windows)
    return {
        "tokens_per_s_median": (s[4] + s[5]) / 2,
        "tokens_per_s_min": s[0],
        "tokens_per_s_max": s[-1],
        "tokens_per_s_windows": windows,
    }


def _measure(rec: dict, decode: list[float] = CLEAN, fraction: float = 0.3, train: list[float] | None = None) -> dict:
    m = measure_of(rec, windows=train, fraction=fraction)
    m |= {
        "prefill": _section([100_000.0 + 1000 * i for i in range(10)]),
        "decode_batch1": _section(decode) | {"batch": 1},
        "matmul": {"flops_per_s": 1e11, "flops_per_s_windows": [1e11, 1.05e11, 0.98e11]},
        "energy_train": {"energy_j": None, "j_per_token": None},
        "energy_prefill": {"energy_j": None, "j_per_token": None},
    }
    m["mfu"]["conventions"]["6N_total"] = {"fraction_of_measured_matmul": 1.3, "mfu_vs_spec_peak": None}
    return m


# The joint law's synthetic studies (tests/analysis/test_law.py, tests/study/test_pool.py)

LAW_TRUE = {"E0": 1.8, "A": 78.0, "alpha": 0.3, "B": 240.0, "beta": 0.3, "theta": 0.5, "rho": 0.02}
LAW_SIZES = (1e6, 2e6, 4e6, 8e6)
LAW_BUDGETS = (1e15, 4e15)


def true_loss(na, nt, d, routed, t=LAW_TRUE):
    m = na ** (1 - t["theta"]) * nt ** t["theta"]
    d_eff = d * (nt / na) ** t.get("phi", 0.0)
    return t["E0"] + t["A"] * m ** -t["alpha"] + t["B"] * d_eff ** -t["beta"] + t["rho"] * routed


def law_study(
    rng,
    t=LAW_TRUE,
    seeds=(0, 1, 2),
    sd_seed=0.02,
    sd_resid=0.01,
    budgets=LAW_BUDGETS,
    sizes=LAW_SIZES,
    experts=(2, 4, 8, 16),
    moe_sizes=(2e6,),
    fpt_intercept=0.0,
):
    """A study drawn from the joint law ``t`` with shared seed effects: dense sizes at each budget,
    MoEs of ``moe_sizes`` active parameters at E = 2 (= k), 4, 8, 16
    with k = 2. Training FLOPs per token: 6 N + ``fpt_intercept`` (affine in N, as attention and
    the unembedding make them)."""
    u = {s: sd_seed * rng.standard_normal() for s in seeds}
    recs = []

    def add(model, arm, na, nt, c, e, k, s):
        d = c / (6 * na + fpt_intercept)
        y = true_loss(na, nt, d, arm == "moe", t) + u[s] + sd_resid * rng.standard_normal()
        recs.append(
            {
                "run_id": f"{model}_{c:g}_s{s}",
                "model": model,
                "arm": arm,
                "experts": e,
                "top_k": k,
                "seed": s,
                "params": {"active_non_embedding": na, "total_non_embedding": nt, "active": na, "total": nt},
                "budget_flops": c,
                "flops_spent": c,
                "tokens": d,
                "final_val_loss": float(y),
                "flops_per_token": {"6N_active": 6 * na + fpt_intercept},
                "flop_convention": "6N_active",
                "train_seconds": c / (1e12 if arm == "dense" else 0.8e12),
                "gpu_energy_j": None,
                "config": {},
            }
        )

    for c in budgets:
        for s in seeds:
            for n in sizes:
                add(f"dense-{n:g}", "dense", n, n, c, None, None, s)
            for na in moe_sizes:
                name = "" if len(moe_sizes) == 1 else f"-n{na:g}"
                for e in experts:
                    add(f"moe{name}-e{e}k2", "moe", na, na * (1 + (e / 2 - 1) * 2 / 3), c, e, 2, s)
    return recs
