# `--config eval_download=true`: fetch hub datasets for the standard tasks
EVAL_DOWNLOAD = "--download" if str(config.get("eval_download", "false")).lower() in ("1", "true", "yes") else ""


rule evaluate:
    """lm-eval on the study's tasks (offline unless eval.download): runs/RUN/eval.json."""
    input:
        record=f"{RESULTS}/runs/{{run}}/record.json",
        tasks=rules.tasks.output.meta,
    output:
        eval=f"{RESULTS}/runs/{{run}}/eval.json",
    params:
        settings=essential_json(STUDY.eval),
        download=EVAL_DOWNLOAD,
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


# A reused run's eval.json and routing.json come from the study it came from where that study made
# them of the same checkpoint, data, settings and device (harness.workflow.reuse): `snakemake -n`
# lists them under reuse_eval and reuse_routing. The job checks the file again and, where anything
# differs, evaluates (analyses) as the plain rule does; measure always runs again.
ruleorder: reuse_eval > evaluate
ruleorder: reuse_routing > routing


rule reuse_eval:
    """The eval.json of a reused run, from the study it came from, checked: lm-eval only where it differs."""
    input:
        record=f"{RESULTS}/runs/{{run}}/record.json",
        tasks=rules.tasks.output.meta,
        source=lambda wildcards: reusable_result(wildcards.run, "eval.json", download=bool(EVAL_DOWNLOAD)),
    output:
        eval=f"{RESULTS}/runs/{{run}}/eval.json",
    params:
        settings=essential_json(STUDY.eval),
        download=EVAL_DOWNLOAD,
    threads: GPU_THREADS if USE_GPU else workflow.cores
    resources:
        gpu=1 if USE_GPU else 0,
    log:
        f"{RESULTS}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}.tsv"
    shell:
        "MOE_HARNESS_GPUS={resources.gpu} {PY:q} -m harness evaluate {STUDY_FILE:q} --run {wildcards.run:q}"
        " --threads {threads} {params.download} --reuse {input.source:q} > {log:q} 2>&1"


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


rule reuse_routing:
    """The routing.json of a reused run, from the study it came from, checked: analysed only where it differs."""
    input:
        record=f"{RESULTS}/runs/{{run}}/record.json",
        data=rules.data.output.meta,
        source=lambda wildcards: reusable_result(wildcards.run, "routing.json"),
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
        " --threads {threads} --reuse {input.source:q} > {log:q} 2>&1"
