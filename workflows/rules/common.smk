import sys

from harness.study import analysed, load_study, plan
from harness.train import pick_device
from harness.workflow import choose_study

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
