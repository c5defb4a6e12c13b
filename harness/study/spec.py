"""Studies: which models, at which FLOP budgets and seeds, on which data, with which recipe.

A study is a YAML file in ``workflows/studies/``, checked against
``workflows/schemas/study.schema.yaml`` and then loaded into typed dataclasses; every error
names the file and the field; each model entry resolves to its model config. The run matrix is
``harness.study.runs``'s.

    study = load_study("workflows/studies/tiny.yaml")
    cfgs = resolve_models(study)
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from models.accounting import FlopConvention
from models.config import NAME_PATTERN, ConfigError, ModelConfig, check_name, from_dict, load_config, load_yaml
from models.matching import match_moe

ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package was loaded from (its schema is the one this code understands)."""
SCHEMA = ROOT / "workflows" / "schemas" / "study.schema.yaml"


def project_root(start: Path | None = None) -> Path:
    """The project the user works in: the nearest folder at or above ``start`` (default the
    working directory) that holds ``workflows/studies``; this package's checkout otherwise. Study
    names and model configs resolve from it, not from wherever the package was installed."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "workflows" / "studies").is_dir():
            return folder
    return ROOT


def studies_dir() -> Path:
    return project_root() / "workflows" / "studies"


def model_configs_dir() -> Path:
    return project_root() / "models" / "configs"


class DataSource(enum.StrEnum):
    PYTHON_STDLIB = "python-stdlib"  # the installed standard library's .py files (offline)
    PYTHON_SITE = "python-site"  # standard library plus site-packages (offline)
    FILES = "files"  # local text, JSONL or Parquet files
    HF = "hf"  # a Hugging Face dataset by name (needs network, or a local path)


class Schedule(enum.StrEnum):
    COSINE = "cosine"  # linear warm-up, cosine decay to min_lr_ratio * lr at the end of the budget
    WSD = "wsd"  # warm-up, stable, then linear decay over the last decay_fraction (Hu et al. 2024)


@dataclass(frozen=True)
class DataConfig:
    source: DataSource = DataSource.PYTHON_STDLIB
    """Where the corpus comes from."""
    paths: list[str] = field(default_factory=list)
    """source 'files': files, folders or glob patterns (.txt/.py/.md..., .jsonl, .parquet)."""
    text_field: str = "text"
    """JSONL, Parquet and Hugging Face records: the field that holds the text."""
    hf_dataset: str | None = None
    """source 'hf': a dataset name for datasets.load_dataset (or a local folder)."""
    hf_config: str | None = None
    hf_split: str = "train"
    max_bytes: int | None = None
    """Read documents in their deterministic order until this many bytes (None: all)."""
    validation_fraction: float = 0.02
    test_fraction: float = 0.02
    vocab_size: int = 8192
    """Byte-level BPE vocabulary trained on the train split."""
    tokenizer_file: str | None = None
    """Use this tokenizer.json instead of training one."""
    allow_repetition: bool = False
    """Allow runs that need more tokens than the train split holds (several epochs)."""


@dataclass(frozen=True)
class ModelSpec:
    config: str | None = None
    """A file in models/configs/ (or a path; a glob pattern takes every match)."""
    base: str | None = None
    """A dense config to derive a compute-matched MoE from, with experts and top_k."""
    experts: int | None = None
    top_k: int | None = None
    shared_experts: int = 0
    moe: dict[str, Any] = field(default_factory=dict)
    """Further MoE fields for the derived variant (routing, dispatch, coefficients...)."""
    name: str | None = None
    """The model's name in run ids and the report: a derived MoE's, or a variant of a config file
    (the same architecture with its own recipe, seeds or budgets) under a name of its own."""
    seeds: list[int] | None = None
    """This model's seeds, in place of the study's (e.g. one seed for an ablation)."""
    budgets: list[float] | None = None
    """This model's FLOP budgets, in place of the study's."""
    seeds_per_budget: dict[float, list[int]] | None = None
    """Seeds of one budget in place of ``seeds`` ({3.5e12: [200], 7.0e12: [200, 201]}): a design
    may replicate its primary budget more than the others. Budgets not named take ``seeds``."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """This model's optimisation settings in place of the study's (``TUNABLE``: a scaling study
    tunes learning rate and batch size by model size); recorded in each run's spec."""


