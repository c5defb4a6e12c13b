"""The run matrix of a study: one run per model x budget x seed, each with its resolved model
config, token count and step count, and each run's identity (what its result depends on).

    study = load_study("workflows/studies/tiny.yaml")     # harness.study.spec
    for run in plan(study):
        print(run.run_id, run.tokens)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.study.spec import (
    BOOKKEEPING,
    BudgetSelection,
    ModelSpec,
    Recipe,
    Run,
    Study,
    budget_label,
    model_recipe,
    resolve_model_specs,
)
from models.accounting import count_params, training_flops_per_token
from models.config import ConfigError, ModelConfig


def _check_registration(study: Study, runs: list[Run]) -> None:
    """The registered (or, without a registration, pinned) primary contrast names models the study
    trains, at a budget both train, with the seeds it asks for."""
    primary = study.registration.primary if study.registration else None
    where = "registration.primary"
    if primary is None and study.contrast is not None:
        primary, where = study.contrast, "contrast"
    if primary is None:
        return
    arms = {(r.model.name, r.model.moe is not None) for r in runs}
    for field_name, name, moe in (("moe", primary.moe, True), ("dense", primary.dense, False)):
        models = sorted(m for m, is_moe in arms if is_moe == moe)
        if (name, moe) not in arms:
            raise ConfigError(
                f"{where}.{field_name}",
                f"{name!r} is not a{'n MoE' if moe else ' dense'} model of this study ({', '.join(models)})",
                study.path,
            )
        budgets = {r.budget for r in runs if r.model.name == name}
        if primary.budget not in budgets:
            shown = ", ".join(budget_label(b) for b in sorted(budgets))
            raise ConfigError(
                f"{where}.budget",
                f"{name} is not trained at {budget_label(primary.budget)} FLOPs (its budgets: {shown})",
                study.path,
            )
    seeds = [{r.seed for r in runs if r.model.name == name and r.budget == primary.budget} for name in primary.pair]
    shared = seeds[0] & seeds[1]
    if len(shared) < primary.seeds:
        asker = "the registration" if where.startswith("registration") else "the pinned contrast"
        raise ConfigError(
            f"{where}.seeds",
            f"the arms share {len(shared)} seed(s) at {budget_label(primary.budget)} FLOPs "
            f"({', '.join(map(str, sorted(shared))) or 'none'}; {primary.dense}: {_seeds(seeds[1])}, "
            f"{primary.moe}: {_seeds(seeds[0])}), fewer than the {primary.seeds} {asker} asks for: "
            "give both arms the same seeds (their entries' seeds or seeds_per_budget)",
            study.path,
        )


def _seeds(seeds: set[int]) -> str:
    return ", ".join(map(str, sorted(seeds))) or "none"


def seeds_of(study: Study, spec: ModelSpec, budget: float) -> list[int]:
    """The seeds a model entry trains at one budget: its ``seeds_per_budget`` entry, else its
    ``seeds``, else the study's."""
    return (spec.seeds_per_budget or {}).get(budget) or spec.seeds or study.seeds


