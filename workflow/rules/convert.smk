# CLoT-Oogiri-GO jsonl -> XTuner InternVL json, with a held-out evaluation split by image,
# then validation against the model (images decode, token lengths vs max_length) before training.


rule convert_dataset:
    input:
        DATASET_DIR,
    output:
        train=CONVERTED_TRAIN,
        eval=HELD_OUT,
        report=f"{CONVERTED}/convert_report.json",
    params:
        code=code_hash("convert"),
        language=LANGUAGE,
        default_question=config["conversion"]["default_question"],
        on_bad_record=config["conversion"]["on_bad_record"],
        eval_images=config["conversion"]["eval_images"],
        split_seed=config["conversion"]["split_seed"],
        types=",".join(config["conversion"]["types"]),
        output_format=TRAIN_FORMAT,
    threads: config["conversion"]["workers"]
    log:
        f"logs/{RUN}/convert_dataset.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python_data -m vlmtune.convert --dataset {input} --language {params.language}"
        " --default-question {params.default_question:q} --on-bad-record {params.on_bad_record}"
        " --eval-images {params.eval_images} --split-seed {params.split_seed} --workers {threads}"
        " --types {params.types} --output-format {params.output_format}"
        " --out-train {output.train} --out-eval {output.eval} --report {output.report}"
        " > {log} 2>&1"


rule validate_dataset:
    input:
        train=CONVERTED_TRAIN,
        eval=HELD_OUT,
        images=DATASET_DIR,
        model=MODEL_DIR,
    output:
        train=TRAIN_DATA,
        report=f"{CONVERTED}/validation_report.json",
        histogram=f"{CONVERTED}/token_lengths.png",
    params:
        code=code_hash("validate"),
        max_length=TRAIN["max_length"],
        on_too_long=VALIDATION["on_too_long"],
        on_bad_image=config["conversion"]["on_bad_record"],
    threads: VALIDATION["workers"]
    log:
        f"logs/{RUN}/validate_dataset.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "python_xtuner -m vlmtune.validate --train {input.train} --images {input.images}"
        " --model {input.model} --eval {input.eval} --max-length {params.max_length}"
        " --on-too-long {params.on_too_long}"
        " --on-bad-image {params.on_bad_image} --workers {threads} --out-train {output.train}"
        " --report {output.report} --histogram {output.histogram} > {log} 2>&1"
