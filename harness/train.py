"""Train one run of a study to its FLOP budget: step -> log -> eval -> checkpoint.

    harness train tiny --run moe-xs-e8k2_3e12_s0

Tokens = budget / training FLOPs per token (the study's convention); dense and MoE runs of a
seed share the data order and recipe. A killed run resumes from ``checkpoint.pt`` and, on CPU,
finishes with the same numbers as an uninterrupted one. ``record.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from harness.data import TokenShard
from harness.io import atomic_write, read_json, write_json, write_text
from harness.provenance import provenance
from harness.study import Recipe, Run, Schedule, Study
from models.accounting import FlopConvention, count_params, training_flops_per_token
from models.config import dump_config


class NonFiniteLoss(RuntimeError):
    pass


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
    if study.device == "cuda" or (study.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_optimizer(model: torch.nn.Module, r: Recipe) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm weights) do not (nanoGPT's grouping)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=r.lr, betas=(r.beta1, r.beta2), fused=False)


def run_spec(run: Run, study: Study, data_meta: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the run's numbers; its hash guards resumption."""
    return {
        "run_id": run.run_id,
        "model": run.model.to_dict(),
        "budget_flops": run.budget,
        "seed": run.seed,
        "recipe": {k: getattr(v, "value", v) for k, v in study.recipe.__dict__.items()},
        "data_fingerprint": data_meta["fingerprint"],
    }


def _spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model, shard: TokenShard, r: Recipe, device: torch.device, autocast: bool) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in shard.eval_batches(r.eval_batches, r.batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x.to(device), y.to(device))
        total += float(out.loss) * y.numel()
        count += y.numel()
    model.train()
    return total / count


def routing_summary(model) -> list[dict[str, Any]]:
    """Per MoE layer, on the host (call at log steps only: it synchronises)."""
    rows = []
    for s in model.routing_stats():
        load = s.tokens_per_expert.float()
        rows.append(
            {
                "tokens_per_expert": s.tokens_per_expert.tolist(),
                "load_max_over_mean": float(load.max() / load.mean().clamp_min(1e-9)),
                "load_cv": float(load.std(unbiased=False) / load.mean().clamp_min(1e-9)),
                "dropped_fraction": float(s.dropped_fraction),
                "router_entropy": float(s.router_entropy),
                "load_balance_loss": float(s.load_balance_loss),
                "z_loss": float(s.z_loss),
            }
        )
    return rows


