# XTuner config rendering and training (torchrun over xtuner.tools.train).


rule render_xtuner_config:
    input:
        model=MODEL_DIR,
        train=TRAIN_DATA,
        images=DATASET_DIR,
    output:
        config=XTUNER_CONFIG,
        plan=XTUNER_PLAN,
    params:
        code=code_hash("xtuner_config"),
        train=json.dumps(TRAIN_SETTINGS, sort_keys=True),
        preset=PRESET.name,
        prompt_template=PRESET.xtuner_template,
    log:
        f"logs/{RUN}/render_xtuner_config.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python_xtuner -m vlmtune.xtuner_config --model {input.model} --train-json {input.train}"
        " --image-folder {input.images} --train-settings {params.train:q}"
        " --preset {params.preset} --out {output.config} --plan {output.plan} > {log} 2>&1"
        " # XTuner template {params.prompt_template}"


rule train:
    input:
        config=XTUNER_CONFIG,
        plan=XTUNER_PLAN,
        model=MODEL_DIR,
        train=TRAIN_DATA,
    output:
        # The work dir (checkpoints) is not an output: Snakemake would delete it when a job
        # fails, and the next attempt resumes from it.
        result=TRAIN_RESULT,
        summary=f"{TRAIN_DIR}/train_summary.json",
        curves=report(
            f"{TRAIN_DIR}/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Training",
        ),
    params:
        code=code_hash("train", "xtuner_main"),
        work_dir=f"{TRAIN_DIR}/work_dir",
        deepspeed=TRAIN["deepspeed"],
        cpu_processes=TRAIN["cpu_processes"],
        # torchrun processes per node: the config's, which the rendered plan counts on
        gpus_per_node=TRAIN_GPUS,
    threads: TRAIN["cpus_per_task"]
    log:
        f"logs/{RUN}/train.log",
    conda:
        "../../envs/xtuner.yaml"
    resources:
        # Slurm, one node: `--gpus=[gpu_model:]gpu`. Several nodes: GPUs per node,
        # `--gres=gpu:[gpu_model:]N` (a job total, --gpus, may be placed unevenly), and one
        # task per node (`--ntasks=nodes` for CPU jobs).
        nodes=TRAIN_NODES,
        gpu=TRAIN_GPUS if TRAIN_NODES == 1 else 0,
        gpu_model=(TRAIN["gpu_model"] or "") if TRAIN_NODES == 1 else "",
        gres=(
            ":".join(["gpu", *filter(None, [TRAIN["gpu_model"]]), str(TRAIN_GPUS)])
            if TRAIN_NODES > 1 and TRAIN_GPUS
            else ""
        ),
        tasks=TRAIN_NODES,
        mem_mb=TRAIN["mem_mb"],
        runtime=TRAIN["runtime"],
        cpus_per_task=TRAIN["cpus_per_task"],
    shell:
        "python_xtuner -m vlmtune.train --config {input.config} --plan {input.plan}"
        " --work-dir {params.work_dir} --result {output.result} --summary {output.summary}"
        " --curves {output.curves} --gpus {params.gpus_per_node} --nodes {resources.nodes}"
        " --cpu-processes {params.cpu_processes} --deepspeed {params.deepspeed}"
        " --inputs {input.train} {input.model} > {log} 2>&1"
