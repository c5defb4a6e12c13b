rule report:
    """Tables of every run, dense versus MoE, cost and lm-eval results; downstream figure."""
    input:
        records=expand(f"{RESULTS}/runs/{{run}}/record.json", run=RUNS),
        measures=expand(f"{RESULTS}/runs/{{run}}/measure.json", run=RUNS),
        evals=expand(f"{RESULTS}/runs/{{run}}/eval.json", run=RUNS),
        microbench=rules.microbench.output.json,
    output:
        md=f"{RESULTS}/report.md",
        runs_csv=f"{RESULTS}/tables/runs.csv",
        compare_csv=f"{RESULTS}/tables/dense_vs_moe.csv",
        cost_csv=f"{RESULTS}/tables/cost.csv",
        eval_csv=f"{RESULTS}/tables/eval.csv",
        microbench_csv=f"{RESULTS}/tables/microbench.csv",
        runs_html=report(
            f"{RESULTS}/tables/runs.html",
            caption="../report/runs.rst",
            category="Tables",
            labels={"table": "runs"},
        ),
        compare_html=report(
            f"{RESULTS}/tables/dense_vs_moe.html",
            caption="../report/dense_vs_moe.rst",
            category="Tables",
            labels={"table": "dense vs MoE"},
        ),
        cost_html=report(
            f"{RESULTS}/tables/cost.html",
            caption="../report/cost.rst",
            category="Tables",
            labels={"table": "cost"},
        ),
        eval_html=report(
            f"{RESULTS}/tables/eval.html",
            caption="../report/eval.rst",
            category="Tables",
            labels={"table": "downstream evaluation"},
        ),
        downstream_png=report(
            f"{RESULTS}/figures/downstream_vs_loss.png",
            caption="../report/downstream_vs_loss.rst",
            category="Figures",
            labels={"figure": "downstream vs validation loss"},
        ),
        microbench_html=report(
            f"{RESULTS}/tables/microbench.html",
            caption="../report/microbench.rst",
            category="Tables",
            labels={"table": "MoE FFN micro-benchmark"},
        ),
    params:
        study=STUDY.path,
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    shell:
        "{PY} -m harness report {params.study} --microbench {input.microbench} > {log} 2>&1"
