rule data:
    """Corpus -> split -> byte-level BPE tokenizer -> memory-mapped token shards."""
    input:
        # What the corpus (and tokenizer file) holds, rewritten only when that changes: an edit to
        # a corpus file reruns this step; a copy without timestamps or a move of data.paths does not.
        corpus=written_input(f"{RESULTS}/data/corpus.json", DRY_RUN, STAND_IN),
    output:
        meta=f"{RESULTS}/data/data.json",
        tokenizer=f"{RESULTS}/data/tokenizer.json",
        shards=expand(f"{RESULTS}/data/{{split}}.bin", split=["train", "validation", "test"]),
    params:
        # The study file is not an input: editing it to add a model must not redo the data.
        # A change to the data section does, through this parameter, less where the files lie
        # (data.paths, data.tokenizer_file): their content is the input above.
        data=data_params(STUDY),
    log:
        f"{RESULTS}/logs/data.log",
    benchmark:
        f"{RESULTS}/benchmarks/data.tsv"
    shell:
        "{PY:q} -m harness data {STUDY_FILE:q} > {log:q} 2>&1"


rule tasks:
    """Offline lm-eval tasks from the held-out split: perplexity and next-line multiple choice."""
    input:
        meta=rules.data.output.meta,
    output:
        meta=f"{RESULTS}/data/tasks/tasks.json",
    params:
        # What the task files depend on: the task-building fields of `eval` and the context.
        spec=repr(
            (
                STUDY.recipe.seq_len,
                STUDY.eval.heldout_max_bytes,
                STUDY.eval.mc_questions,
                STUDY.eval.mc_choices,
                STUDY.eval.mc_context_lines,
            )
        ),
    log:
        f"{RESULTS}/logs/tasks.log",
    benchmark:
        f"{RESULTS}/benchmarks/tasks.tsv"
    shell:
        "{PY:q} -m harness tasks {STUDY_FILE:q} > {log:q} 2>&1"
