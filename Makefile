# The two commands of the README, and the steps they rest on. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own, so that the package's bare `torch` requirement finds
# it. Which build is the user's choice, one variable away:
#   TORCH_BUILD=default  whatever pip's configured index gives for TORCH_SPEC; on PyPI for Linux
#                        x86_64 that is the CUDA build (several GB of CUDA libraries)
#   TORCH_BUILD=cpu      the CPU-only build, from PyTorch's own index
#   TORCH_BUILD=cu126    a CUDA build (cu118, cu124, cu126, ...), from PyTorch's own index
TORCH_SPEC ?= torch==2.13.0
TORCH_BUILD ?= default
TORCH_INDEX := $(if $(filter default,$(TORCH_BUILD)),,--index-url https://download.pytorch.org/whl/$(TORCH_BUILD))
STAMP := $(VENV)/.installed
# On a machine whose system Python already has a CUDA torch: make VENV_FLAGS=--system-site-packages
VENV_FLAGS ?=

.PHONY: install test bench lint study report-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e '.[dev,tensorboard]'
	touch $@

install: $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# Micro-benchmarks (pytest-benchmark), kept out of `make test`.
bench: install
	mkdir -p results/benchmarks
	$(BIN)/python -m pytest tests/benchmarks -o addopts="" --benchmark-only \
		--benchmark-json=results/benchmarks/moe_ffn.json

# `full` where CUDA is visible, `tiny` otherwise; another study: make study STUDY=quick
STUDY ?=
study: install
	$(BIN)/snakemake $(if $(STUDY),--config study=$(STUDY))

# Open results/<study>/report.html in headless Chromium: every image loads, no table overflows,
# and a screenshot next to it (report.png). Installs Debian's chromium where apt-get can.
report-check: install
	@$(BIN)/python -m harness.report_check --which >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
			sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "report-check needs Chromium: install Debian's chromium package (apt-get install chromium)" \
				"or set CHROMIUM to a Chromium or Chrome executable" >&2; exit 1; \
		fi; }
	$(BIN)/python -m harness.report_check results/$(or $(STUDY),tiny)/report.html

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
