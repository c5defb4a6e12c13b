"""``harness measure``: throughput, MFU, memory and GPU energy of a trained run (STUDY --run RUN_ID)
or of a model config with random weights (--config MODEL.yaml).

    harness measure tiny --run dense-d64_7e12_s0
    harness measure --config models/configs/moe-s-e8k2.yaml --device cuda

A run is measured as it trained: its dtype, torch.compile, batch size, sequence length, CPU threads
(those its record.json states, else ``recipe.train_threads``; ``--threads`` overrides them) and
its own training batches, so that the training tokens/s agrees with the run's own over the whole
run (``harness.measure.throughput``). ``--random-weights`` measures a run whose checkpoint is not
kept (a reference's) with random weights at the same settings: a dense model's speed does not depend
on its weights; an MoE's does through its routing, which is then the initial one, not the trained
one. A config is measured as a recipe with --dtype and --compile would train it, on all cores
unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli.common import (
    POSITIVE,
    at_least,
    cuda_visible,
    out_replaceable,
    set_threads,
    trained_run,
    trained_state,
    up_to_date,
)
from harness.study.spec import Recipe, load_study
from models.config import ConfigError, load_config

HELP = "throughput, MFU, memory and GPU energy of a run or a bare config"
STUDY = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", help="a study name or path (with --run)")
    p.add_argument("--run", help="run id whose checkpoint to measure")
    p.add_argument("--config", help="measure this model config with random weights instead")
    p.add_argument(
        "--random-weights",
        dest="random_weights",
        action="store_true",
        help="with --run: the run's model at its settings with random weights, not its checkpoint (a reference "
        "keeps none); a dense model's speed does not depend on its weights, an MoE's routing is then its initial one",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="with --config (default cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="with --config, as recipe.dtype (auto)")
    p.add_argument("--compile", action="store_true", help="with --config: torch.compile the training step")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument("--out", help="where to write measure.json (default: the run's folder)")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, help="sequences per step (default: the run's)")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE, help="tokens per sequence (default: the run's)")
    p.add_argument("--windows", type=at_least(5), help="timed windows (>= 5)")
    p.add_argument(
        "--threads", type=POSITIVE, help="torch CPU threads (default: a run's own, as it trained; a config: all)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="measure again even when measure.json is up to date; replace any --out file",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from harness.core.cpu_heap import keep_freed_memory
    from harness.core.io import read_json, write_json
    from harness.data.prepare import TokenShard
    from harness.measure.plausibility import training_run
    from harness.measure.throughput import MeasureSettings, measure
    from harness.train.loop import pick_device
    from harness.train.precision import resolve

    settings = MeasureSettings(
        **{k: v for k, v in vars(args).items() if k in MeasureSettings.__dataclass_fields__ and v is not None}
    )
    out_replaceable(args, "train")
    if args.config:
        if args.random_weights:
            raise ConfigError(
                "--random-weights", "goes with STUDY --run RUN_ID; a --config is measured with random weights"
            )
        cuda_visible(args.device)
        cfg, state, device, seed = load_config(args.config), None, torch.device(args.device or "cpu"), 0
        # As a recipe with these settings would train it (dtype auto: bf16 on CUDA, fp32 on a CPU).
        precision = resolve(Recipe(dtype=args.dtype or "auto", compile=args.compile), device)
        out = Path(args.out or f"results/measure/{cfg.name}.json")
        label, extra = {"config": args.config}, {}
    else:
        if not args.study or not args.run:
            raise ConfigError("(command line)", "give STUDY --run RUN_ID, or --config MODEL.yaml")
        if args.dtype or args.compile:
            raise ConfigError("--dtype/--compile", "a run is measured as it trained; these go with --config")
        study = load_study(args.study)
        run, results, run_dir = trained_run(args, study)
        if up_to_date(run_dir / "measure.json", [run_dir / "record.json"], args):
            return 0
        device = pick_device(study)
        state = None if args.random_weights else trained_state(study, run, run_dir)["model"]
        cfg, seed = run.model, run.seed
        precision = resolve(run.recipe, device)
        # The run's own step shape (unless given): what it trained with, and compiled for.
        as_trained = {"seq_len": run.recipe.seq_len}
        if getattr(args, "batch_size", None) is None:
            as_trained["batch_size"] = run.recipe.batch_size
        settings = MeasureSettings(**(settings.__dict__ | as_trained))
        out = Path(args.out) if args.out else run_dir / "measure.json"
        weights = "random (--random-weights)" if args.random_weights else str(run_dir / "checkpoint.pt")
        label = {"study": study.name, "run_id": run.run_id, "checkpoint": weights}
        record = read_json(run_dir / "record.json")
        extra = {"recipe": run.recipe, "trained": training_run(record)}
        if (results / "data" / "train.bin").is_file():  # its own batches, in its data order
            shard = TokenShard(results / "data", "train", settings.seq_len)
            extra["batches"] = lambda step: shard.train_batch(step, settings.batch_size, run.seed)
            extra["batches_from"] = f"the run's training batches from step 0 ({results / 'data'})"
        if args.threads is None and device.type == "cpu":
            args.threads = record.get("precision", {}).get("threads") or run.recipe.train_threads
    set_threads(args.threads)
    if device.type == "cpu":  # the heap as a training process keeps it (harness.core.cpu_heap)
        keep_freed_memory()
    from harness.train.resources import check_memory

    check_memory(cfg, settings.batch_size, settings.seq_len, device, "harness measure")
    result = label | measure(cfg, device, settings, state, seed, precision, **extra)
    write_json(out, result)
    t, m = result["train"], result["mfu"]["conventions"]
    print(
        f"{cfg.name} on {result['device_name']}: train {t['tokens_per_s_median']:,.0f} tokens/s "
        f"[{t['tokens_per_s_min']:,.0f}, {t['tokens_per_s_max']:,.0f}], "
        f"prefill {result['prefill']['tokens_per_s_median']:,.0f}, "
        f"decode b1 {result['decode_batch1']['tokens_per_s_median']:,.0f}, "
        f"detailed FLOPs at {m['detailed']['fraction_of_measured_matmul']:.1%} of the measured matmul -> {out}"
    )
    return 0
