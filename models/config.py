"""Typed, self-validating model configurations.

A model is one YAML file in ``models/configs/`` that maps onto :class:`ModelConfig`. Unknown
keys, wrong types and inconsistent values are refused with a :class:`ConfigError` naming the
file, the field and what is allowed, before anything is built.

    cfg = load_config("models/configs/moe-s-e8k2.yaml")
    model = Transformer(cfg)          # models.transformer: the config builds nothing itself
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value: names the source file, the field and what is allowed."""

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field = field
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}field '{field}': {message}")

    def with_source(self, source: str | Path, prefix: str = "") -> ConfigError:
        name = f"{prefix}.{self.field}" if prefix else self.field
        return ConfigError(name, self.message, str(source))


class Routing(enum.StrEnum):
    """How router scores become the chosen experts and their gate weights."""

    SOFTMAX_TOPK = "softmax-topk"  # softmax over E, top-k, optional renorm (Mixtral; Switch k=1)
    TOPK_SOFTMAX = "topk-softmax"  # top-k on logits, softmax over the k (Shazeer 2017, Megatron)
    NOISY_TOPK = "noisy-topk"  # tunable Gaussian noise before top-k (Shazeer et al. 2017)
    SIGMOID_BIAS = "sigmoid-bias"  # sigmoid scores, bias for selection only (DeepSeek-V3)


class Dispatch(enum.StrEnum):
    """How assignments reach the experts."""

    DROPLESS = "dropless"  # every assignment is computed (MegaBlocks, OLMoE, DeepSeek)
    CAPACITY = "capacity"  # ceil(cf * T * k / E) slots per expert, overflow dropped (GShard)


class QKNorm(enum.StrEnum):
    """RMSNorm on queries and keys before RoPE."""

    NONE = "none"
    PER_HEAD = "per-head"  # one weight of size head_dim shared by all heads (Qwen3)
    FULL = "full"  # over the whole projection, n_heads * head_dim wide (OLMoE)