@dataclass(frozen=True)
class Recipe:
    batch_size: int = 16
    seq_len: int = 128
    """Training context; overrides the model configs' max_seq_len."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    schedule: Schedule = Schedule.COSINE
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    """Validation every this many steps (and always at the end)."""
    eval_batches: int = 8
    """Validation sample: this many batches of ``batch_size`` windows, spaced evenly over the whole
    validation split (``TokenShard.eval_indices``); the whole split when it holds fewer."""
    checkpoint_every: int = 200
    flop_convention: FlopConvention = FlopConvention.DETAILED
    dtype: str = "auto"
    """Compute dtype: float32, bfloat16 (autocast; weights and optimizer stay float32) or auto
    (bfloat16 on CUDA, float32 on CPU). See harness.train.precision."""
    compile: bool = False
    """torch.compile the model for training and throughput measurement (inductor, CPU or CUDA);
    the first step of each training process compiles: its time is recorded as compile_seconds and
    kept out of train_seconds and tokens/s, as ``harness measure`` keeps it out of its windows."""
    train_threads: int | None = None
    """CPU studies: threads per training job (None: all cores). With fewer, Snakemake trains
    several runs at once; small models use cores better that way than with one run on all."""
    min_steps: int = 50
    """A budget that buys fewer steps is refused: FLOPs spent would miss it by > 1%."""
    tensorboard: bool = False
    """Also write the training curves as TensorBoard event files in ``<run_dir>/tensorboard/``
    (offline; needs ``pip install 'moe-harness[tensorboard]'``). Changes no number of the run."""


TUNABLE = (
    "batch_size",
    "lr",
    "min_lr_ratio",
    "warmup_fraction",
    "schedule",
    "decay_fraction",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
)
"""Recipe fields a study's model entry may set for itself. The context (``seq_len``: tasks and
evaluation share it), precision and FLOP convention stay the study's, so its runs compare."""

BOOKKEEPING = ("eval_every", "eval_batches", "checkpoint_every", "train_threads", "min_steps", "tensorboard")
"""Recipe fields that do not change what a run trains to: a guard, the validation cadence and
sample, the checkpoint cadence, the CPU threads and the TensorBoard curves. Changing one never
retrains a finished run. (``eval_batches`` sets the sample of the final validation loss; each
record states the one it used.) Every other field is part of the run's identity
(:func:`run_identity`)."""


LOCAL_TASKS = ("heldout_ppl", "heldout_code_mc")
"""The tasks ``harness tasks`` builds from the held-out split (run offline)."""


@dataclass(frozen=True)
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS))
    """lm-eval task names: the local held-out tasks and any task lm-eval knows (e.g. hellaswag)."""
    batch_size: int = 16
    limit: int | None = None
    """At most this many documents per task (None: all)."""
    num_fewshot: int | None = None
    """Few-shot examples (None: each task's default)."""
    download: bool = False
    """Let lm-eval fetch datasets from the Hugging Face hub. Off by default: a task whose data is
    not cached locally is then reported as not run, with the reason, and the others still run."""
    heldout_max_bytes: int = 2_000_000
    """heldout_ppl: held-out documents in their fixed order, up to this many bytes."""
    mc_questions: int = 500
    """heldout_code_mc: number of questions."""
    mc_choices: int = 4
    """heldout_code_mc: the real next line plus this many minus one lines from other files."""
    mc_context_lines: int = 12
    """heldout_code_mc: lines of the file shown before the line to pick."""


class BudgetSelection(enum.StrEnum):
    ALL = "all"
    LARGEST = "largest"


@dataclass(frozen=True)
class AnalysedRuns:
    """Which trained runs are also evaluated (lm-eval), measured and routing-analysed: the
    report's claims on loss need every run, those on speed, memory and routing one per model."""

    seeds: list[int] | None = None
    """Only runs of these seeds (None: every seed)."""
    budgets: BudgetSelection = BudgetSelection.ALL
    """all, or only each model's largest budget."""


@dataclass(frozen=True)
class Parallel:
    """How many processes train each run (torchrun), and how experts are split among them. A
    layout is not part of a run's identity: the batch, data order, tokens and steps are the
    study's whatever the world size (harness.train.parallel)."""

    data: int = 1
    """Data-parallel degree = world size: each rank trains on an equal slice of every global
    batch (recipe.batch_size must divide by it). On CUDA, one GPU per rank."""
    expert: int = 1
    """Expert-parallel degree (divides ``data``): each MoE's routed experts are sharded over
    groups of this many ranks, tokens sent to their experts' ranks. Dense runs ignore it."""