def train(
    run: Run,
    study: Study,
    data_dir: Path,
    out_dir: Path,
    threads: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r = study.recipe
    data_meta = read_json(data_dir / "data.json")
    if data_meta["tokenizer"]["vocab_size"] != run.model.vocab_size:
        raise ValueError(
            f"{data_dir / 'data.json'}: tokenizer has {data_meta['tokenizer']['vocab_size']} tokens, "
            f"model {run.model.name} expects {run.model.vocab_size}"
        )
    train_tokens = data_meta["splits"]["train"]["tokens"]
    if run.tokens > train_tokens and not study.data.allow_repetition:
        raise ValueError(
            f"{study.path}: run {run.run_id} needs {run.tokens:,} tokens, the train split holds {train_tokens:,}; "
            "set data.allow_repetition: true or use more data"
        )
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(study)
    autocast = device.type == "cuda"
    spec = run_spec(run, study, data_meta)
    spec_hash = _spec_hash(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "config.yaml", dump_config(run.model))

    torch.manual_seed(run.seed)
    model = run.model.build().to(device)
    opt = make_optimizer(model, r)
    train_shard = TokenShard(data_dir, "train", r.seq_len)
    val_shard = TokenShard(data_dir, "validation", r.seq_len)
    ckpt_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.jsonl"

    start_step, elapsed, metrics = 0, 0.0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("spec_hash") != spec_hash:
            raise ValueError(
                f"{ckpt_path}: checkpoint belongs to another configuration of {run.run_id} "
                f"(spec {state.get('spec_hash')} vs {spec_hash}); delete it to start over"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
        start_step, elapsed = int(state["step"]), float(state["elapsed_s"])
        if metrics_path.exists():
            lines = metrics_path.read_text().splitlines()
            metrics = [json.loads(line) for line in lines if json.loads(line)["step"] <= start_step]
    write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
    resumed_at = elapsed
    step_model = torch.compile(model) if r.compile else model

    def save(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
            "rng_cpu": torch.get_rng_state(),
            "spec_hash": spec_hash,
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        atomic_write(ckpt_path, lambda p: torch.save(state, p))

    log_every = max(1, run.steps // 200)
    bar = tqdm(total=run.steps, initial=start_step, desc=run.run_id, disable=not progress, mininterval=5)
    model.train()
    val_loss = None
    mark = time.perf_counter()

    def tick() -> None:
        """Add the wall time since the last mark to the training time (synchronised on CUDA)."""
        nonlocal elapsed, mark
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed += now - mark
        mark = now

    with metrics_path.open("a") as log:
        for step in range(start_step, run.steps):
            lr = lr_at(step, run.steps, r)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = train_shard.train_batch(step, r.batch_size, run.seed)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = step_model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (out.loss + out.aux_loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_biases()
            done = step + 1
            bar.update(1)
            evaluating = done % r.eval_every == 0 or done == run.steps
            if done % log_every == 0 or evaluating:
                tick()
                loss = out.loss.item()  # the one host sync of a logged step
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"{run.run_id}: loss is {loss} at step {done}; the run is stopped")
                row = {
                    "step": done,
                    "tokens": done * run.tokens_per_step,
                    "flops": done * run.tokens_per_step * run.flops_per_token,
                    "lr": lr,
                    "loss": loss,
                    "aux_loss": out.aux_loss.item(),
                    "grad_norm": float(grad_norm),
                    "elapsed_s": elapsed,
                    "tokens_per_s": (done - start_step) * run.tokens_per_step / max(elapsed - resumed_at, 1e-9),
                }
                if run.model.moe is not None:
                    row["routing"] = routing_summary(model)
                if evaluating:
                    val_loss = evaluate(model, val_shard, r, device, autocast)
                    row["val_loss"] = val_loss
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                mark = time.perf_counter()  # evaluation and logging are not training time
            if done < run.steps and (done % r.checkpoint_every == 0 or done == stop_after):
                tick()
                save(done)
                mark = time.perf_counter()
                if done == stop_after:
                    bar.close()
                    raise Stopped(f"{run.run_id}: stopped after step {done} of {run.steps}; run again to resume")
    bar.close()
    save(run.steps)

    final = json.loads(metrics_path.read_text().splitlines()[-1])
    counts = count_params(run.model)
    record = {
        "run_id": run.run_id,
        "study": study.name,
        "model": run.model.name,
        "arm": "dense" if run.model.moe is None else "moe",
        "experts": None if run.model.moe is None else run.model.moe.experts,
        "top_k": None if run.model.moe is None else run.model.moe.top_k,
        "seed": run.seed,
        "config": run.model.to_dict(),
        "recipe": spec["recipe"],
        "params": counts.__dict__,
        "flop_convention": r.flop_convention.value,
        "flops_per_token": {c.value: training_flops_per_token(run.model, c) for c in FlopConvention},
        "budget_flops": run.budget,
        "steps": run.steps,
        "tokens": run.tokens,
        "flops_spent": run.flops,
        "flops_spent_over_budget": run.flops / run.budget,
        "epochs": run.tokens / train_tokens,
        "final_train_loss": final["loss"],
        "final_val_loss": val_loss,
        "train_seconds": elapsed,
        "tokens_per_s": run.tokens / elapsed,
        "data_fingerprint": data_meta["fingerprint"],
        "spec_hash": spec_hash,
        "provenance": provenance(device),
    }
    write_json(out_dir / "record.json", record)
    return record
