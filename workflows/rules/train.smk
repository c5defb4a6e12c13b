rule train:
    """One run (model x budget x seed) to its FLOP budget; resumes from its checkpoint."""
    input:
        data=rules.data.output.meta,
    output:
        record=f"{RESULTS}/runs/{{run}}/record.json",
    params:
        study=STUDY.path,
        # The resolved run: a change to the model, budget, seed or recipe reruns it.
        spec=lambda w: repr((RUNS[w.run].model, RUNS[w.run].budget, RUNS[w.run].seed, STUDY.recipe)),
    # A CPU study may ask for fewer threads per run, so that several runs train at once.
    threads: workflow.cores if USE_GPU else (STUDY.recipe.train_threads or workflow.cores)
    resources:
        gpu=1 if USE_GPU else 0,
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}.tsv"
    shell:
        "{PY} -m harness train {params.study} --run {wildcards.run} --threads {threads} > {log} 2>&1"
