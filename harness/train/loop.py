"""Train one run of a study to its FLOP budget: step -> log -> eval -> checkpoint.

    harness train tiny --run moe-xs-e8k2_3e12_s0

Tokens = budget / training FLOPs per token (the study's convention); dense and MoE runs of a
seed share the data order and recipe. A killed run resumes from ``checkpoint.pt`` and, on CPU,
finishes with the same numbers as an uninterrupted one. ``record.json`` is written last.
Progress shows as a bar on a terminal and as plain lines in a log file; ``recipe.tensorboard``
adds TensorBoard curves (harness.train.progress).

:class:`Trainer` holds one run; ``fit()`` is the loop and reads the same in every layout: how
the run is spread over processes (one, DDP, or data + expert parallel) is one object,
``Trainer.layout`` (harness.train.layouts), whose operations it calls: shard and wrap the model,
take this rank's rows, reduce and clip the gradients, average a logged number, gather the
checkpoint, and say whether this rank writes files. ``train()`` (harness.train.run) starts a
run: the finished-run checks, the lock on its folder, the process group and the record.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from harness.core import host_load
from harness.core.errors import DamagedFile, HarnessError
from harness.core.io import remove_leftovers, write_json, write_text
from harness.data.prepare import TokenShard, verify_shards
from harness.study.records import read_data_meta, read_metrics
from harness.study.runs import identity_changes, run_identity
from harness.study.spec import Recipe, Run, Schedule, Study
from harness.train import checkpoint
from harness.train.energy import combine_across_ranks, open_meter
from harness.train.layouts import SINGLE, SingleProcess, for_run
from harness.train.parallel import ALONE, Layout
from harness.train.precision import Precision, resolve
from harness.train.progress import TENSORBOARD_DIR, TensorBoardLog, open_progress, require_tensorboard
from harness.train.record import run_record
from harness.train.resources import check_memory
from models.config import ConfigError, dump_config
from models.transformer import Transformer


class NonFiniteLoss(RuntimeError):
    pass


SPEC = "spec.json"
"""What a run in progress trains to (its identity and data); record.json repeats it when done."""

TRAINING_OUTPUTS = ("config.yaml", SPEC, "metrics.jsonl", checkpoint.NAME, checkpoint.PREVIOUS, "record.json")
"""What a training job writes in its run folder; leftovers of interrupted writes of these are
removed when it starts."""


class Stopped(RuntimeError):
    """Raised by --stop-after: the run stopped early, leaving a checkpoint to resume from."""


def lr_at(step: int, steps: int, r: Recipe) -> float:
    warmup = max(1, round(r.warmup_fraction * steps))
    if step < warmup:
        return r.lr * (step + 1) / warmup
    if r.schedule is Schedule.COSINE:
        progress = (step - warmup) / max(1, steps - 1 - warmup)
        return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    decay_start = steps - max(1, round(r.decay_fraction * steps))
    if step < decay_start:
        return r.lr
    progress = (step - decay_start + 1) / (steps - decay_start)
    return r.lr * (1 - (1 - r.min_lr_ratio) * progress)


def pick_device(study: Study) -> torch.device:
    if study.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "is 'cuda' but no CUDA device is visible here; use 'auto' or 'cpu'", study.path)
    if study.device == "cuda" or (study.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def step_on_batch(model, step_model, opt, x, y, precision, device: torch.device, layout, grad_clip: float):
    """One optimizer step on this rank's batch (x, y on the host): forward and backward of
    ``step_model`` (``model`` compiled, or itself) under ``precision``'s autocast, the gradients
    reduced over ``layout``'s ranks and clipped, AdamW, and the aux-loss-free routers' bias updated
    from the step's load. Returns the model's output and the gradient norm. The training loop and
    ``harness measure`` both take their steps here."""
    with precision.autocast(device):
        out = step_model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    (out.loss + out.aux_loss).backward()
    grad_norm = layout.reduce_and_clip(model, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    layout.sum_router_loads(model)
    model.update_router_biases()
    return out, grad_norm


def make_optimizer(model: torch.nn.Module, r: Recipe) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm weights) do not (nanoGPT's grouping).

    The fused kernel (torchtitan's default): one pass over each parameter instead of a chain of
    multi-tensor ops. It matters most to an MoE, whose routed experts hold several times the
    dense twin's parameters: on the cpu study's d64 pair the optimizer takes 3.0 ms a step
    instead of 6.1 for the E16 twin, 3.4 instead of 4.3 for the dense model."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=r.lr, betas=(r.beta1, r.beta2), fused=True)


def run_spec(run: Run, data_meta: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the run's numbers (``run_identity`` and the data); its hash
    guards resumption."""
    return run_identity(run) | {"data_fingerprint": data_meta["fingerprint"]}


