# Batch generation over the held-out records, for the base and the fine-tuned model; the
# teacher-forced loss of every reference; metrics per model; the base vs fine-tuned report.


rule evaluate:
    input:
        model=evaluated_model,
        eval=HELD_OUT,
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
    params:
        code=code_hash("evaluate"),
        engine=EVAL["engine"],
        lmdeploy_backend=EVAL["lmdeploy_backend"],
        generation=json.dumps(GENERATION, sort_keys=True),
        batch_size=EVAL_BATCH_SIZE,
        session_len=EVAL["session_len"],
        max_records=EVAL_MAX_RECORDS,
    log:
        f"logs/{RUN}/evaluate_{{variant}}.log",
    threads: EVAL_THREADS
    conda:
        (
            "../../envs/lmdeploy.yaml"
            if EVAL["engine"] == "lmdeploy"
            else "../../envs/xtuner.yaml"
        )
    resources:
        **EVAL_RESOURCES,
    shell:
        "python_evaluate -m vlmtune.evaluate generate --model {input.model} --eval {input.eval}"
        " --image-folder {input.images} --engine {params.engine} --lmdeploy-backend {params.lmdeploy_backend}"
        " --generation {params.generation:q} --batch-size {params.batch_size}"
        " --session-len {params.session_len} --threads {threads} {params.max_records} --out {output.predictions} > {log} 2>&1"


rule reference_nll:
    input:
        model=evaluated_model,
        eval=HELD_OUT,
        images=DATASET_DIR,
    output:
        REFERENCE_NLL,
    params:
        code=code_hash("reference_nll"),
        max_records=EVAL_MAX_RECORDS,
    log:
        f"logs/{RUN}/reference_nll_{{variant}}.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        **EVAL_RESOURCES,
    shell:
        "python_xtuner -m vlmtune.reference_nll --model {input.model} --eval {input.eval}"
        " --image-folder {input.images} {params.max_records} --out {output} > {log} 2>&1"


rule metrics:
    input:
        predictions=PREDICTIONS,
        nll=REFERENCE_NLL,
        train=TRAIN_DATA,
    output:
        report(
            METRICS,
            caption="../report/metrics.rst",
            category="Evaluation",
            labels={"model": "{variant}", "file": "metrics"},
        ),
    params:
        code=code_hash("metrics"),
        resamples=EVAL["bootstrap_resamples"],
        seed=EVAL["seed"],
    log:
        f"logs/{RUN}/score_{{variant}}.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python_xtuner -m vlmtune.metrics --predictions {input.predictions} --nll {input.nll}"
        " --train {input.train} --bootstrap {params.resamples} --seed {params.seed}"
        " --out {output} > {log} 2>&1"


rule report:
    input:
        predictions=expand(PREDICTIONS, variant=EVAL["models"]),
        metrics=expand(METRICS, variant=EVAL["models"]),
        images=DATASET_DIR,
    output:
        html=report(
            EVAL_REPORT_HTML,
            caption="../report/eval_report.rst",
            category="Evaluation",
            labels={"model": "all", "file": "report.html"},
        ),
        png=report(
            EVAL_SUMMARY_PNG,
            caption="../report/eval_report.rst",
            category="Evaluation",
            labels={"model": "all", "file": "summary.png"},
        ),
    params:
        code=code_hash("report"),
        run=RUN,
        variants=" ".join(
            f"--variant {v} results/eval/{RUN}/{v}" for v in EVAL["models"]
        ),
        cards=EVAL["report_cards"],
    log:
        f"logs/{RUN}/report.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "python_xtuner -m vlmtune.report --run {params.run} {params.variants}"
        " --image-folder {input.images} --max-cards {params.cards}"
        " --html {output.html} --png {output.png} > {log} 2>&1"
