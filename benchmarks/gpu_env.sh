# Sourced by the GPU benchmark scripts (repo root): installs the carried wheels (.whl/, from
# benchmarks/gpu_wheels.sh) once into $SITE, kept while the machine is, and sets the environment
# the workflow's steps need there. The GPU image's own torch (and Pillow, ...) stand in for the
# pinned ones: VLMTUNE_ALLOW_VERSION_DRIFT makes each step's env check warn instead of stop.
SITE=${SITE:-$PWD/results/gpu_site}
if [ -d .whl ] && [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  touch "$SITE/.installed"
fi
export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH} DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
export PATH=$PATH:$SITE/bin  # the wheels' commands (py-spy)
export VLMTUNE_ALLOW_VERSION_DRIFT=1 TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
