"""vlmtune: reproducible QLoRA fine-tuning of InternVL2 with XTuner, merged and evaluated.

One module per workflow step, each runnable as ``python -m vlmtune.<step>``.
"""

__version__ = "0.1.0"