def _spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(
    model, shard: TokenShard, r: Recipe, device: torch.device, precision: Precision, layout: SingleProcess = SINGLE
) -> float:
    """Mean validation loss per token over the fixed sample; with several ranks, each scores the
    batches its layout gives it and the sums are added up (harness.train.layouts)."""
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(shard.eval_batches(r.eval_batches, r.batch_size)):
        if not layout.evaluates(i):
            continue
        with precision.autocast(device):
            out = model(x.to(device), y.to(device))
        total += float(out.loss) * y.numel()
        count += y.numel()
    model.train()
    total, count = layout.eval_totals([total, float(count)])
    return total / count


def routing_summary(model, layout: SingleProcess = SINGLE) -> list[dict[str, Any]]:
    """Per MoE layer, on the host (call at log steps only: it synchronises). Token counts are
    the whole global batch's; the losses and entropy those of this rank's batch (of its
    expert-parallel group's, with expert parallelism)."""
    rows = []
    for s in model.routing_stats():
        load = s.tokens_per_expert.float().clone()
        layout.sum_routing(load)
        rows.append(
            {
                "tokens_per_expert": [int(n) for n in load.tolist()],
                "load_max_over_mean": float(load.max() / load.mean().clamp_min(1e-9)),
                "load_cv": float(load.std(unbiased=False) / load.mean().clamp_min(1e-9)),
                "dropped_fraction": float(s.dropped_fraction),
                "router_entropy": float(s.router_entropy),
                "load_balance_loss": float(s.load_balance_loss),
                "z_loss": float(s.z_loss),
            }
        )
    return rows


