# Batch generation over the held-out records, for the base and the fine-tuned model.


rule evaluate:
    input:
        model=evaluated_model,
        eval=f"{CONVERTED}/eval.jsonl",
        images=DATASET_DIR,
    output:
        predictions=report(
            PREDICTIONS,
            caption="../report/evaluation.rst",
            category="Evaluation",
            labels={"model": "{variant}", "file": "predictions"},
        ),
        # Written by vlmtune.evaluate (vlmtune.provenance.write_for_evaluation).
        provenance=report(
            f"results/eval/{RUN}/{{variant}}/provenance.json",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"step": "evaluate", "model": "{variant}"},
        ),
    wildcard_constraints:
        variant="base|finetuned",
    params:
        code=code_hash("evaluate"),
        engine=EVAL["engine"],
        generation=json.dumps(GENERATION, sort_keys=True),
        batch_size=EVAL.get("batch_size", 8),
        session_len=EVAL.get("session_len", 8192),
        max_records=(
            f"--max-records {EVAL['max_records']}" if EVAL.get("max_records") else ""
        ),
    log:
        "logs/evaluate_{variant}.log",
    conda:
        (
            "../../envs/lmdeploy.yaml"
            if EVAL["engine"] == "lmdeploy"
            else "../../envs/xtuner.yaml"
        )
    resources:
        gpu=EVAL_GPUS,
        gpu_model=EVAL.get("gpu_model") or "",
        cpus_per_task=EVAL.get("cpus_per_task", 4),
        mem_mb=EVAL.get("mem_mb", 32000),
        runtime=EVAL.get("runtime", 60),
    shell:
        "python_evaluate -m vlmtune.evaluate generate --model {input.model} --eval {input.eval}"
        " --image-folder {input.images} --engine {params.engine}"
        " --generation {params.generation:q} --batch-size {params.batch_size}"
        " --session-len {params.session_len} {params.max_records} --out {output.predictions} > {log} 2>&1"