@dataclass(frozen=True)
class MoEConfig:
    """The MoE layer that replaces the dense FFN in some or all blocks."""

    experts: int
    """E, the number of routed experts."""
    top_k: int
    """k, routed experts chosen per token."""
    d_expert: int
    """Hidden width F of each routed expert's SwiGLU (granularity G = d_ff / d_expert)."""
    shared_experts: int = 0
    """Always-active experts of width d_expert, stored as one SwiGLU of shared_experts * d_expert
    (DeepSeekMoE); exactly equivalent to separate experts whose outputs are summed."""
    shared_gate: bool = False
    """Scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE's shared_expert_gate)."""
    routing: Routing = Routing.SOFTMAX_TOPK
    """Routing variant: softmax-topk, topk-softmax, noisy-topk or sigmoid-bias."""
    renormalize: bool = True
    """softmax-topk and sigmoid-bias: rescale the k gate weights to sum to 1."""
    route_scale: float = 1.0
    """Multiplier on the gate weights (DeepSeek-V3's routed_scaling_factor)."""
    dispatch: Dispatch = Dispatch.DROPLESS
    """dropless, or capacity (token dropping)."""
    capacity_factor: float = 1.25
    """Training capacity factor cf: capacity = ceil(cf * T * k / E) (Switch, GShard)."""
    eval_capacity_factor: float = 2.0
    """Capacity factor in eval mode."""
    every: int = 1
    """Block i (0-based) holds an MoE layer when (i + 1) % every == 0 (1: every block)."""
    first_dense: int = 0
    """The first blocks that keep a dense FFN (DeepSeek's first_k_dense_replace)."""
    load_balance_coef: float = 0.01
    """alpha of the Switch/GShard load-balance loss alpha * E * sum_i f_i P_i (Fedus et al. 2021)."""
    importance_coef: float = 0.0
    """w_importance of Shazeer et al. 2017's CV(importance)^2 loss."""
    load_coef: float = 0.0
    """w_load of Shazeer et al. 2017's smooth CV(load)^2 loss; needs routing noisy-topk."""
    z_loss_coef: float = 0.0
    """c_z of the router z-loss c_z * mean_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022)."""
    seq_balance_coef: float = 0.0
    """alpha of the sequence-wise balance loss (DeepSeek-V3 eq. 17-20; 1e-4 there)."""
    bias_update_rate: float = 1e-3
    """gamma of the aux-loss-free bias update (DeepSeek-V3); sigmoid-bias routing only."""
    force_balanced: bool = False
    """Benchmark switch: assign token t's j-th choice to expert (t*k + j) mod E, so every expert
    gets exactly T*k/E assignments; gates still come from the router. Separates kernel cost
    from the cost of imbalance. Never for training a model you mean to keep."""

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "d_expert", "every"):
            _positive(name, getattr(self, name))
        if self.top_k > self.experts:
            raise ConfigError("top_k", f"must be <= experts ({self.experts}), got {self.top_k}")
        if self.shared_experts < 0 or self.first_dense < 0:
            bad = "shared_experts" if self.shared_experts < 0 else "first_dense"
            raise ConfigError(bad, f"must be >= 0, got {getattr(self, bad)}")
        if self.shared_gate and self.shared_experts == 0:
            raise ConfigError("shared_gate", "needs shared_experts >= 1")
        for name in ("capacity_factor", "eval_capacity_factor", "route_scale"):
            _positive(name, getattr(self, name))
        for name in (
            "load_balance_coef",
            "importance_coef",
            "load_coef",
            "z_loss_coef",
            "seq_balance_coef",
            "bias_update_rate",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.load_coef > 0 and self.routing is not Routing.NOISY_TOPK:
            raise ConfigError(
                "load_coef",
                "the smooth load estimator needs the router noise; allowed only with "
                f"routing '{Routing.NOISY_TOPK.value}' (got '{self.routing.value}')",
            )


@dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer; dense when ``moe`` is absent."""

    name: str
    """Readable model id, used in run ids (e.g. moe-s-e8k2)."""
    vocab_size: int
    """V, tokenizer vocabulary size."""
    d_model: int
    """d, residual stream width."""
    n_layers: int
    """L, number of blocks."""
    n_heads: int
    """Query heads."""
    max_seq_len: int
    """n_ctx, the training context length (RoPE tables and attention FLOPs use it)."""
    d_ff: int | None = None
    """Hidden width of the dense SwiGLU FFN; required when any block is dense."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; defaults to n_heads."""
    head_dim: int | None = None
    """Per-head width, independent of d_model; defaults to d_model // n_heads."""
    qk_norm: QKNorm = QKNorm.NONE
    """RMSNorm on queries and keys: none, per-head or full."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections scaled by 1/sqrt(2L))."""
    moe: MoEConfig | None = None
    """The MoE layer; absent for a dense model."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive(name, getattr(self, name))
        check_name("name", self.name)
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        _positive("n_kv_heads", kv)
        if self.n_heads % kv:
            raise ConfigError("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {kv}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                "head_dim", f"required: d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads})"
            )
        hd = self.d_model // self.n_heads if self.head_dim is None else self.head_dim
        _positive("head_dim", hd)
        if hd % 2:
            raise ConfigError("head_dim", f"must be even for RoPE, got {hd}")
        object.__setattr__(self, "n_kv_heads", kv)
        object.__setattr__(self, "head_dim", hd)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _positive(name, getattr(self, name))
        if self.moe is not None:
            if self.moe.first_dense >= self.n_layers:
                raise ConfigError(
                    "moe.first_dense", f"must be < n_layers ({self.n_layers}), got {self.moe.first_dense}"
                )
            if self.n_moe_layers == 0:
                raise ConfigError("moe.every", f"places no MoE layer in {self.n_layers} blocks")
        if self.n_dense_layers > 0:
            if self.d_ff is None:
                raise ConfigError("d_ff", f"required: {self.n_dense_layers} block(s) have a dense FFN")
            _positive("d_ff", self.d_ff)

    def is_moe_layer(self, i: int) -> bool:
        m = self.moe
        return m is not None and i >= m.first_dense and (i + 1) % m.every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def granularity(self) -> float | None:
        """G = d_ff / d_expert (Krajewski et al. 2024), where both are defined."""
        if self.moe is None or self.d_ff is None:
            return None
        return self.d_ff / self.moe.d_expert

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""What a model or study name may be: it becomes run ids, folder names, command-line arguments
and Snakemake wildcards, so no spaces, slashes, quotes, brackets or leading '-'. The study schema
(workflows/schemas/study.schema.yaml) uses the same pattern."""
NAME_RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit (it names runs, folders and jobs)"


def check_name(field: str, name: Any, source: str | None = None) -> None:
    """Refuse a model or study name outside :data:`NAME_PATTERN`, naming the field."""
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise ConfigError(field, f"must be {NAME_RULE}, got {name!r}", source)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, f"must be > 0, got {value}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(name, f"must be a list, got {value!r}")
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=name)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(name, f"must be {_describe(tp)}, got {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for key in data:
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(dotted(key), f"unknown key; allowed keys: {allowed}")
    missing = [
        n
        for n, f in known.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(dotted(missing[0]), "required but missing")
    kwargs = {k: _coerce(hints[k], v, dotted(k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(dotted(e.field), e.message) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e15 and 2.5e-3 as floats, as YAML 1.2 does (YAML 1.1 wants 1.0e+15)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text as this project reads it (1e15 and 2.5e-3 are floats, as in YAML 1.2)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: Path, what: str) -> dict[str, Any]:
    """One YAML mapping from ``path``; errors name the file."""
    if not path.is_file():
        raise ConfigError("(file)", f"no such {what} file", str(path))
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError("(file)", f"not valid YAML{where}: {problem}", str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("(file)", f"must hold a mapping of {what} fields", str(path))
    return data


def load_config(path: str | Path) -> ModelConfig:
    """Read and validate one model YAML; errors name the file."""
    path = Path(path)
    data = load_yaml(path, "model config")
    try:
        return from_dict(ModelConfig, data)
    except ConfigError as e:
        raise e.with_source(path) from None


def dump_config(cfg: ModelConfig) -> str:
    """YAML of the resolved config, omitting nothing (defaults included)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = [
    "ConfigError",
    "Dispatch",
    "MoEConfig",
    "ModelConfig",
    "QKNorm",
    "Routing",
    "dump_config",
    "from_dict",
    "load_config",
]
