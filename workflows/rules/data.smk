rule data:
    """Corpus -> split -> byte-level BPE tokenizer -> memory-mapped token shards."""
    output:
        meta=f"{RESULTS}/data/data.json",
        tokenizer=f"{RESULTS}/data/tokenizer.json",
        shards=expand(f"{RESULTS}/data/{{split}}.bin", split=["train", "validation", "test"]),
    params:
        study=STUDY.path,
        # The study file is not an input: editing it to add a model must not redo the data.
        # A change to the data section does, through this parameter.
        data=repr(STUDY.data),
    log:
        f"{RESULTS}/logs/data.log",
    benchmark:
        f"{RESULTS}/benchmarks/data.tsv"
    shell:
        "{PY} -m harness data {params.study} > {log} 2>&1"
