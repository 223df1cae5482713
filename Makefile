# The two commands of the README: `make demo` (whole workflow on the embedded demo, CPU) and
# `make test`. Both install what they need into a pinned virtual environment first; `make test`
# (and `make test-fast`) also install the Debian packages the tests need (.ci/apt-packages.txt,
# through .ci/install-system-packages: as root or with passwordless sudo, else it stops before
# any test naming the command to run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOBS ?= 2
SYSTEM_PACKAGES := .ci/install-system-packages
PYTEST ?= python -m pytest

.PHONY: venv venvs demo test test-fast lint format clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements/cpu.txt requirements/xtuner-nodeps.txt requirements/lmdeploy-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -r requirements/cpu.txt
	# XTuner without its declared deps (docs/xtuner.md): they are pinned in cpu.txt.
	$(BIN)/python -m pip install --no-deps -r requirements/xtuner-nodeps.txt
	# LMDeploy's prompt code for the parity tests, without its GPU stack (requirements/lmdeploy-nodeps.txt).
	$(BIN)/python -m pip install --no-deps -r requirements/lmdeploy-nodeps.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

# One venv per step env family, for running without conda (README, "Environments"): use them
# with `--configfile ... config/venvs.yaml`. Not needed for the demo or CI (one .venv serves all).
# The xtuner family defaults to the CUDA stack; on a CPU machine pass
# XTUNER_REQUIREMENTS=requirements/cpu.txt.
VENVS ?= .venvs
XTUNER_REQUIREMENTS ?= requirements/gpu.txt
venvs: $(VENVS)/data/.installed $(VENVS)/xtuner/.installed $(VENVS)/lmdeploy/.installed

VENV_REQUIREMENTS_data := requirements/data.txt
VENV_REQUIREMENTS_xtuner := $(XTUNER_REQUIREMENTS)
VENV_REQUIREMENTS_lmdeploy := requirements/lmdeploy.txt

# Ends with the step's own check (vlmtune.envcheck): the venv holds the family's pins.
.SECONDEXPANSION:
$(VENVS)/%/.installed: $$(VENV_REQUIREMENTS_$$*) requirements/cpu.txt requirements/xtuner-nodeps.txt requirements/lmdeploy-nodeps.txt
	$(PYTHON) -m venv $(VENVS)/$*
	$(VENVS)/$*/bin/python -m pip install -q -U pip
	DS_BUILD_OPS=0 $(VENVS)/$*/bin/python -m pip install -r $(VENV_REQUIREMENTS_$*)
	$(if $(filter xtuner,$*),$(VENVS)/$*/bin/python -m pip install --no-deps -r requirements/xtuner-nodeps.txt)
	$(if $(filter lmdeploy,$*),$(VENVS)/$*/bin/python -m pip install --no-deps -r requirements/lmdeploy-nodeps.txt)
	PYTHONPATH=src $(VENVS)/$*/bin/python -m vlmtune.envcheck $*
	touch $@

demo: venv
	PATH=$(abspath $(BIN)):$$PATH snakemake -j$(JOBS) --configfile config/demo.yaml

test: venv
	@$(SYSTEM_PACKAGES)
	PATH=$(abspath $(BIN)):$$PATH $(PYTEST) -q

test-fast: venv
	@$(SYSTEM_PACKAGES)
	PATH=$(abspath $(BIN)):$$PATH $(PYTEST) -q -m "not slow"

# Needs only the venv (ruff and snakefmt are pinned in requirements/cpu.txt); CI runs it before the tests.
lint: venv
	PATH=$(abspath $(BIN)):$$PATH snakefmt --check Snakefile workflow/
	PATH=$(abspath $(BIN)):$$PATH snakemake --lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	PATH=$(abspath $(BIN)):$$PATH snakefmt Snakefile workflow/
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-demo:
	rm -rf data/demo data/models/InternVL2-tiny data/datasets/CLoT-Oogiri-GO-demo \
	  results/*/demo results/merged/InternVL2-tiny-demo* results/converted/CLoT-Oogiri-GO-demo-cn
