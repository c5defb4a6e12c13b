# moe-harness: the table of contents of a study.
#
#   snakemake                          # `full` where CUDA is visible, `tiny` otherwise
#   snakemake --config study=quick     # another study from workflows/studies/
#   snakemake -n                       # what would run
#
# Rules call `harness` verbs; the logic lives in the harness package.

include: "workflows/rules/common.smk"
include: "workflows/rules/data.smk"
include: "workflows/rules/train.smk"
include: "workflows/rules/measure.smk"
include: "workflows/rules/evaluate.smk"
include: "workflows/rules/report.smk"


onsuccess:
    # The first numbers, and where the rest is.
    print(at_a_glance(Path(RESULTS)), file=sys.stderr)


rule all:
    input:
        f"{RESULTS}/report.md",
    default_target: True
