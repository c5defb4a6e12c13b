"""Derive a compute-matched MoE config from a dense one.

The MoE keeps everything of the dense model (d, L, heads, n_ctx, V, norms) and replaces the
FFN. With routed experts of width d_expert, compute matching requires

    (top_k + shared_experts) * d_expert = d_ff,

so active parameters and FLOPs per token equal the dense model's up to the router (the
matching of Fedus et al. 2022 and Dai et al. 2024). Granularity G = d_ff / d_expert (Krajewski
et al. 2024) is then top_k + shared_experts: finer experts mean more of them chosen per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from models.accounting import count_params, training_flops_per_token
from models.config import ConfigError, ModelConfig, MoEConfig, _Loader, from_dict

MATCHED = ("experts", "top_k", "shared_experts", "d_expert")
"""MoEConfig fields that matching sets itself: d_expert follows from d_ff / (top_k + shared_experts)."""
OPTIONS = tuple(f.name for f in dataclasses.fields(MoEConfig) if f.name not in MATCHED)
"""The further MoEConfig fields a matched variant takes (routing, dispatch, coefficients, ...)."""


@dataclass(frozen=True)
class MatchReport:
    dense_active_params: int
    moe_active_params: int
    moe_total_params: int
    router_params: int
    """What the MoE adds to the active count: routers (and shared-expert gates)."""
    dense_flops_per_token: float
    moe_flops_per_token: float
    """Training FLOPs per token, detailed convention."""

    @property
    def active_params_ratio(self) -> float:
        return self.moe_active_params / self.dense_active_params

    @property
    def flops_ratio(self) -> float:
        return self.moe_flops_per_token / self.dense_flops_per_token

    def lines(self) -> list[str]:
        extra = self.moe_active_params - self.dense_active_params
        return [
            f"active params: dense {self.dense_active_params:,}  moe {self.moe_active_params:,}"
            f"  (+{extra:,}, x{self.active_params_ratio:.5f}; router {self.router_params:,})",
            f"total params:  moe {self.moe_total_params:,}"
            f"  (x{self.moe_total_params / self.dense_active_params:.3f} the dense model)",
            f"training FLOPs/token (detailed): dense {self.dense_flops_per_token:.4g}"
            f"  moe {self.moe_flops_per_token:.4g}  (x{self.flops_ratio:.5f})",
        ]


def match_moe(
    dense: ModelConfig,
    experts: int,
    top_k: int,
    shared_experts: int = 0,
    granularity: int | None = None,
    name: str | None = None,
    **moe_options: Any,
) -> tuple[ModelConfig, MatchReport]:
    """The MoE twin of ``dense`` with E=experts, k=top_k; ``moe_options`` are further
    MoEConfig fields (``OPTIONS``: routing, dispatch, coefficients, every, ...)."""
    for key in moe_options:
        _check_option(key)
    if dense.moe is not None:
        raise ConfigError("moe", f"'{dense.name}' is already an MoE; matching starts from a dense config")
    active = top_k + shared_experts
    if granularity is not None and granularity != active:
        raise ConfigError(
            "granularity",
            f"compute matching needs top_k + shared_experts == granularity; got top_k={top_k}, "
            f"shared_experts={shared_experts}, granularity={granularity}",
        )
    if active < 1 or dense.d_ff % active:
        raise ConfigError(
            "top_k",
            f"d_ff ({dense.d_ff}) must split evenly into top_k + shared_experts = {active} experts",
        )
    moe = from_dict(
        MoEConfig,
        {
            "experts": experts,
            "top_k": top_k,
            "d_expert": dense.d_ff // active,
            "shared_experts": shared_experts,
            **moe_options,
        },
        prefix="moe",
    )
    if name is None:
        name = f"{dense.name}-e{experts}k{top_k}" + (f"s{shared_experts}" if shared_experts else "")
    cfg = dataclasses.replace(dense, name=name, moe=moe)
    dp, mp = count_params(dense), count_params(cfg)
    report = MatchReport(
        dense_active_params=dp.active,
        moe_active_params=mp.active,
        moe_total_params=mp.total,
        router_params=mp.active - dp.active,
        dense_flops_per_token=training_flops_per_token(dense, "detailed"),
        moe_flops_per_token=training_flops_per_token(cfg, "detailed"),
    )
    return cfg, report


def _check_option(key: str) -> None:
    if key not in OPTIONS:
        why = (
            "set by matching itself: experts, top_k and shared_experts are its own arguments and "
            "d_expert = d_ff / (top_k + shared_experts)"
            if key in MATCHED
            else "unknown key"
        )
        raise ConfigError(f"moe.{key}", f"{why}; allowed keys: {', '.join(sorted(OPTIONS))}")


def parse_options(pairs: list[str], given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the command line's --moe) as match_moe options, each value read as
    a YAML scalar the way a study's ``moe:`` mapping reads it (1e-3 is a number, true a bool),
    added to ``given``. A key outside ``OPTIONS`` or given twice is refused, naming the key."""
    options = dict(given or {})
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("moe", f"expected KEY=VALUE, got {pair!r}")
        _check_option(key)
        if key in options:
            raise ConfigError(f"moe.{key}", "given more than once")
        try:
            options[key] = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError:
            raise ConfigError(f"moe.{key}", f"not a YAML value: {text!r}") from None
    return options


def non_defaults(moe: MoEConfig) -> dict[str, tuple[Any, Any]]:
    """The ``OPTIONS`` (and shared_experts) of ``moe`` that differ from MoEConfig's defaults, as
    {field: (value, default)}, so a derived variant's choices can be shown rather than implied."""
    out = {}
    for f in dataclasses.fields(MoEConfig):
        if f.default is dataclasses.MISSING:
            continue
        value = getattr(moe, f.name)
        if value != f.default:
            out[f.name] = (value, f.default)
    return out
