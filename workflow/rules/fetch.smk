# Model and dataset downloads (Hugging Face, ModelScope or a local folder), with manifests.


rule fetch_model:
    input:
        local_source("model"),
    output:
        directory(MODEL_DIR),
    params:
        code=code_hash("fetch"),
        source=config["model"]["source"],
        repo_id=config["model"].get("repo_id") or "",
        revision=config["model"].get("revision") or "main",
        path=config["model"].get("path") or "",
    log:
        "logs/fetch_model.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=180,
    shell:
        "python_data -m vlmtune.fetch model --source {params.source} --repo-id {params.repo_id:q}"
        " --revision {params.revision:q} --path {params.path:q} --out {output} > {log} 2>&1"


rule fetch_dataset:
    input:
        local_source("dataset"),
    output:
        directory(DATASET_DIR),
    params:
        code=code_hash("fetch"),
        source=config["dataset"]["source"],
        repo_id=config["dataset"].get("repo_id") or "",
        revision=config["dataset"].get("revision") or "main",
        path=config["dataset"].get("path") or "",
        language=LANGUAGE,
    log:
        "logs/fetch_dataset.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=180,
    shell:
        "python_data -m vlmtune.fetch dataset --source {params.source} --repo-id {params.repo_id:q}"
        " --revision {params.revision:q} --path {params.path:q} --language {params.language}"
        " --out {output} > {log} 2>&1"