def plan(study: Study, vocab_size: int | None = None, train_tokens: int | None = None) -> list[Run]:
    """One run per model x budget x seed. With ``train_tokens`` (the train split's size),
    refuses runs that need more tokens than it holds unless the study allows repetition."""
    runs = []
    for spec, cfg in resolve_model_specs(study, vocab_size):
        r = model_recipe(study, spec)
        tokens_per_step = r.batch_size * r.seq_len
        fpt = training_flops_per_token(cfg, r.flop_convention)
        for budget in spec.budgets or study.budgets:
            steps = round(budget / fpt / tokens_per_step)
            if steps < r.min_steps:
                raise ConfigError(
                    "budgets",
                    f"{budget_label(budget)} FLOPs buys {steps} steps of {cfg.name} (recipe.min_steps is "
                    f"{r.min_steps}); give this model its own budgets or a smaller batch (its entry's "
                    "'budgets' or 'recipe: {batch_size: ...}', which leave the other runs alone), or lower "
                    "recipe.min_steps (a guard: changing it retrains nothing)",
                    study.path,
                )
            for seed in seeds_of(study, spec, budget):
                run_id = f"{cfg.name}_{budget_label(budget)}_s{seed}"
                runs.append(Run(run_id, cfg, budget, seed, fpt, tokens_per_step, steps, r))
        _check_parallel(study, cfg, r)
    _check_registration(study, runs)
    if train_tokens is not None and not study.data.allow_repetition:
        worst = max(runs, key=lambda run: run.tokens)
        if worst.tokens > train_tokens:
            raise ConfigError(
                "data.allow_repetition",
                f"run {worst.run_id} needs {worst.tokens:,} tokens but the train split holds "
                f"{train_tokens:,} ({worst.tokens / train_tokens:.2f} epochs); set allow_repetition: true "
                "or use more data",
                study.path,
            )
    return runs


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def essential_fields(obj: Any, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass as plain values, less the fields at their default (nested dataclasses too): a
    field added to the code later, at its default, leaves every earlier run's identity as it was."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in leave_out:
            continue
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value == default:
            continue
        out[f.name] = essential_fields(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def run_identity(run: Run) -> dict[str, Any]:
    """What determines a run's numbers, before the data: model, budget, seed and the recipe less
    its ``BOOKKEEPING``. The train rule reruns on a change to it, and nothing else; the trainer
    adds the data fingerprint to it to guard resumption."""
    return {
        "model": essential_fields(run.model),
        "budget_flops": run.budget,
        "seed": run.seed,
        "recipe": essential_fields(run.recipe, leave_out=BOOKKEEPING),
    }


def recorded_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The identity of a finished run, from its record.json (the record's model config and recipe
    read back through the same types, so an older record compares field by field)."""
    from models.config import from_dict as typed

    if "identity" in record:
        return record["identity"]
    recipe = {k: v for k, v in record["recipe"].items() if k in Recipe.__dataclass_fields__}
    return {
        "model": essential_fields(typed(ModelConfig, record["config"])),
        "budget_flops": record["budget_flops"],
        "seed": record["seed"],
        "recipe": essential_fields(typed(Recipe, recipe), leave_out=BOOKKEEPING),
    }


def identity_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted fields where two identities differ, with both values (a field left out is at
    its default, shown as such): ``recipe.lr 0.003 -> 0.001``."""
    changes = []
    for key in sorted(old.keys() | new.keys()):
        name = f"{prefix}{key}"
        a, b = old.get(key, _default_of(name)), new.get(key, _default_of(name))
        if isinstance(a, dict) and isinstance(b, dict):
            changes += identity_changes(a, b, f"{name}.")
        elif a != b:
            changes.append(f"{name} {_shown(a)} -> {_shown(b)}")
    return changes


def _default_of(dotted: str) -> Any:
    """The default of an identity field (None when it has none)."""
    from models.config import MoEConfig

    *owner, name = dotted.split(".")
    cls = {"recipe": Recipe, "model": ModelConfig, "model.moe": MoEConfig}.get(".".join(owner))
    f = cls.__dataclass_fields__.get(name) if cls else None
    if f is None:
        return None
    if f.default is not dataclasses.MISSING:
        return _plain(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _plain(f.default_factory())
    return None


def _shown(value: Any) -> str:
    return "(none)" if value is None else str(value)


def _check_parallel(study: Study, cfg: ModelConfig, r: Recipe) -> None:
    """The layout must split every run evenly: batches over ranks, experts over expert groups."""
    p = study.parallel
    if p.data % p.expert:
        raise ConfigError("parallel.expert", f"must divide parallel.data ({p.data}), got {p.expert}", study.path)
    if r.batch_size % p.data:
        raise ConfigError(
            "parallel.data",
            f"{cfg.name}'s batch of {r.batch_size} does not split over {p.data} ranks; use a degree that divides it",
            study.path,
        )
    if cfg.moe is not None and cfg.moe.experts % p.expert:
        raise ConfigError(
            "parallel.expert",
            f"{cfg.name}'s {cfg.moe.experts} experts do not split over {p.expert} ranks; use a degree that divides it",
            study.path,
        )


def analysed(study: Study, runs: list[Run]) -> list[Run]:
    """The runs that are evaluated, measured and routing-analysed (``study.analysed_runs``)."""
    sel = study.analysed_runs
    largest: dict[str, float] = {}
    for run in runs:
        largest[run.model.name] = max(largest.get(run.model.name, 0.0), run.budget)
    return [
        run
        for run in runs
        if (sel.seeds is None or run.seed in sel.seeds)
        and (sel.budgets is BudgetSelection.ALL or run.budget == largest[run.model.name])
    ]


def find_run(study: Study, run_id: str, vocab_size: int | None = None) -> Run:
    runs = {r.run_id: r for r in plan(study, vocab_size)}
    if run_id not in runs:
        raise ConfigError("run", f"no run '{run_id}' in study '{study.name}'; runs: {', '.join(runs)}", study.path)
    return runs[run_id]


def plan_rows(runs: list[Run], train_tokens: int | None) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        p = count_params(run.model)
        rows.append(
            {
                "run_id": run.run_id,
                "arm": "dense" if run.model.moe is None else f"E{run.model.moe.experts} k{run.model.moe.top_k}",
                "total_params": p.total,
                "active_params": p.active,
                "flops_per_token": run.flops_per_token,
                "budget": run.budget,
                "tokens": run.tokens,
                "steps": run.steps,
                "epochs": None if not train_tokens else run.tokens / train_tokens,
                "flops_vs_budget": run.flops / run.budget,
            }
        )
    return rows
