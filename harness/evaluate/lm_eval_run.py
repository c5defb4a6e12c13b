"""Evaluate one trained run with lm-eval on the study's tasks; write runs/RUN/eval.json.

    harness evaluate tiny --run dense-d64_7e12_s0

Each task runs on its own through ``lm_eval.simple_evaluate`` with our ``moe-harness`` model,
so one that cannot be loaded (a hub dataset on a machine without network) is recorded under
``not_run`` with the reason while the others run. The local held-out tasks must run: their
failure is an error. Downloads are off unless the study's ``eval.download`` is true; lm-eval
then reads only what the local Hugging Face cache already holds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from harness.core.io import read_json
from harness.study.spec import LOCAL_TASKS, EvalConfig

log = logging.getLogger(__name__)

BOOTSTRAP_ITERS = 1000  # stderr of perplexity metrics is bootstrapped over documents
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def go_offline() -> None:
    """Forbid hub downloads for this process. Must run before datasets / huggingface_hub are
    imported: they read these variables once, at import."""
    os.environ.update(OFFLINE_ENV)


def _metrics(task_results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's 'metric,filter' keys -> 'metric' (filter kept when it is not 'none')."""
    out = {}
    for key, value in task_results.items():
        if key == "alias":
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric}[{filt}]"] = value if value != "N/A" else None
    return out


def eval_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device type, dtype) an evaluation runs in, as the model resolves them: CUDA when visible
    unless ``device`` says otherwise; bfloat16 there and float32 on a CPU unless ``dtype`` says."""
    import torch

    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return kind, dtype or ("bfloat16" if kind == "cuda" else "float32")


def eval_inputs(
    cfg: EvalConfig,
    checkpoint_sha256: str | None,
    data_fingerprint: str | None,
    tasks: dict[str, Any] | None,
    device: str,
    dtype: str,
) -> dict[str, Any]:
    """What the numbers of an evaluation depend on, eval.json's ``inputs``: the checkpoint by its
    recorded SHA-256, the data by fingerprint, the eval settings, the local tasks' files by their
    fingerprint (``tasks``: tasks.json; None where no local task runs), the device type and dtype,
    lm-eval's version and the bootstrap. A reused run's evaluation is taken from the study it came
    from only when these are the same (harness.workflow.reuse)."""
    from importlib.metadata import version

    local = any(t in LOCAL_TASKS for t in cfg.tasks)
    return {
        "checkpoint_sha256": checkpoint_sha256,
        "data_fingerprint": data_fingerprint,
        "eval": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.__dict__.items()},
        "tasks_fingerprint": (tasks or {}).get("fingerprint") if local else None,
        "device": device,
        "dtype": dtype,
        "lm_eval_version": version("lm_eval"),
        "bootstrap_iters": BOOTSTRAP_ITERS,
    }


def evaluate_run(
    run_dir: Path,
    tasks_dir: Path,
    cfg: EvalConfig,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Run every task of ``cfg`` on the run's checkpoint; the contents of eval.json."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from harness.evaluate.lm_eval_model import HarnessLM

    if not (tasks_dir / "tasks.json").is_file():
        raise FileNotFoundError(f"{tasks_dir / 'tasks.json'} does not exist; run `harness tasks STUDY` first")
    lm = HarnessLM(checkpoint=str(run_dir), device=device, dtype=dtype, batch_size=cfg.batch_size)
    manager = TaskManager(include_path=str(tasks_dir))
    known = set(manager.all_tasks)
    results: dict[str, dict[str, Any]] = {}
    not_run: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for task in cfg.tasks:
        if task not in known:
            not_run[task] = "lm-eval has no task, group or tag of this name"
            continue
        start = time.perf_counter()
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                task_manager=manager,
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
            )
        except Exception as e:
            if task in LOCAL_TASKS:
                raise
            not_run[task] = f"{type(e).__name__}: {e}".strip()[:500]
            log.warning("task %s not run: %s", task, not_run[task])
            continue
        seconds[task] = time.perf_counter() - start
        for name, task_results in out["results"].items():
            results[name] = _metrics(task_results) | {
                "n_samples": out.get("n-samples", {}).get(name, {}).get("effective"),
                "version": out.get("versions", {}).get(name),
                "num_fewshot": out.get("n-shot", {}).get(name),
            }
    return {
        "tasks": results,
        "not_run": not_run,
        "seconds": seconds,
        "settings": {
            "tasks": list(cfg.tasks),
            "batch_size": cfg.batch_size,
            "limit": cfg.limit,
            "num_fewshot": cfg.num_fewshot,
            "download": cfg.download,
            "bootstrap_iters": BOOTSTRAP_ITERS,
        }
        | lm.get_model_info(),
        "local_tasks": read_json(tasks_dir / "tasks.json"),
        "lm_eval_version": lm_eval.__version__,
        "device": str(lm.device),
    }
