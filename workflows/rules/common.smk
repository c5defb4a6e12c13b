import sys

from pathlib import Path

from harness.study import analysed, load_study, plan
from harness.train import pick_device
from harness.workflow import at_a_glance, choose_study, data_params, essential_json, guard_retraining, sync_identities

STUDY_NAME, STUDY_REASON = choose_study(config.get("study"))
STUDY = load_study(STUDY_NAME)  # schema + typed validation: a bad study stops here
RUNS = {run.run_id: run for run in plan(STUDY)}
# Evaluated, measured and routing-analysed: study.analysed_runs (default every run).
ANALYSED = [run.run_id for run in analysed(STUDY, list(RUNS.values()))]
RESULTS = f"results/{STUDY.name}"
PY = sys.executable
USE_GPU = pick_device(STUDY).type == "cuda"
print(f"moe-harness: study '{STUDY.name}' ({STUDY_REASON}); {len(RUNS)} runs", file=sys.stderr)


wildcard_constraints:
    run="|".join(RUNS),

# Finished work is never deleted silently. Each run's identity.json, an input of its training,
# is written only when what the run trains to changes. A change that concerns a finished or
# started run stops the workflow here, naming the runs and fields, unless `--config
# retrain=stale` says to replace them.
RETRAIN = config.get("retrain")
if RETRAIN not in (None, "stale"):
    raise ValueError(f"--config retrain={RETRAIN}: the only value is 'stale'")
STUDY_FILE = STUDY.path
# Not a parameter of the train rule: it must not make the next plain run retrain anything.
RESTART_FLAG = "--restart-if-changed" if RETRAIN == "stale" else ""
sync_identities(STUDY, list(RUNS.values()), Path(RESULTS), RETRAIN == "stale")


onstart:
    guard_retraining(workflow, STUDY, list(RUNS.values()), Path(RESULTS), RETRAIN)
