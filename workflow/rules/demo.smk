# The embedded demo's inputs, built locally (config/demo.yaml points the local sources here).


rule demo_model:
    output:
        directory("data/demo/InternVL2-tiny"),
    params:
        code=code_hash("demo", "remote_code"),
        seed=0,
    log:
        f"logs/{RUN}/demo_model.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python_xtuner -m vlmtune.demo model --out {output} --seed {params.seed} > {log} 2>&1"


rule demo_dataset:
    output:
        directory("data/demo/CLoT-Oogiri-GO"),
    params:
        code=code_hash("demo"),
        seed=0,
    log:
        f"logs/{RUN}/demo_dataset.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python_data -m vlmtune.demo dataset --out {output} --seed {params.seed} > {log} 2>&1"
