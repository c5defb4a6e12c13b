#!/usr/bin/env bash
# `make test-cluster`: the tiny study's data step and its two training runs go through
# profiles/slurm (snakemake-executor-plugin-slurm, one sbatch job each) on a one-node SLURM
# started here, and their records must give the losses of a local run.
#
# Runs as root. Where SLURM or munge is missing, Debian's slurm-wlm and munge are installed with
# apt-get. The cluster is private to the test: its own munged (own key and socket), slurmctld and
# slurmd (own ports, own configuration through SLURM_CONF), all state, logs and the workflow's
# working directory in one temporary folder. A SLURM or munge already running on the machine is
# neither used nor touched. On exit, whatever the outcome, the jobs are cancelled, the daemons
# stopped and the folder removed (KEEP=1 keeps it); the test fails if a daemon it started lives on.
#
#   workflows/cluster/test_cluster.sh          # what `make test-cluster` runs
#   VENV=/path/to/venv workflows/cluster/...   # another environment (default: .venv)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=$(cd "${VENV:-$ROOT/.venv}" 2>/dev/null && pwd) || VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
STUDY=tiny
PARTITION=moetest
DAEMONS=(munged slurmctld slurmd slurmstepd)
started=$(date +%s)

say() { echo "== $*"; }
fail() {
    echo "test-cluster: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "needs root: slurmd starts jobs as their user, and SLURM may need installing"
[ -x "$PY" ] || fail "no Python at $PY: run make install first (or set VENV)"
# The study's own runs (its plan), so that a change of the study file cannot leave this test behind.
mapfile -t RUNS < <(cd "$ROOT" && "$PY" -c "
from harness.study.runs import plan
from harness.study.spec import load_study
print(*(run.run_id for run in plan(load_study('$STUDY'))), sep='\n')")
[ "${#RUNS[@]}" -ge 1 ] || fail "study $STUDY plans no runs"
"$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null ||
    fail "snakemake-executor-plugin-slurm is not installed in $VENV: run make install"

# --- SLURM and munge from Debian, if missing. policy-rc.d keeps the packages from starting
# their daemons (where the file exists already, as in most containers, it is left alone).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
    ! command -v munged >/dev/null || ! command -v mungekey >/dev/null; then
    command -v apt-get >/dev/null || fail "SLURM or munge is missing and there is no apt-get to install them"
    say "installing slurm-wlm and munge (apt-get)"
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    status=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null; } || status=$?
    [ -z "$made_policy" ] || rm -f "$policy"
    [ "$status" = 0 ] || fail "apt-get install slurm-wlm munge failed"
fi
say "$(slurmctld -V), $(munged -V 2>&1 | awk '{print $1; exit}')"

TMP=$(mktemp -d -t moe-slurm.XXXXXX)
chmod 755 "$TMP"
mkdir -p "$TMP"/{bin,munge,state,spool,project}
export SLURM_CONF=$TMP/slurm.conf

# The test's own daemons and job steps, alive (not zombies): they carry its SLURM_CONF in their
# environment. Others of the same names belong to someone else and are never touched.
ours() {
    local name pid
    for name in "${DAEMONS[@]}"; do
        for pid in $(pgrep -x "$name"); do
            [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] &&
                tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" &&
                echo "$pid"
        done
    done
    return 0
}
# Inside a job, the plugin starts the rule with srun, after clearing every SLURM_* variable:
# SLURM_CONF included. A real cluster's srun finds /etc/slurm/slurm.conf; this one's finds the
# test's configuration through a wrapper first on the PATH (sbatch passes the PATH on).
printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$SLURM_CONF" "$(command -v srun)" >"$TMP/bin/srun"
chmod 755 "$TMP/bin/srun"
export PATH=$TMP/bin:$PATH

# The jobs, then the daemons, then the folder; fails if a daemon started here is still alive.
cleanup() {
    local rc=$? pid left
    trap - EXIT INT TERM
    set +e
    # Snakemake may hang on SIGTERM while it has jobs out (seen with plugin 2.8): 10 s, then
    # SIGKILL; the scancel below takes care of its jobs either way.
    if [ -n "${snakemake:-}" ]; then
        kill "$snakemake" 2>/dev/null
        for _ in $(seq 20); do
            kill -0 "$snakemake" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "$snakemake" 2>/dev/null
        wait "$snakemake" 2>/dev/null
    fi
    if [ -s "$TMP/slurmctld.pid" ]; then
        scancel --full --quiet --partition "$PARTITION" 2>/dev/null || true
        for _ in $(seq 30); do
            [ -z "$(squeue -h -t running,pending,completing -o %i 2>/dev/null)" ] && break
            sleep 1
        done
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    for name in slurmd slurmctld munged; do
        pid=$(cat "$TMP/$name.pid" 2>/dev/null)
        [ -n "$pid" ] && ours | grep -qx "$pid" || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    for _ in $(seq 10); do
        left=$(ours | xargs)
        [ -z "$left" ] && break
        sleep 0.5
    done
    if [ -n "$left" ]; then
        echo "test-cluster: still running after shutdown: $(ps -o pid=,comm= -p "${left// /,}" | tr '\n' ' ')" >&2
        kill -9 $left 2>/dev/null
        rc=1
    else
        say "SLURM shut down; no slurmctld, slurmd, slurmstepd or munged of the test is left"
    fi
    if [ "$rc" != 0 ]; then
        for log in "$TMP"/slurmctld.log "$TMP"/slurmd.log "$TMP"/project/.snakemake/slurm_logs/*/*.log \
            "$TMP"/project/.snakemake/slurm_logs/*/*/*.log \
            "$TMP"/project/results/$STUDY/logs/*.log "$TMP"/project/results/$STUDY/logs/*/*.log; do
            [ -f "$log" ] && { echo "--- ${log#"$TMP"/}"; tail -n 25 "$log"; }
        done
    fi
    if [ -n "${KEEP:-}" ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
    echo "test-cluster took $(($(date +%s) - started)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- munge: a key and a daemon of the test's own.
mungekey --create --keyfile "$TMP/munge/munge.key" >/dev/null
chmod 600 "$TMP/munge/munge.key"
munged --socket="$TMP/munge/socket" --key-file="$TMP/munge/munge.key" --pid-file="$TMP/munged.pid" \
    --log-file="$TMP/munge/munged.log" --seed-file="$TMP/munge/seed"
munge -n -S "$TMP/munge/socket" | unmunge -S "$TMP/munge/socket" >/dev/null || fail "munged does not answer"

# --- slurm.conf: this machine as the one node, with its CPUs and a little less than its memory,
# no GPUs; free ports, so that a SLURM already here is not disturbed.
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
read -r ctld_port slurmd_port < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))')
cat >"$SLURM_CONF" <<EOF
ClusterName=moetest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$TMP/munge/socket
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
SlurmctldPidFile=$TMP/slurmctld.pid
SlurmdPidFile=$TMP/slurmd.pid
SlurmctldLogFile=$TMP/slurmctld.log
SlurmdLogFile=$TMP/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Finished jobs stay visible to squeue (the status command here, with no accounting for sacct).
MinJobAge=900
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld
slurmd
for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "$state" = idle ] || fail "the node did not come up (state: '${state:-none}')"
say "SLURM up: node $host ($cpus CPUs, $mem_mb MB), partition $PARTITION, ports $ctld_port/$slurmd_port"

# --- The workflow, from this checkout, in the temporary folder; every job through sbatch.
# Outer SLURM settings (a job's, the user's) are cleared; the partition then comes as a user's
# would, from SBATCH_PARTITION. There are no accounts here (--slurm-no-account), and with no
# accounting daemon sacct cannot answer: job states come from squeue.
say "snakemake --workflow-profile profiles/slurm: data and ${#RUNS[@]} training runs"
targets=("results/$STUDY/data/data.json")
for run in "${RUNS[@]}"; do targets+=("results/$STUDY/runs/$run/record.json"); done
# In the background, so that a signal to this script stops it at once (cleanup ends it first).
(
    cd "$TMP/project"
    for var in $(compgen -e | grep -E '^(SBATCH|SLURM|SRUN|SALLOC)_' | grep -vx SLURM_CONF); do unset "$var"; done
    SBATCH_PARTITION=$PARTITION exec "$VENV/bin/snakemake" --snakefile "$ROOT/Snakefile" \
        --workflow-profile "$ROOT/profiles/slurm" --config study=$STUDY \
        --slurm-status-command squeue --slurm-no-account --slurm-init-seconds-before-status-checks 5 \
        --latency-wait 5 "${targets[@]}"
) &
snakemake=$!
wait "$snakemake"
snakemake=

# --- Every step ran as a SLURM job, on the CPU only, and finished.
say "SLURM jobs"
scontrol show job --oneliner >"$TMP/jobs.txt"
"$PY" - "$TMP/jobs.txt" "$PARTITION" "${RUNS[@]}" <<'EOF'
import re
import sys

path, partition, *runs = sys.argv[1:]
jobs = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in open(path) if line.strip()]
for j in jobs:
    print(f"  {j['JobId']:>3} {j['Comment']:<45} {j['JobState']:<10} {j['Partition']} {j['TRES']}")