@dataclass(frozen=True)
class PrimaryContrast:
    """The one comparison a confirmatory study's iso-FLOP verdict (R1) rests on, registered in the
    study file before any reported run. The gain is dense - MoE validation loss, paired by seed;
    the claim is that it is positive."""

    moe: str
    """Model name of the MoE arm (as in run ids)."""
    dense: str
    """Model name of the dense arm it is compared with."""
    budget: float
    """The FLOP budget of the comparison."""
    alpha: float = 0.05
    """Level of the one-sided test (and 1 - alpha is the one-sided confidence of the futility bound)."""
    delta_min: float = 0.01
    """Smallest gain of interest, nats: 'not supported' only when the upper confidence bound of the
    gain lies below it."""
    test: str = "paired-t"
    """paired-t (one-sided paired t over seeds); the exact Wilcoxon signed-rank test is reported
    beside it as a robustness check."""
    seeds: int = 2
    """How many seeds both arms must share (the power analysis's n); fewer is refused at plan time."""

    @property
    def pair(self) -> tuple[str, str]:
        return self.moe, self.dense


@dataclass(frozen=True)
class LawForecast:
    """One candidate law's forecast of the primary gain, registered before the runs."""

    law: str
    """The law's form (``harness.analysis.law.FORMS``): theta, phi or both."""
    gain: float
    """The predicted mean gain, dense - MoE validation loss, nats."""
    interval: list[float]
    """[low, high]: the forecast's interval at ``Forecast.confidence``, for the mean over the seeds."""


@dataclass(frozen=True)
class Forecast:
    """What a fitted law predicted for the primary contrast before its runs; the report scores it."""

    source: str
    """The runs the law was fitted to (a results folder or committed reference), in words."""
    laws: list[LawForecast]
    confidence: float = 0.9
    """Coverage of each forecast's interval."""
    command: str = ""
    """The command that printed the forecast (so that it can be checked)."""


@dataclass(frozen=True)
class Registration:
    """What a confirmatory study commits to before its runs: the primary contrast and what is
    secondary or exploratory. The report prints it beside the result."""

    primary: PrimaryContrast | None = None
    secondary: list[str] = field(default_factory=list)
    """Secondary estimands, in words (e.g. 'theta of the joint law with its 95% interval')."""
    exploratory: list[str] = field(default_factory=list)
    """Outputs read as exploration, not confirmation."""
    diverged_runs: str = ""
    """What happens to a run whose loss diverges (decided in advance)."""
    forecast: Forecast | None = None
    """A scaling law's forecast of the primary gain, scored by the report against the result."""


@dataclass(frozen=True)
class PoolSource:
    """Another study's finished runs, pooled into this study's joint law and dense frontier."""

    results: str
    """A folder holding that study's ``runs/`` and ``data/data.json``: ``results/<study>`` or a
    committed ``results/reference/<device>/<study>``, relative to the project."""
    differs: list[str] = field(default_factory=list)
    """Recipe fields that may differ from this study's (anything else must be the same)."""


@dataclass(frozen=True)
class Study:
    name: str
    data: DataConfig
    models: list[ModelSpec]
    budgets: list[float]
    """Training FLOP budgets; every model gets each one."""
    seeds: list[int] = field(default_factory=lambda: [0])
    recipe: Recipe = field(default_factory=Recipe)
    eval: EvalConfig = field(default_factory=EvalConfig)
    description: str = ""
    device: str = "auto"
    """auto (CUDA when visible), cpu or cuda."""
    analysed_runs: AnalysedRuns = field(default_factory=AnalysedRuns)
    parallel: Parallel = field(default_factory=Parallel)
    registration: Registration | None = None
    """A confirmatory study's registered design (None: exploratory; R1 then uses a stated default)."""
    contrast: PrimaryContrast | None = None
    """The contrast R1 tests in a study without a registration (its headline, pinned so that adding
    or removing a model cannot move it; unlike a registration it claims nothing was decided before
    the runs, and one shared seed is enough). Without it, R1 uses the stated default; a study that
    registers its primary contrast gives it there instead."""
    pool: list[PoolSource] = field(default_factory=list)
    """Other studies' runs that join the joint law and the dense frontier (never a registered
    contrast): same data and tokenizer, same recipe but for the fields each source names."""
    keep_optimizer_state: bool = False
    """Keep the AdamW state in a finished run's checkpoint.pt (12 bytes a parameter in all, not
    the weights' 4), say to train the run further by hand. Off: a finished run keeps its weights
    and counters, which is all that measure, evaluate, routing, export, sample and reuse read.
    Either way the previous checkpoint goes when the run finishes. Changes no number of a run and
    retrains nothing; it applies to runs that finish after it is set."""
    path: str = ""
    """The file it was loaded from (set by load_study)."""
    registration_sha256: str = ""
    """The hash of the registration block as written (set by load_study; '' without one)."""


