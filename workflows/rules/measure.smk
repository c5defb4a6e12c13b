rule measure:
    """Throughput (train, prefill, decode), MFU, memory and GPU energy of a trained run, its
    training step timed as it trained: the run's own CPU threads (its record.json's), dtype,
    compile, batch and sequence length (harness.measure.throughput)."""
    input:
        record=f"{RESULTS}/runs/{{run}}/record.json",
    output:
        measure=f"{RESULTS}/runs/{{run}}/measure.json",
    params:
        # On a GPU host torch's CPU threads as training's; on a CPU none given: the run's own.
        threads=["--threads", str(GPU_THREADS)] if USE_GPU else [],
    # Every core of a CPU host, though torch uses the run's threads: no other job shares the host
    # while it is timed.
    threads: GPU_THREADS if USE_GPU else workflow.cores
    resources:
        gpu=1 if USE_GPU else 0,
    log:
        f"{RESULTS}/logs/measure/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/measure/{{run}}.tsv"
    shell:
        "MOE_HARNESS_GPUS={resources.gpu} {PY:q} -m harness measure {STUDY_FILE:q} --run {wildcards.run:q}"
        " {params.threads:q} > {log:q} 2>&1"


rule microbench:
    """The MoE FFN against the FLOP-matched dense FFN and the Mixtral block on this device, goals
    recorded, not asserted. The CPU training-step benchmark compiles two models, too slow for this
    stage: `make bench` runs it, and the report shows its results/benchmarks/cpu_training_step.json
    beside this one (harness report --bench)."""
    output:
        json=f"{RESULTS}/microbench/moe_ffn.json",
    params:
        suite=f"{workflow.basedir}/tests/benchmarks/test_moe_ffn.py",
    threads: GPU_THREADS if USE_GPU else workflow.cores
    resources:
        gpu=1 if USE_GPU else 0,
    log:
        f"{RESULTS}/logs/microbench.log",
    benchmark:
        f"{RESULTS}/benchmarks/microbench.tsv"
    shell:
        "{PY:q} -m harness.devices {resources.gpu} {PY:q} -m pytest {params.suite:q} -o addopts='' -p no:cacheprovider"
        " --benchmark-only --no-targets"
        " --benchmark-json={output.json:q} > {log:q} 2>&1"
