# LoRA merge into an official-format model with XTuner's convert_to_official, then checks.


rule merge_lora:
    input:
        config=XTUNER_CONFIG,
        result=TRAIN_RESULT,
        base=MODEL_DIR,
    output:
        # The folder name keeps "InternVL2": LMDeploy <= 0.9 picks its template by path.
        model=directory(MERGED_MODEL),
        report=f"results/merged/{MODEL_NAME}-{RUN}.merge_report.json",
        # Written by vlmtune.merge (vlmtune.provenance.beside_model).
        provenance=report(
            f"{MERGED_MODEL}.provenance.json",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"step": "merge"},
        ),
    params:
        code=code_hash("merge"),
    log:
        f"logs/{RUN}/merge_lora.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        mem_mb=32000,
        runtime=60,
    shell:
        "python_xtuner -m vlmtune.merge --config {input.config} --train-result {input.result}"
        " --base {input.base} --out {output.model} --report {output.report} > {log} 2>&1"