@dataclass(frozen=True)
class Run:
    run_id: str
    model: ModelConfig
    budget: float
    seed: int
    flops_per_token: float
    tokens_per_step: int
    steps: int
    recipe: Recipe
    """The study's recipe with the model entry's overrides."""

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token


def study_path(name_or_path: str | Path) -> Path:
    """A path as given, or a study name looked up in the project's ``workflows/studies``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return studies_dir() / f"{name_or_path}.yaml"


def _check_seeds_per_budget(study: Study, spec: ModelSpec, where: str, path: str) -> None:
    """Every budget named in ``seeds_per_budget`` is one of the entry's budgets, with distinct seeds."""
    budgets = spec.budgets or study.budgets
    for budget, seeds in (spec.seeds_per_budget or {}).items():
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or float(budget) not in budgets:
            allowed = ", ".join(budget_label(b) for b in budgets)
            shown = budget_label(budget) if isinstance(budget, (int, float)) else repr(budget)
            raise ConfigError(where, f"budget {shown} is not one of this model's budgets ({allowed})", path)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}.{budget_label(budget)}", f"seeds repeat: {seeds}", path)


def load_study(name_or_path: str | Path) -> Study:
    """Read, schema-check and type a study; errors name the file and the field."""
    path = study_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in studies_dir().glob("*.yaml")))
        raise ConfigError("(file)", f"no such study file; shipped studies: {known}", str(path))
    data = load_yaml(path, "study")
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.path) or "(top level)"
        if e.validator == "pattern" and e.validator_value == NAME_PATTERN:
            check_name(where, e.instance, str(path))
        raise ConfigError(where, e.message, str(path))
    try:
        study = from_dict(Study, data)
    except ConfigError as e:
        raise e.with_source(path) from None
    try:
        shown = path.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = path
    study = Study(**{**study.__dict__, "path": str(shown), "registration_sha256": registration_hash(data)})
    if study.contrast is not None:
        if study.registration is not None and study.registration.primary is not None:
            raise ConfigError(
                "contrast",
                "is given beside registration.primary: a registered study's contrast is its registration's; "
                "remove one of them",
                str(path),
            )
        if "seeds" not in data["contrast"]:  # a pinned headline needs one shared seed, a registration two
            study = Study(**{**study.__dict__, "contrast": dataclasses.replace(study.contrast, seeds=1)})
    _check_data_source(data.get("data") or {}, study.data.source, str(path))
    for i, spec in enumerate(study.models):
        if (spec.config is None) == (spec.base is None):
            raise ConfigError(f"models[{i}]", "give exactly one of 'config' or 'base'", str(path))
        if spec.base is not None and (spec.experts is None or spec.top_k is None):
            raise ConfigError(f"models[{i}]", "'base' needs 'experts' and 'top_k'", str(path))
        _check_seeds_per_budget(study, spec, f"models[{i}].seeds_per_budget", str(path))
        model_recipe(study, spec, f"models[{i}]")  # refuses a field a model may not set
    return study


def registration_hash(study_data: dict[str, Any]) -> str:
    """SHA-256 of a study mapping's ``registration`` block as written (keys sorted; '' without one):
    what a run records it was trained under, so that an edit after the runs shows."""
    block = study_data.get("registration") if isinstance(study_data, dict) else None
    if block is None:
        return ""
    return hashlib.sha256(json.dumps(block, sort_keys=True, default=str).encode()).hexdigest()


SOURCE_FIELDS = {
    "paths": (DataSource.FILES,),
    "text_field": (DataSource.FILES, DataSource.HF),
    "hf_dataset": (DataSource.HF,),
    "hf_config": (DataSource.HF,),
    "hf_split": (DataSource.HF,),
}
"""The data fields that only some sources read: given with another, they would be ignored."""


