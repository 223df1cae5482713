"""The speed levers XTuner's launcher ``vlmtune.xtuner_main`` applies, with their values when a
rendered config lacks them (XTuner's stock behaviour). ``vlmtune.xtuner_config`` renders the
configured values into the config; the launcher reads them back. A module of its own, with no
imports, so that neither step runs (or has in its code hash) the other's code."""

LAUNCHER_LEVERS = dict(
    attention="eager",
    gradient_checkpointing=True,
    group_by_exact_length=False,
    cuda_expandable_segments=False,
    iteration_log=False,
    label_only_head=False,
    qlora_compute_dtype="float16",
    quantize_head=True,
    fused_elementwise=False,
    fused_lora=False,
    compile_layers=False,
    shared_rope=False,
)
