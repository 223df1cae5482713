#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) inside the new env: XTuner without its declared dependencies.
set -euo pipefail
python -m pip install --no-deps xtuner==0.2.0
