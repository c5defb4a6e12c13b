import re
import shlex
import sys

from pathlib import Path

from harness.analysis.contrast import print_contrast_warning
from harness.data.corpus import sync_corpus
from harness.workflow.disk import CHECK_KEY, guard_disk
from harness.train.parallel import check_workflow
from harness.workflow.reuse import finished_elsewhere, our_data, result_elsewhere
from harness.study.pool import pool_files
from harness.study.runs import analysed, plan
from harness.study.spec import load_study
from harness.train.loop import pick_device
from harness.train.progress import backfill_events
from harness.workflow.snakefile import (
    at_a_glance,
    choose_study,
    data_params,
    dry_run_files,
    essential_json,
    guard_retraining,
    refusals,
    stand_ins,
    sync_identities,
    written_input,
)
from models.config import ConfigError

# A refusal of the study or of --config is its message alone, exit code 2 (harness.workflow.snakefile.refusals).
with refusals():
    # `--config study=` with nothing after it (an unset shell variable) is refused, not taken for `tiny`.
    STUDY_NAME, STUDY_REASON = choose_study(config.get("study"), "study" in config)
    STUDY = load_study(STUDY_NAME)  # schema + typed validation: a bad study stops here
    RUNS = {run.run_id: run for run in plan(STUDY)}
    # Evaluated, measured and routing-analysed: study.analysed_runs (default every run).
    ANALYSED = [run.run_id for run in analysed(STUDY, list(RUNS.values()))]
    RESULTS = f"results/{STUDY.name}"
    # Paths a user chooses (the study file, the Python of a virtual environment, logs) may hold
    # spaces or quotes: every shell command quotes them with `:q`, and LAUNCH, a command line put in
    # as it is, quotes its own.
    PY = sys.executable
    # Whether the study's jobs use GPUs. On a cluster the submitting host may have none: there,
    # `--config device=cuda` says the jobs' nodes do (each job still picks its device itself).
    if config.get("device") not in (None, "cuda"):
        raise ConfigError("device", f"{config['device']} is not allowed; the only value is 'cuda'", "--config")
    USE_GPU = STUDY.device == "cuda" or (
        STUDY.device == "auto" and (config.get("device") == "cuda" or pick_device(STUDY).type == "cuda")
    )
    # GPU jobs at once (`--resources gpu=N` or the profile's), each on devices of its own
    # (harness.train.devices); each takes its share of the cores, so that they run side by side.
    GPUS = workflow.global_resources.get("gpu").value or 1
    GPU_THREADS = max(1, workflow.cores // GPUS)
    print(f"moe-harness: study '{STUDY.name}' ({STUDY_REASON}); {len(RUNS)} runs", file=sys.stderr)


wildcard_constraints:
    run="|".join(map(re.escape, RUNS)),

with refusals():
    # Finished work is never deleted silently. Each run's identity.json, an input of its training,
    # is written only when what the run trains to changes. A change that concerns a finished or
    # started run stops the workflow here, naming the runs and fields, unless `--config
    # retrain=stale` says to replace them.
    RETRAIN = config.get("retrain")
    if RETRAIN not in (None, "stale"):
        raise ConfigError("retrain", f"{RETRAIN} is not allowed; the only value is 'stale'", "--config")
    STUDY_FILE = STUDY.path
    # One process per run, or torchrun with parallel.data of them (harness.train.parallel; through
    # harness.train.launch, which exits with the ranks' own code: 3 for a stopped run): never more
    # than this host has GPUs (or cores, on a CPU), nor than the workflow's gpu resource lets a job
    # take. Jobs sent to other nodes are checked there.
    WORLD = STUDY.parallel.data
    if workflow.local_exec and not workflow.remote_exec:
        check_workflow(WORLD, USE_GPU, workflow.global_resources.get("gpu").value, STUDY.path)
    LAUNCH = (
        f"{shlex.quote(PY)} -m harness"
        if WORLD == 1
        else f"{shlex.quote(PY)} -m harness.launch --standalone --nproc-per-node {WORLD} -m harness --"
    )
    # Threads of a training job: all cores on a GPU host or without recipe.train_threads, else
    # train_threads per process (so that several runs train at once on a CPU).
    TRAIN_THREADS = (
        min(workflow.cores, GPU_THREADS * WORLD)
        if USE_GPU
        else workflow.cores
        if not STUDY.recipe.train_threads
        else min(workflow.cores, STUDY.recipe.train_threads * WORLD)
    )
    # Not a parameter of the train rule: it must not make the next plain run retrain anything.
    RESTART_FLAG = "--restart-if-changed" if RETRAIN == "stale" else ""
    # Nor this: a finished copy of another study's run that changed there is replaced only when asked.
    REUSE_FLAG = "--force" if RETRAIN == "stale" else ""
    # The corpus by content (harness.data.corpus): data/corpus.json, an input of the data rule, changes
    # when what the corpus holds changes, not when it is copied or moved. It is written once the
    # identities are checked, so that a refused change leaves every file as it was.
    # A dry run (`snakemake -n`) writes nothing under results/: where a real run would write
    # corpus.json or an identity.json anew, its job takes a stand-in in a temporary folder, so that the
    # dry run lists the jobs a real run would run.
    DRY_RUN = bool(getattr(workflow.output_settings, "dryrun", False))
    CORPUS = sync_corpus(STUDY, Path(RESULTS), write=False)
    RETRAINED = sync_identities(STUDY, list(RUNS.values()), Path(RESULTS), RETRAIN == "stale", CORPUS, not DRY_RUN)
    if not DRY_RUN:
        sync_corpus(STUDY, Path(RESULTS), content=CORPUS)
    STAND_IN = stand_ins(dry_run_files(list(RUNS.values()), RETRAINED, Path(RESULTS), CORPUS)) if DRY_RUN else {}
    # recipe.tensorboard switched on after runs finished (it retrains nothing): their events are
    # written from their metrics logs now (harness.train.progress.backfill_events).
    backfill_events(RUNS.values(), Path(RESULTS), STUDY.name, write=not DRY_RUN)

    # Finished runs of other studies that this one reuses (harness.workflow.reuse): where a run has none, its
    # reuse job lacks an input and Snakemake trains it (ruleorder: reuse > train).
    OUR_DATA = our_data(STUDY, Path(RESULTS), CORPUS)



def reusable(run_id):
    source = finished_elsewhere(RUNS[run_id], Path(RESULTS), OUR_DATA)
    return str(source / "record.json") if source else f"{RESULTS}/runs/{run_id}/.no-finished-run-to-reuse"


def reusable_result(run_id, name, **given):
    """The eval.json or routing.json a reused run's study made of the same checkpoint, data and
    settings on this device (harness.workflow.reuse.result_elsewhere); where there is none, the
    reuse_eval or reuse_routing job lacks an input and the plain rule makes it."""
    device = "cuda" if USE_GPU else "cpu"
    source = result_elsewhere(STUDY, RUNS[run_id], Path(RESULTS), OUR_DATA, name, device, **given)
    return str(source) if source else f"{RESULTS}/runs/{run_id}/.no-{name}-to-reuse"


onstart:
    with refusals():
        guard_retraining(workflow, STUDY, list(RUNS.values()), Path(RESULTS), RETRAIN)
        # The checkpoints and shards the study still has to write must fit on the disk of RESULTS,
        # with as many runs in training at once as the cores or GPUs allow (harness.workflow.disk);
        # `--config disk_check=off` starts it anyway.
        if not getattr(workflow, "touch", False):
            at_once = max(1, GPUS // WORLD) if USE_GPU else max(1, workflow.cores // TRAIN_THREADS)
            guard_disk(STUDY, list(RUNS.values()), Path(RESULTS), config.get(CHECK_KEY), at_once)
    # Where the study's models moved its primary contrast since the last report (harness.analysis.contrast).
    print_contrast_warning(STUDY, Path(RESULTS).parent, "moe-harness: warning")
