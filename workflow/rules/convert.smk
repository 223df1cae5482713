# CLoT-Oogiri-GO jsonl -> XTuner InternVL json, with a held-out evaluation split by image.


rule convert_dataset:
    input:
        DATASET_DIR,
    output:
        train=f"{CONVERTED}/train.json",
        eval=f"{CONVERTED}/eval.jsonl",
        report=f"{CONVERTED}/convert_report.json",
    params:
        code=code_hash("convert"),
        language=LANGUAGE,
        default_question=config["conversion"]["default_question"],
        on_bad_record=config["conversion"]["on_bad_record"],
        eval_images=config["conversion"]["eval_images"],
        split_seed=config["conversion"]["split_seed"],
    threads: config["conversion"].get("workers", 8)
    log:
        "logs/convert_dataset.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python_data -m vlmtune.convert --dataset {input} --language {params.language}"
        " --default-question {params.default_question:q} --on-bad-record {params.on_bad_record}"
        " --eval-images {params.eval_images} --split-seed {params.split_seed} --workers {threads}"
        " --out-train {output.train} --out-eval {output.eval} --report {output.report}"
        " > {log} 2>&1"
