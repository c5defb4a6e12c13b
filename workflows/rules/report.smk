from harness.report.html import section_labels

# `snakemake --report report.html` opens on workflow.rst: the study, "At a glance" and "Claims"
# as report.md writes them, and a link to the whole report. Its Results list, each in report.md's
# order: Contents (report.html, then one page per section), Figures, and Tables (CSV) to download.
# The tables are shown from report.md, never re-parsed, so every number reads as written there.
report: "../report/workflow.rst"


rule report:
    """The report: claims, tables (Markdown, CSV, HTML), figures and report.html of the whole study."""
    input:
        records=expand(f"{RESULTS}/runs/{{run}}/record.json", run=RUNS),
        measures=expand(f"{RESULTS}/runs/{{run}}/measure.json", run=ANALYSED),
        evals=expand(f"{RESULTS}/runs/{{run}}/eval.json", run=ANALYSED),
        routing=expand(f"{RESULTS}/runs/{{run}}/routing.json", run=ANALYSED),
        microbench=rules.microbench.output.json,
        pooled=pool_files(STUDY),  # other studies' runs in the law (the study's `pool:`)
    output:
        md=f"{RESULTS}/report.md",
        summary=f"{RESULTS}/summary.json",
        html=report(
            f"{RESULTS}/report.html",
            caption="../report/report_html.rst",
            category="Contents",
            labels={"#": "00", "section": "the whole report"},
        ),
        sections=report(
            directory(f"{RESULTS}/report_sections"),
            patterns=["{no,\\d+}-{section}.html"],
            caption="../report/section.rst",
            category="Contents",
            labels=lambda wildcards: section_labels(f"{RESULTS}/report_sections", wildcards),
        ),
        main_csv=report(
            f"{RESULTS}/tables/main.csv",
            caption="../report/main.rst",
            category="Tables (CSV)",
            labels={"#": "01", "table": "at a glance"},
        ),
        claims_csv=report(
            f"{RESULTS}/tables/claims.csv",
            caption="../report/claims.rst",
            category="Tables (CSV)",
            labels={"#": "02", "table": "claims"},
        ),
        runs_csv=report(
            f"{RESULTS}/tables/runs.csv",
            caption="../report/runs.rst",
            category="Tables (CSV)",
            labels={"#": "03", "table": "runs"},
        ),
        dense_vs_moe_csv=report(
            f"{RESULTS}/tables/dense_vs_moe.csv",
            caption="../report/dense_vs_moe.rst",
            category="Tables (CSV)",
            labels={"#": "04", "table": "dense vs MoE"},
        ),
        seeds_csv=report(
            f"{RESULTS}/tables/seeds.csv",
            caption="../report/seeds.rst",
            category="Tables (CSV)",
            labels={"#": "05", "table": "dense vs MoE over seeds"},
        ),
        joint_law_csv=report(
            f"{RESULTS}/tables/joint_law.csv",
            caption="../report/joint_law.rst",
            category="Tables (CSV)",
            labels={"#": "06", "table": "joint law: active versus total"},
        ),
        law_forms_csv=report(
            f"{RESULTS}/tables/law_forms.csv",
            caption="../report/law_forms.rst",
            category="Tables (CSV)",
            labels={"#": "06b", "table": "where total parameters act: the law's forms"},
        ),
        forecast_csv=report(
            f"{RESULTS}/tables/forecast.csv",
            caption="../report/forecast.rst",
            category="Tables (CSV)",
            labels={"#": "02b", "table": "registered forecast, scored"},
        ),
        published_laws_csv=report(
            f"{RESULTS}/tables/published_laws.csv",
            caption="../report/published_laws.rst",
            category="Tables (CSV)",
            labels={"#": "07", "table": "published laws (Clark et al. 2022)"},
        ),
        effective_params_csv=report(
            f"{RESULTS}/tables/effective_params.csv",
            caption="../report/effective_params.rst",
            category="Tables (CSV)",
            labels={"#": "08", "table": "effective parameters (Clark)"},
        ),
        compute_multiplier_csv=report(
            f"{RESULTS}/tables/compute_multiplier.csv",
            caption="../report/compute_multiplier.rst",
            category="Tables (CSV)",
            labels={"#": "09", "table": "compute multiplier"},
        ),
        isoflop_csv=report(
            f"{RESULTS}/tables/isoflop.csv",
            caption="../report/isoflop.rst",
            category="Tables (CSV)",
            labels={"#": "10", "table": "IsoFLOP optima"},
        ),
        krajewski_csv=report(
            f"{RESULTS}/tables/krajewski.csv",
            caption="../report/krajewski.rst",
            category="Tables (CSV)",
            labels={"#": "11", "table": "Krajewski et al. 2024 cross-check"},
        ),
        cost_csv=report(
            f"{RESULTS}/tables/cost.csv",
            caption="../report/cost.rst",
            category="Tables (CSV)",
            labels={"#": "12", "table": "cost"},
        ),
        microbench_csv=report(
            f"{RESULTS}/tables/microbench.csv",
            caption="../report/microbench.rst",
            category="Tables (CSV)",
            labels={"#": "13", "table": "MoE FFN micro-benchmark"},
        ),
        routing_health_csv=report(
            f"{RESULTS}/tables/routing_health.csv",
            caption="../report/routing_health.rst",
            category="Tables (CSV)",
            labels={"#": "14", "table": "routing health"},
        ),
        specialisation_csv=report(
            f"{RESULTS}/tables/specialisation.csv",
            caption="../report/specialisation.rst",
            category="Tables (CSV)",
            labels={"#": "15", "table": "expert specialisation"},
        ),
        eval_csv=report(
            f"{RESULTS}/tables/eval.csv",
            caption="../report/eval.rst",
            category="Tables (CSV)",
            labels={"#": "16", "table": "downstream evaluation"},
        ),
        reproduction_csv=report(
            f"{RESULTS}/tables/reproduction.csv",
            caption="../report/reproduction.rst",
            category="Tables (CSV)",
            labels={"#": "17", "table": "reproduction"},
        ),
        main_html=f"{RESULTS}/tables/main.html",
        claims_html=f"{RESULTS}/tables/claims.html",
        runs_html=f"{RESULTS}/tables/runs.html",
        dense_vs_moe_html=f"{RESULTS}/tables/dense_vs_moe.html",
        seeds_html=f"{RESULTS}/tables/seeds.html",
        joint_law_html=f"{RESULTS}/tables/joint_law.html",
        law_forms_html=f"{RESULTS}/tables/law_forms.html",
        forecast_html=f"{RESULTS}/tables/forecast.html",
        published_laws_html=f"{RESULTS}/tables/published_laws.html",
        effective_params_html=f"{RESULTS}/tables/effective_params.html",
        compute_multiplier_html=f"{RESULTS}/tables/compute_multiplier.html",
        isoflop_html=f"{RESULTS}/tables/isoflop.html",
        krajewski_html=f"{RESULTS}/tables/krajewski.html",
        cost_html=f"{RESULTS}/tables/cost.html",
        microbench_html=f"{RESULTS}/tables/microbench.html",
        routing_health_html=f"{RESULTS}/tables/routing_health.html",
        specialisation_html=f"{RESULTS}/tables/specialisation.html",
        eval_html=f"{RESULTS}/tables/eval.html",
        reproduction_html=f"{RESULTS}/tables/reproduction.html",
        loss_curves_png=report(
            f"{RESULTS}/figures/loss_curves.png",
            caption="../report/fig_loss_curves.rst",
            category="Figures",
            labels={"#": "01", "figure": "loss curves"},
        ),
        loss_vs_params_png=report(
            f"{RESULTS}/figures/loss_vs_params.png",
            caption="../report/fig_loss_vs_params.rst",
            category="Figures",
            labels={"#": "02", "figure": "loss vs parameters"},
        ),
        isoflop_png=report(
            f"{RESULTS}/figures/isoflop.png",
            caption="../report/fig_isoflop.rst",
            category="Figures",
            labels={"#": "03", "figure": "IsoFLOP"},
        ),
        loss_vs_cost_png=report(
            f"{RESULTS}/figures/loss_vs_cost.png",
            caption="../report/fig_loss_vs_cost.rst",
            category="Figures",
            labels={"#": "04", "figure": "loss vs FLOPs, time, energy"},
        ),
        cost_scaling_png=report(
            f"{RESULTS}/figures/cost_scaling.png",
            caption="../report/fig_cost_scaling.rst",
            category="Figures",
            labels={"#": "05", "figure": "memory and throughput"},
        ),
        routing_health_png=report(
            f"{RESULTS}/figures/routing_health.png",
            caption="../report/fig_routing_health.rst",
            category="Figures",
            labels={"#": "06", "figure": "routing health"},
        ),
        specialisation_png=report(
            f"{RESULTS}/figures/specialisation.png",
            caption="../report/fig_specialisation.rst",
            category="Figures",
            labels={"#": "07", "figure": "expert specialisation"},
        ),
        downstream_vs_loss_png=report(
            f"{RESULTS}/figures/downstream_vs_loss.png",
            caption="../report/fig_downstream_vs_loss.rst",
            category="Figures",
            labels={"#": "08", "figure": "downstream vs validation loss"},
        ),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    shell:
        "{PY:q} -m harness report {STUDY_FILE:q} --microbench {input.microbench:q} > {log:q} 2>&1"
