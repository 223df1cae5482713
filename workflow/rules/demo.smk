# The embedded demo's inputs, built locally (config/demo.yaml points the local sources here).
# demo.model_preset: the model builder's preset of the tiny model, built at
# data/demo/InternVL2-<preset> (tiny: InternLM2 like the 2B; tiny-4b: Phi-3, config/demo-4b.yaml).
DEMO_MODEL_PRESET = config["demo"]["model_preset"]


rule demo_model:
    output:
        directory(f"data/demo/InternVL2-{DEMO_MODEL_PRESET}"),
    params:
        code=code_hash("demo_model", "remote_code"),
        seed=0,
        preset=DEMO_MODEL_PRESET,
    log:
        f"logs/{RUN}/demo_model.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        (
            "python_xtuner -m vlmtune.demo_model --out {output} --seed {params.seed}"
            " --preset {params.preset} > {log} 2>&1"
        )


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