class Trainer:
    """One run's state: model, optimizer, data, clock, checkpoint and log. ``fit()`` is the loop;
    the other methods are the hooks around it."""

    def __init__(
        self,
        run: Run,
        study: Study,
        data_dir: Path,
        out_dir: Path,
        progress: bool = True,
        resume: str = "auto",
        layout: Layout = ALONE,
        device: torch.device | None = None,
    ):
        self.run, self.study, self.r, self.out_dir = run, study, run.recipe, out_dir
        self.layout = for_run(layout, run.model.moe is not None)
        if self.r.tensorboard:
            require_tensorboard(study.path)
            if (folder := out_dir / TENSORBOARD_DIR).exists() and not folder.is_dir():
                raise HarnessError(
                    f"{folder}: a file is where the run's TensorBoard folder belongs (recipe.tensorboard is "
                    "true): move the file aside, or set recipe.tensorboard: false"
                )
        self.data_meta = read_data_meta(data_dir / "data.json", f"harness data {study.path}", study.name)
        self._check_data(data_dir)
        self.device = device or pick_device(study)
        check_memory(run.model, self.r.batch_size, self.r.seq_len, self.device, run.run_id)
        self.precision = resolve(self.r, self.device)
        self.spec = run_spec(run, self.data_meta)
        self.spec_hash = _spec_hash(self.spec)
        if resume == "previous" and not (out_dir / checkpoint.PREVIOUS).is_file():
            raise HarnessError(self._no_previous())
        self.ckpt_path, self.metrics_path = out_dir / checkpoint.NAME, out_dir / "metrics.jsonl"
        if self.layout.writes:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in TRAINING_OUTPUTS:
                remove_leftovers(out_dir, name)
            write_text(out_dir / "config.yaml", dump_config(run.model))
            if resume == "restart":
                self._start_over()
        self.layout.barrier()  # no rank reads the folder before the first has tidied it

        torch.manual_seed(run.seed)
        self.model = Transformer(run.model).to(self.device)
        self.opt = make_optimizer(self.model, self.r)
        self.train_shard = TokenShard(data_dir, "train", self.r.seq_len)
        self.val_shard = TokenShard(data_dir, "validation", self.r.seq_len)
        self.step, self.elapsed, self.energy_j = 0, 0.0, 0.0
        # Compiled runs: the first step of each process compiles; its time is kept apart.
        self.compile_s, self.untimed_steps = 0.0, 0
        self.meter = open_meter(self.device)
        # Whether the final checkpoint keeps the AdamW state (False once resumed from one without).
        self.keeps_optimizer = study.keep_optimizer_state
        self._resume(resume)
        # Laid out after loading: the checkpoint is always the single-process one.
        self.model, self.opt, wrapped = self.layout.apply(self.model, self.opt, self._rebuild, self.device)
        if self.layout.writes:
            write_json(out_dir / SPEC, {"spec_hash": self.spec_hash, "spec": self.spec})
        self.resumed_at = self.elapsed
        self.step_model = torch.compile(wrapped) if self.precision.compile else wrapped
        self.val_loss: float | None = None
        self.progress = progress and self.layout.writes
        self.tensorboard = self.r.tensorboard and self.layout.writes
        self.events: TensorBoardLog | None = None  # recipe.tensorboard: opened by fit()

    def _rebuild(self, model: torch.nn.Module) -> torch.optim.AdamW:
        return make_optimizer(model, self.r)

    def _check_data(self, data_dir: Path) -> None:
        """The prepared data fits the run: its vocabulary, enough train tokens for the budget and
        a window of seq_len in each split; each refusal names the field and what to do."""
        run, meta, study = self.run, self.data_meta, self.study.path
        prepare = f"`harness data {study}` prepares it again"
        if meta["tokenizer"]["vocab_size"] != run.model.vocab_size:
            raise ConfigError(
                "data.vocab_size",
                f"is {run.model.vocab_size}, but the data in {data_dir} was prepared with a tokenizer of "
                f"{meta['tokenizer']['vocab_size']} tokens; {prepare} with the new vocabulary "
                "(every run then trains again)",
                study,
            )
        verify_shards(data_dir, meta, f"harness data {study}")
        train_tokens = meta["splits"]["train"]["tokens"]
        if run.tokens > train_tokens and not self.study.data.allow_repetition:
            raise ConfigError(
                "data.allow_repetition",
                f"run {run.run_id} needs {run.tokens:,} tokens but the train split holds {train_tokens:,} "
                f"({run.tokens / train_tokens:.2f} epochs); set allow_repetition: true, use more data, "
                "or lower the budget",
                study,
            )
        for split in ("train", "validation"):
            tokens = meta["splits"][split]["tokens"]
            if tokens - 1 < self.r.seq_len:  # a window is seq_len inputs and the token after them
                more = (
                    f"raise data.validation_fraction and run `harness data {study}`"
                    if split == "validation"
                    else "use more data"
                )
                raise ConfigError(
                    "recipe.seq_len",
                    f"{self.r.seq_len} is longer than the {split} split of {data_dir} ({tokens:,} tokens); "
                    f"lower recipe.seq_len, or {more}",
                    study,
                )

    def _start_over(self) -> None:
        """Discard the checkpoints, record and curves of an earlier configuration of this run."""
        checkpoint.discard(self.out_dir)
        (self.out_dir / "record.json").unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / TENSORBOARD_DIR, ignore_errors=True)

    def _no_previous(self) -> str:
        """--from-previous without a checkpoint.prev.pt: what the run folder holds, and what is left."""
        train = f"harness train {self.study.path} --run {self.run.run_id}"
        current = self.out_dir / checkpoint.NAME
        why = checkpoint.problem(current)
        if why is None:
            there = f"{current.name} verifies: `{train}` resumes from it, `{train} --restart` starts over"
        elif current.exists():
            there = f"{current.name} is damaged ({why}): `{train} --restart` starts the run over"
        else:
            there = f"the run has no checkpoint: `{train}` starts it (`--from-previous` is not needed)"
        return f"{self.out_dir / checkpoint.PREVIOUS}: there is no previous checkpoint to resume from; {there}"

    def _damaged_remedy(self) -> str:
        train = f"harness train {self.study.path} --run {self.run.run_id}"
        prev = self.out_dir / checkpoint.PREVIOUS
        keep = f"`{train} --from-previous` resumes from {prev.name}, " if checkpoint.problem(prev) is None else ""
        return f"{keep}`{train} --restart` starts the run over"

    def _resume(self, resume: str) -> None:
        """Load the checkpoint (``resume``: auto, previous, restart, or changed: auto, but start
        over from a checkpoint of another configuration), and cut metrics.jsonl back to its step."""
        kept: list[str] = []
        path = self.out_dir / checkpoint.PREVIOUS if resume == "previous" else self.ckpt_path
        if resume == "previous" or path.exists():
            try:
                state = checkpoint.load_checkpoint(path, "harness train", map_location=self.device)
            except DamagedFile as e:
                raise DamagedFile(e.path, e.problem, self._damaged_remedy()) from None
            if state.get("spec_hash") != self.spec_hash and resume == "changed":
                self.layout.barrier()  # every rank has read it before it goes
                if self.layout.writes:
                    self._start_over()  # asked for: a checkpoint of another configuration
                    write_text(self.metrics_path, "")
                return
            if state.get("spec_hash") != self.spec_hash:
                changed = identity_changes(state["spec"], self.spec) if "spec" in state else []
                what = "; ".join(changed) or f"spec {state.get('spec_hash')} vs {self.spec_hash}"
                raise HarnessError(
                    f"{path}: checkpoint belongs to another configuration of {self.run.run_id} ({what}); "
                    f"`harness train {self.study.path} --run {self.run.run_id} --restart` starts over"
                )
            if resume == "previous" and self.layout.writes:  # the damaged one must not become "previous"
                checkpoint.discard_current(self.out_dir)
            self.model.load_state_dict(state["model"])
            if checkpoint.OPTIMIZER in state:
                self.opt.load_state_dict(state[checkpoint.OPTIMIZER])
            elif int(state["step"]) < self.run.steps:  # only a finished run's final weights go without it
                raise DamagedFile(path, f"it holds no optimizer state at step {state['step']}", self._damaged_remedy())
            else:  # the final weights of a run killed before its record: nothing left to train
                self.keeps_optimizer = False
            torch.set_rng_state(state["rng_cpu"].cpu())
            if self.device.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"].cpu())
            self.step, self.elapsed = int(state["step"]), float(state["elapsed_s"])
            self.compile_s, self.untimed_steps = state.get("compile_s", 0.0), state.get("untimed_steps", 0)
            self.energy_j = state.get("gpu_energy_j")
            if self.metrics_path.exists():
                rows = read_metrics(self.metrics_path, self.study.path, partial_last=True)
                kept = [json.dumps(row) + "\n" for row in rows if row["step"] <= self.step]
        self.layout.barrier()  # every rank has read the log before it is cut
        if self.layout.writes:
            write_text(self.metrics_path, "".join(kept))

    def save(self) -> None:
        """Write the checkpoint; the final one keeps the AdamW state only where the study asks
        (``keep_optimizer_state``): nothing resumes from a finished run, and the later steps read
        its weights alone."""
        model_state, opt_state = self.layout.full_state(self.model, self.opt)  # collective
        state = {
            "model": model_state,
            checkpoint.OPTIMIZER: opt_state,
            "step": self.step,
            "elapsed_s": self.elapsed,
            "compile_s": self.compile_s,
            "untimed_steps": self.untimed_steps,
            "gpu_energy_j": self._energy_total(self._energy_so_far()),
            "rng_cpu": torch.get_rng_state(),
            "spec_hash": self.spec_hash,
            "spec": self.spec,
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        if self.step >= self.run.steps and not self.keeps_optimizer:
            del state[checkpoint.OPTIMIZER]
        if self.layout.writes:  # the ranks hold one model: the first writes it
            checkpoint.save_checkpoint(state, self.ckpt_path)
        self.layout.barrier()

    def _energy_so_far(self) -> float | None:
        """GPU energy of this segment so far, summed over ranks (None if any rank has none)."""
        values = self.layout.gather(self.meter.energy_so_far_j())
        return None if None in values else sum(values)

    def _energy_total(self, segment_j: float | None) -> float | None:
        """GPU energy of the whole run: earlier segments plus this one (None if unmeasured)."""
        return None if segment_j is None or self.energy_j is None else self.energy_j + segment_j

    def tick(self) -> None:
        """Add the wall time since the last mark to the training time (synchronised on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.elapsed += now - self.mark
        self.mark = now

    def train_step(self) -> tuple[Any, float, torch.Tensor]:
        lr = lr_at(self.step, self.run.steps, self.r)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.train_shard.train_batch(self.step, self.r.batch_size, self.run.seed)
        rows = self.layout.rows(self.r.batch_size)  # this rank's slice of the batch
        x, y = x[rows], y[rows]
        out, grad_norm = step_on_batch(
            self.model, self.step_model, self.opt, x, y, self.precision, self.device, self.layout, self.r.grad_clip
        )
        self.step += 1
        return out, lr, grad_norm

    def _set_compilation_apart(self) -> None:
        """The first compiled step of a process: its time goes to compile_s, not training time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.compile_s += now - self.mark
        self.mark = now
        self.untimed_steps += 1
        self.segment_untimed = 1

    def score(self, shard: TokenShard) -> float:
        """The model's mean loss on ``shard``'s fixed evaluation sample (``evaluate``)."""
        return evaluate(self.model, shard, self.r, self.device, self.precision, self.layout)

    def log(self, out, lr: float, grad_norm: torch.Tensor, evaluating: bool, sink) -> dict[str, Any]:
        run, done = self.run, self.step
        loss = self.layout.mean(out.loss.item())  # the one host sync of a logged step
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"{run.run_id}: loss is {loss} at step {done}; the run is stopped")
        row = {
            "step": done,
            "tokens": done * run.tokens_per_step,
            "flops": done * run.tokens_per_step * run.flops_per_token,
            "lr": lr,
            "loss": loss,
            "aux_loss": self.layout.mean(out.aux_loss.item()),
            "grad_norm": float(grad_norm),
            "elapsed_s": self.elapsed,
            "tokens_per_s": (done - self.start_step - self.segment_untimed)
            * run.tokens_per_step
            / max(self.elapsed - self.resumed_at, 1e-9),
            **host_load.sample(),  # how busy the host was: its training time is judged by it (plausibility)
        }
        if run.model.moe is not None:
            row["routing"] = routing_summary(self.model, self.layout)
        if evaluating:
            self.val_loss = row["val_loss"] = self.score(self.val_shard)
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        if self.events is not None:
            self.events.write(row)
        return row

    def fit(self, stop_after: int | None = None) -> None:
        run = self.run
        log_every = max(1, run.steps // 200)
        progress = open_progress(run.run_id, run.steps, self.step, self.progress)
        if self.tensorboard and self.step < run.steps:
            self.events = TensorBoardLog(self.out_dir / TENSORBOARD_DIR, self.step)
        self.start_step, self.mark = self.step, time.perf_counter()
        self.segment_untimed = 0
        self.model.train()
        self.meter.start()  # counter at start and end: the run's GPU energy, evaluation included
        try:
            self._loop(stop_after, log_every, progress)
        except BaseException:
            self.meter.stop()  # ends the sampler; this segment's energy is in the checkpoint
            raise
        finally:
            progress.close()
            if self.events is not None:
                self.events.close()
        self.save()
        self.energy_window = combine_across_ranks(self.meter.stop())
        self.energy_j = self._energy_total(self.energy_window.energy_j)

    def _loop(self, stop_after: int | None, log_every: int, progress) -> None:
        run, r = self.run, self.r
        with self.layout.sink(self.metrics_path) as sink:
            while self.step < run.steps:
                out, lr, grad_norm = self.train_step()
                if self.precision.compile and self.segment_untimed == 0:
                    self._set_compilation_apart()
                evaluating = self.step % r.eval_every == 0 or self.step == run.steps
                row = None
                if self.step % log_every == 0 or evaluating:
                    self.tick()
                    row = self.log(out, lr, grad_norm, evaluating, sink)
                    self.mark = time.perf_counter()  # logging and evaluation are not training time
                progress.update(self.step, row)
                if self.step < run.steps and (self.step % r.checkpoint_every == 0 or self.step == stop_after):
                    self.tick()
                    self.save()
                    self.mark = time.perf_counter()
                    if self.step == stop_after:
                        raise Stopped(
                            f"{run.run_id}: stopped after step {self.step} of {run.steps}; run again to resume"
                        )

    def record(self) -> dict[str, Any]:
        """record.json's fields (harness.train.record), once the run reached its last step."""
        run = self.run
        rows = read_metrics(self.metrics_path, self.study.path)
        if not rows or rows[-1].get("step") != run.steps:
            raise DamagedFile(self.metrics_path, f"its last row is not step {run.steps}", self._damaged_remedy())
        final = rows[-1]
        if self.val_loss is None:  # resumed from the final checkpoint of a run killed before its record
            self.val_loss = final.get("val_loss") or self.score(self.val_shard)
        return run_record(self, rows)
