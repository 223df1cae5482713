# vlmtune: QLoRA fine-tuning of InternVL2 with XTuner, merged and evaluated (README.md).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        MERGED_MODEL,
        expand(PREDICTIONS, variant=config["evaluate"]["models"]),
        EVAL_REPORT_HTML,
        EVAL_SUMMARY_PNG,
    default_target: True
