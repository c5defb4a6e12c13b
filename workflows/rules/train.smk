rule train:
    """One run (model x budget x seed) to its FLOP budget; resumes from its checkpoint."""
    input:
        data=rules.data.output.meta,
        # What the run trains to (model, budget, seed, recipe less its bookkeeping fields),
        # written when the workflow starts and only when it changes: a change to it reruns the
        # run, a change to anything else does not (harness.workflow.snakefile.sync_identities).
        identity=lambda wildcards: written_input(f"{RESULTS}/runs/{wildcards.run}/identity.json", DRY_RUN, STAND_IN),
    output:
        record=f"{RESULTS}/runs/{{run}}/record.json",
    # A CPU study may ask for fewer threads per run, so that several runs train at once; a run
    # over WORLD processes (parallel.data) takes that many times the threads, or GPUs.
    threads: TRAIN_THREADS
    resources:
        gpu=WORLD if USE_GPU else 0,
        # torch threads of each of the WORLD processes
        rank_threads=lambda wildcards, threads: max(1, threads // WORLD),
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}.tsv"
    shell:
        "{PY:q} -m harness.devices {resources.gpu} {LAUNCH} train {STUDY_FILE:q} --run {wildcards.run:q}"
        " --threads {resources.rank_threads} {RESTART_FLAG} > {log:q} 2>&1"


# A run another study of this project finished the same (identity and data, token for token) is
# brought in instead of trained (harness.workflow.reuse): a copied or extended study trains only its new
# runs, and `snakemake -n` lists those under `train`, the others under `reuse`.
ruleorder: reuse > train


rule reuse:
    """A finished run of another study with this run's identity and data, linked in, not trained."""
    input:
        data=rules.data.output.meta,
        source=lambda wildcards: reusable(wildcards.run),
    output:
        record=f"{RESULTS}/runs/{{run}}/record.json",
    params:
        source=lambda wildcards, input: str(Path(input.source).parent),
    log:
        f"{RESULTS}/logs/reuse/{{run}}.log",
    shell:
        "{PY:q} -m harness.reuse {STUDY_FILE:q} --run {wildcards.run:q} --from {params.source:q} {REUSE_FLAG}"
        " > {log:q} 2>&1"
