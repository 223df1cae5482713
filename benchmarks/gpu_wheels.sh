#!/usr/bin/env bash
# Builds .whl/: the Python wheels a GPU machine without package access needs, on top of its own
# CUDA torch (2.11, Python 3.12), to run the whole workflow (benchmarks/gpu_workflow.sh) and the
# training benchmark (benchmarks/train_gpu.py). Run here, where PyPI is reachable; the set must stay
# under 64 MiB (what one device call can carry), so the large wheels are slimmed:
#   - bitsandbytes 0.50.2: only its CPU and CUDA 13 libraries;
#   - lmdeploy 0.18.0: without the TurboMind library (364 MB unpacked; the PyTorch engine does not
#     load it) — so this set can run evaluate.lmdeploy_backend: pytorch only;
#   - jieba 0.42.1: segmentation only (no paddle model, keyword or part-of-speech data);
#   - pycocoevalcap 1.2: CIDEr only (the wheel is 104 MB of Java tools the metrics do not use);
#   - DeepSpeed 0.16.2: built here without its C++ ops (pure Python; ops are JIT-built on use).
# Each wheel keeps a consistent RECORD, so `pip install --no-deps --target` accepts it.
# Usage: bash benchmarks/gpu_wheels.sh [.whl]
set -euo pipefail
DEST=${1:-.whl}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps)
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLATFORM+=(--platform "$tag")
done

# name==version of every wheel taken as published (pure Python or cp312 builds). The GPU image
# already holds numpy, PyYAML, requests, jinja2, psutil, pillow, timm, einops, sacrebleu, scipy,
# matplotlib, tqdm, safetensors, sentencepiece, tiktoken, pyarrow, pandas, fsspec, ...
AS_PUBLISHED=(
  # XTuner's training stack (versions of requirements/gpu.txt)
  xtuner==0.2.0 mmengine==0.10.6 transformers==4.48.0 tokenizers==0.21.0 huggingface_hub==0.27.1
  peft==0.14.0 accelerate==1.2.1 datasets==3.2.0 loguru==0.7.3 hjson==3.1.0 addict==2.4.0
  yapf==0.43.0 platformdirs==4.14.9 termcolor==2.5.0 dill==0.3.8 multiprocess==0.70.16
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  nltk==3.9.1
  # LMDeploy 0.18.0's PyTorch engine: what an offline pipeline() imports
  pybase64==1.4.2 pyzmq==27.1.0 shortuuid==1.0.13 partial-json-parser==0.2.1.1.post6 fire==0.7.1
  xgrammar==0.2.9 apache-tvm-ffi==0.1.11
  # NVML, for the GPU utilisation benchmarks/lmdeploy_sweep.py samples
  nvidia-ml-py==13.615.71
  # Snakemake 9.27.1 and what it imports
  snakemake==9.27.1 snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
  snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
  snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
  argparse-dataclass==2.0.0 conda-inject==1.3.2 configargparse==1.9.0 docutils==0.22.4 dpath==2.2.0
  fastjsonschema==2.22.3 gitdb==4.0.12 gitpython==3.2.1 smmap==5.0.3 humanfriendly==10.0
  immutables==0.21 jsonschema==4.23.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1 jupyter-core==5.9.1 nbformat==5.11.1 traitlets==5.16.1 smart-open==7.7.1
  tenacity==9.2.1 throttler==1.2.3 yte==1.9.4 sqlmodel==0.0.37 sqlalchemy==2.0.58 greenlet==3.5.6
)
pip download -q "${PLATFORM[@]}" -d "$TMP/published" "${AS_PUBLISHED[@]}"
mv "$TMP"/published/*.whl "$DEST"/

# Published as source only: built here (pure Python).
pip wheel -q --no-deps -w "$DEST" connection_pool==0.0.3 rouge-score==0.1.2 transformers-stream-generator==0.0.5
pip wheel -q --no-deps -w "$TMP/big" jieba==0.42.1
# DeepSpeed's setup.py needs setuptools and wheel in the building interpreter (no build isolation).
python3 -m venv "$TMP/build"
"$TMP/build/bin/pip" install -q setuptools wheel
DS_BUILD_OPS=0 "$TMP/build/bin/pip" wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.16.2

# Slimmed wheels: keep the listed members, rewrite RECORD.
slim() {  # slim NAME==VERSION PYTHON-REGEX-OF-MEMBERS-TO-DROP (a wheel already in $TMP/big, else downloaded)
  ls "$TMP"/big/"$(echo "${1%%==*}" | tr - _)"-*.whl >/dev/null 2>&1 || pip download -q "${PLATFORM[@]}" -d "$TMP/big" "$1"
  local whl
  whl=$(ls "$TMP"/big/"$(echo "${1%%==*}" | tr - _)"-*.whl)
  python3 - "$whl" "$2" "$DEST" <<'PY'
import base64, hashlib, re, sys, zipfile
from pathlib import Path
src, drop, dest = Path(sys.argv[1]), re.compile(sys.argv[2]), Path(sys.argv[3])
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    rows = []
    for info in zin.infolist():
        if info.filename == record_name or drop.search(info.filename):
            continue
        data = zin.read(info)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    rows.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(rows) + "\n")
print(f"{src.name}: {src.stat().st_size >> 20} MiB -> {(dest / src.name).stat().st_size >> 20} MiB")
PY
}
slim bitsandbytes==0.50.2 'libbitsandbytes_(cuda1[0-2]|rocm|xpu|mps)'
slim lmdeploy==0.18.0 'turbomind/_turbomind|turbomind/lib64/'
# jieba: word segmentation with its dictionary and HMM (jieba.lcut); no paddle model, keywords, POS.
slim jieba==0.42.1 '^jieba/(lac_small|analyse|posseg)/'
slim pycocoevalcap==1.2 '^pycocoevalcap/(spice|meteor|tokenizer|eval\.py|bleu|rouge)'
du -sh "$DEST"
