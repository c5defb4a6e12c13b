rule evaluate:
    """lm-eval on the study's tasks (offline unless eval.download): runs/RUN/eval.json."""
    input:
        record=f"{RESULTS}/runs/{{run}}/record.json",
        tasks=rules.tasks.output.meta,
    output:
        eval=f"{RESULTS}/runs/{{run}}/eval.json",
    params:
        settings=essential_json(STUDY.eval),
        # `--config eval_download=true`: fetch hub datasets for the standard tasks
        download="--download" if str(config.get("eval_download", "false")).lower() in ("1", "true", "yes") else "",
    threads: GPU_THREADS if USE_GPU else workflow.cores
    resources:
        gpu=1 if USE_GPU else 0,
    log:
        f"{RESULTS}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}.tsv"
    shell:
        "MOE_HARNESS_GPUS={resources.gpu} {PY:q} -m harness evaluate {STUDY_FILE:q} --run {wildcards.run:q}"
        " --threads {threads} {params.download} > {log:q} 2>&1"


rule routing:
    """What a run's experts specialise in (token category or topic), on held-out tokens."""
    input:
        record=f"{RESULTS}/runs/{{run}}/record.json",
        data=rules.data.output.meta,
    output:
        routing=f"{RESULTS}/runs/{{run}}/routing.json",
    threads: GPU_THREADS if USE_GPU else workflow.cores
    resources:
        gpu=1 if USE_GPU else 0,
    log:
        f"{RESULTS}/logs/routing/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/routing/{{run}}.tsv"
    shell:
        "MOE_HARNESS_GPUS={resources.gpu} {PY:q} -m harness routing {STUDY_FILE:q} --run {wildcards.run:q}"
        " --threads {threads} > {log:q} 2>&1"
