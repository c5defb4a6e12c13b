rule report:
    """Tables of every run and of dense versus MoE at each budget (Markdown, CSV, HTML)."""
    input:
        records=expand(f"{RESULTS}/runs/{{run}}/record.json", run=RUNS),
        measures=expand(f"{RESULTS}/runs/{{run}}/measure.json", run=RUNS),
        microbench=rules.microbench.output.json,
    output:
        md=f"{RESULTS}/report.md",
        runs_csv=f"{RESULTS}/tables/runs.csv",
        compare_csv=f"{RESULTS}/tables/dense_vs_moe.csv",
        cost_csv=f"{RESULTS}/tables/cost.csv",
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
