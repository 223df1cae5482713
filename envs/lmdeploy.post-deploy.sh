#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) inside the new env: LMDeploy without its declared dependencies
# (requirements/lmdeploy.txt says why); its runtime imports are pinned in envs/lmdeploy.yaml.
set -euo pipefail
python -m pip install --no-deps lmdeploy==0.18.0
