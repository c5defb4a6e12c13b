"""The fields of a finished run's record.json: what it is, what it cost, what it reached.

Every result describes itself: the run's identity and configuration, the layout it trained in,
its FLOPs, tokens and time, the final losses, GPU energy, and the provenance of the numbers.
harness.train.loop's ``Trainer.record()`` calls it once the run reached its last step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.core import host_load
from harness.core.provenance import provenance
from harness.study.runs import run_identity
from harness.train.train_loss import smoothed_train_loss
from models.accounting import FlopConvention, count_params, training_flops_per_token

if TYPE_CHECKING:
    from harness.train.loop import Trainer


def run_record(trainer: Trainer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """record.json of ``trainer``'s finished run; ``rows``: its metrics.jsonl, ending at its last step."""
    run, r = trainer.run, trainer.r
    final = rows[-1]
    return {
        "run_id": run.run_id,
        "study": trainer.study.name,
        "model": run.model.name,
        "arm": "dense" if run.model.moe is None else "moe",
        "experts": None if run.model.moe is None else run.model.moe.experts,
        "top_k": None if run.model.moe is None else run.model.moe.top_k,
        "seed": run.seed,
        "config": run.model.to_dict(),
        "recipe": {k: getattr(v, "value", v) for k, v in r.__dict__.items()},
        "identity": run_identity(run),
        "precision": trainer.precision.describe(trainer.device),
        "parallel": trainer.layout.describe(trainer.model, trainer.device),
        "params": count_params(run.model).__dict__,
        "flop_convention": r.flop_convention.value,
        "flops_per_token": {c.value: training_flops_per_token(run.model, c) for c in FlopConvention},
        "budget_flops": run.budget,
        "steps": run.steps,
        "tokens": run.tokens,
        "flops_spent": run.flops,
        "flops_spent_over_budget": run.flops / run.budget,
        "epochs": run.tokens / trainer.data_meta["splits"]["train"]["tokens"],
        "final_train_loss": final["loss"],
        **smoothed_train_loss(rows),
        "final_train_split_loss": trainer.score(trainer.train_shard),  # the final weights, scored as validation
        "final_val_loss": trainer.val_loss,
        "train_seconds": trainer.elapsed,
        "compile_seconds": trainer.compile_s,
        "tokens_per_s": (run.steps - trainer.untimed_steps) * run.tokens_per_step / trainer.elapsed,
        "gpu_energy_j": trainer.energy_j,
        "gpu_energy_j_per_token": None if trainer.energy_j is None else trainer.energy_j / run.tokens,
        "gpu_energy_absent": trainer.energy_window.absent.get("energy_j") if trainer.energy_j is None else None,
        "gpu_energy_label": "GPU energy (NVML), whole run including evaluation; not wall-socket energy",
        "data_fingerprint": trainer.data_meta["fingerprint"],
        # Whether checkpoint.pt keeps the AdamW state (study.keep_optimizer_state); else weights alone.
        "checkpoint_optimizer_state": trainer.keeps_optimizer,
        "spec_hash": trainer.spec_hash,
        "registration_sha256": trainer.study.registration_sha256 or None,  # the block trained under
        "provenance": provenance(trainer.device, time_utc=host_load.utc_now()),
    }