rules = [j["Comment"] for j in jobs]
wanted = ["rule_data", *(f"rule_train_wildcards_{run}" for run in runs)]
missing = [w for w in wanted if w not in rules]
assert not missing, f"no SLURM job for {missing}"
bad = [j["JobId"] for j in jobs if j["JobState"] != "COMPLETED"]
assert not bad, f"jobs not COMPLETED: {bad}"
assert all(j["Partition"] == partition for j in jobs), "a job left the partition given in SBATCH_PARTITION"
gpu = [j["JobId"] for j in jobs if "gpu" in j["TRES"] + j.get("TresPerNode", "") + j.get("TresPerJob", "")]
assert not gpu, f"jobs of a CPU study asked for a GPU: {gpu}"
EOF

# --- The losses equal a local run's: this checkout's results/tiny when it has the runs (as after
# `make study STUDY=tiny`), the shipped reference otherwise. Same code, data and threads on the
# same machine give the same bits; 1e-6 relative leaves room for nothing more than printing.
say "losses against a local run"
"$PY" - "$ROOT" "$TMP/project" "$STUDY" "${RUNS[@]}" <<'EOF'
import json
import math
import sys
from pathlib import Path

root, project, study, *runs = sys.argv[1:]
summary = Path(root, "results/reference/cpu", study, "summary.json")
failed = []
for run in runs:
    got = json.loads(Path(project, "results", study, "runs", run, "record.json").read_text())
    local = Path(root, "results", study, "runs", run, "record.json")
    if local.exists():
        want, source = json.loads(local.read_text()), local.relative_to(root)
        keys = ["final_train_loss", "final_val_loss", "tokens", "data_fingerprint"]
    else:
        want, source = json.loads(summary.read_text())["runs"][run], summary.relative_to(root)
        keys = ["final_val_loss"]
    for key in keys:
        a, b = got[key], want[key]
        same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b
        print(f"  {run} {key}: SLURM {a} | {source} {b}{'' if same else '  DIFFERENT'}")
        if isinstance(a, float) and same:
            print(f"    {'identical bits' if a == b else f'relative difference {abs(a - b) / abs(b):.1e}'}")
        if not same:
            failed.append(f"{run} {key}")
if failed:
    sys.exit(f"test-cluster: the SLURM runs differ from the local run in {', '.join(failed)}")
EOF
say "test-cluster passed"
