# The two commands of the README: `make demo` (whole workflow on the embedded demo, CPU) and
# `make test`. Both install what they need into a pinned virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOBS ?= 2

.PHONY: venv demo test test-fast lint format clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements/cpu.txt requirements/xtuner-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -r requirements/cpu.txt
	# XTuner without its declared deps (FIELD-NOTES §2): they are pinned in cpu.txt.
	$(BIN)/python -m pip install --no-deps -r requirements/xtuner-nodeps.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

demo: venv
	PATH=$(abspath $(BIN)):$$PATH snakemake -j$(JOBS) --configfile config/demo.yaml

test: venv
	PATH=$(abspath $(BIN)):$$PATH python -m pytest -q

test-fast: venv
	PATH=$(abspath $(BIN)):$$PATH python -m pytest -q -m "not slow"

lint: venv
	PATH=$(abspath $(BIN)):$$PATH snakemake --lint
	PATH=$(abspath $(BIN)):$$PATH snakefmt --check Snakefile workflow/

format: venv
	PATH=$(abspath $(BIN)):$$PATH snakefmt Snakefile workflow/

clean-demo:
	rm -rf data/demo data/models/InternVL2-tiny data/datasets/CLoT-Oogiri-GO-demo \
	  results/*/demo results/merged/InternVL2-tiny-demo* results/converted/CLoT-Oogiri-GO-demo-cn
