rule data:
    """Corpus -> split -> byte-level BPE tokenizer -> memory-mapped token shards."""
    input:
        study=STUDY.path,
    output:
        meta=f"{RESULTS}/data/data.json",
        tokenizer=f"{RESULTS}/data/tokenizer.json",
        shards=expand(f"{RESULTS}/data/{{split}}.bin", split=["train", "validation", "test"]),
    params:
        data=lambda w: repr(STUDY.data),
    log:
        f"{RESULTS}/logs/data.log",
    benchmark:
        f"{RESULTS}/benchmarks/data.tsv"
    shell:
        "{PY} -m harness data {input.study} > {log} 2>&1"
