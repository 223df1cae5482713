# Model and dataset downloads (Hugging Face, ModelScope or a local folder), with manifests.
import shlex


rule fetch_model:
    input:
        local_source("model"),
    output:
        directory(MODEL_DIR),
    params:
        code=code_hash("fetch"),
        source=config["model"]["source"],
        repo_id=config["model"]["repo_id"],
        revision=config["model"]["revision"],
        path=lambda w, input: f"--path {shlex.quote(input[0])}" if input else "",
    log:
        f"logs/{RUN}/fetch_model.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=180,
    shell:
        "python_data -m vlmtune.fetch model --source {params.source} --repo-id {params.repo_id:q}"
        " --revision {params.revision:q} {params.path} --out {output} > {log} 2>&1"


rule fetch_dataset:
    input:
        local_source("dataset"),
    output:
        directory(DATASET_DIR),
    params:
        code=code_hash("fetch"),
        source=config["dataset"]["source"],
        repo_id=config["dataset"]["repo_id"],
        revision=config["dataset"]["revision"],
        path=lambda w, input: f"--path {shlex.quote(input[0])}" if input else "",
        language=LANGUAGE,
        # images.zip limits (vlmtune.fetch.ExtractLimits; config/README.md, extraction)
        max_bytes=config["extraction"]["max_bytes"],
        max_ratio=config["extraction"]["max_ratio"],
    log:
        f"logs/{RUN}/fetch_dataset.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=180,
    shell:
        "python_data -m vlmtune.fetch dataset --source {params.source} --repo-id {params.repo_id:q}"
        " --revision {params.revision:q} {params.path} --language {params.language}"
        " --max-extract-bytes {params.max_bytes} --max-extract-ratio {params.max_ratio}"
        " --out {output} > {log} 2>&1"