def _check_data_source(given: dict[str, Any], source: DataSource, path: str) -> None:
    """Refuse a data field the study's source does not read (``given``: the data mapping as written)."""
    for key, sources in SOURCE_FIELDS.items():
        if key in given and source not in sources:
            takes = " or ".join(f"'{s.value}'" for s in sources)
            raise ConfigError(
                f"data.{key}",
                f"is read only with source {takes}, but data.source is '{source.value}', which would ignore it; "
                f"remove data.{key} or set data.source to {takes}",
                path,
            )


def model_recipe(study: Study, spec: ModelSpec, where: str = "models") -> Recipe:
    """The study's recipe with a model entry's ``recipe`` overrides."""
    if not spec.recipe:
        return study.recipe
    for key in spec.recipe:
        if key not in TUNABLE:
            raise ConfigError(
                f"{where}.recipe.{key}",
                f"a model may set only {', '.join(TUNABLE)}; the rest of the recipe is the study's",
                study.path,
            )
    merged = {k: getattr(v, "value", v) for k, v in study.recipe.__dict__.items()} | spec.recipe
    try:
        return from_dict(Recipe, merged, f"{where}.recipe")
    except ConfigError as e:
        raise e.with_source(study.path) from None


def _config_file(name: str, source: str, field_name: str) -> list[Path]:
    p, configs = Path(name), model_configs_dir()
    candidates = [p, configs / p, project_root() / p]
    if any(ch in name for ch in "*?["):
        # An absolute pattern stands alone; a relative one is looked up where a plain name is.
        bases = [None] if p.is_absolute() else [configs, Path.cwd(), project_root()]
        for base in bases:
            pattern = name if base is None else str(base / name)
            if matches := sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file()):
                return matches
        where = "" if p.is_absolute() else f" (looked in {', '.join(dict.fromkeys(str(b) for b in bases))})"
        raise ConfigError(field_name, f"pattern {name!r} matches no file{where}", source)
    for c in candidates:
        if c.is_file():
            return [c]
    raise ConfigError(field_name, f"no model config '{name}' (looked in {configs})", source)


def _renamed(cfgs: list[ModelConfig], spec: ModelSpec, where: str, source: str) -> list[ModelConfig]:
    """A config entry's models under the entry's ``name``, if it gives one: a variant of a model
    file (its own recipe, seeds or budgets) trains and is reported as a model of its own."""
    if spec.name is None:
        return cfgs
    if len(cfgs) != 1:
        raise ConfigError(
            f"{where}.name",
            f"names one model, but config {spec.config!r} matches {len(cfgs)} files; give each its own entry",
            source,
        )
    return [dataclasses.replace(cfgs[0], name=spec.name)]


def resolve_models(study: Study, vocab_size: int | None = None) -> list[ModelConfig]:
    """The study's model configs with the study's vocabulary and context applied."""
    return [cfg for _, cfg in resolve_model_specs(study, vocab_size)]


def resolve_model_specs(study: Study, vocab_size: int | None = None) -> list[tuple[ModelSpec, ModelConfig]]:
    """Each resolved model config with the study entry it came from (a glob gives several)."""
    vocab = vocab_size if vocab_size is not None else study.data.vocab_size
    out: list[tuple[ModelSpec, ModelConfig]] = []
    for i, spec in enumerate(study.models):
        where = f"models[{i}]"
        try:
            if spec.config is not None:
                cfgs = [load_config(f) for f in _config_file(spec.config, study.path, f"{where}.config")]
                cfgs = _renamed(cfgs, spec, where, study.path)
            else:
                (base_file,) = _config_file(spec.base, study.path, f"{where}.base")
                base = load_config(base_file)
                moe, _ = match_moe(
                    base,
                    experts=spec.experts,
                    top_k=spec.top_k,
                    shared_experts=spec.shared_experts,
                    name=spec.name,
                    **spec.moe,
                )
                cfgs = [moe]
        except ConfigError as e:
            raise (e if e.source else e.with_source(study.path, where)) from None
        for cfg in cfgs:
            cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": vocab, "max_seq_len": study.recipe.seq_len})
            out.append((spec, cfg))
    names = [c.name for _, c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("models", f"model names must be unique; repeated: {', '.join(dupes)}", study.path)
    return out


def budget_label(budget: float) -> str:
    """1e15 -> '1e15', 3e12 -> '3e12', 2.5e13 -> '2.5e13': readable, never a float repr."""
    mantissa, exponent = f"{budget:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
