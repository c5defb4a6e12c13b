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
#   TORCH_BUILD=none     (make wheelhouse) no torch: the node's venv takes its system's torch
TORCH_SPEC ?= torch==2.13.0
TORCH_BUILD ?= default
TORCH_URL := $(if $(filter default none,$(TORCH_BUILD)),,https://download.pytorch.org/whl/$(TORCH_BUILD))
TORCH_INDEX := $(if $(TORCH_URL),--index-url $(TORCH_URL))
STAMP := $(VENV)/.installed
# On a machine whose system Python already has a CUDA torch: make VENV_FLAGS=--system-site-packages
VENV_FLAGS ?=
EXTRAS ?= dev,tensorboard
# A node without network: `make install WHEELS=DIR` installs from a folder that `make wheelhouse
# WHEELS=DIR` filled elsewhere, checked against its SHA256SUMS first; torch from it too, if there.
WHEELS ?=
PIP_FROM := $(if $(WHEELS),--no-index --find-links $(abspath $(WHEELS)))
TORCH_REQ := $(if $(WHEELS),torch,"$(TORCH_SPEC)" $(TORCH_INDEX))

.PHONY: install wheelhouse check-offline test bench lint study report-check test-cluster clean

$(STAMP): pyproject.toml
	$(if $(WHEELS),cd $(WHEELS) && sha256sum --check --quiet SHA256SUMS)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade $(PIP_FROM) pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(PIP_FROM) $(TORCH_REQ)
	$(BIN)/python -m pip install --quiet $(PIP_FROM) -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

# Every dependency as wheels in WHEELS, for `make install WHEELS=DIR` on a node without network
# (harness/wheelhouse.py): for this host's Python and platform, or PYTHON_VERSION=3.12
# PLATFORM=manylinux_2_28_x86_64; torch as TORCH_BUILD says (none: left out). Leave out more
# that the node has already: WHEELHOUSE_EXCLUDE="transformers tokenizers".
PYTHON_VERSION ?=
PLATFORM ?=
WHEELHOUSE_EXCLUDE ?=
wheelhouse:
	@test -n "$(WHEELS)" || { echo "make wheelhouse WHEELS=DIR: name the folder to fill" >&2; exit 2; }
	$(PYTHON) -m harness.wheelhouse $(WHEELS) --extras '$(EXTRAS)' \
		--torch $(if $(filter none,$(TORCH_BUILD)),none,'$(TORCH_SPEC)') $(if $(TORCH_URL),--torch-index $(TORCH_URL)) \
		$(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) $(if $(PLATFORM),--platform $(PLATFORM)) \
		--exclude $(WHEELHOUSE_EXCLUDE)

# CI: a wheelhouse for this host, torch included, then `make install` from it into a new venv
# with no index, no pip configuration and no reachable proxy: a wheel missing from the folder
# fails here, not on a node without network. No bytecode compiling: it would double the time and
# proves nothing here.
OFFLINE ?= $(or $(TMPDIR),/tmp)/moe-harness-offline
NOWHERE := http://127.0.0.1:9
check-offline:
	rm -rf $(OFFLINE)
	$(MAKE) --no-print-directory wheelhouse WHEELS=$(OFFLINE)/wheels
	env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_NO_COMPILE=1 \
		http_proxy=$(NOWHERE) https_proxy=$(NOWHERE) HTTP_PROXY=$(NOWHERE) HTTPS_PROXY=$(NOWHERE) \
		$(MAKE) --no-print-directory install WHEELS=$(OFFLINE)/wheels VENV=$(OFFLINE)/venv
	$(OFFLINE)/venv/bin/harness --version
	$(OFFLINE)/venv/bin/python -c "import snakemake, lm_eval, torch; print('snakemake, lm_eval, torch', torch.__version__)"
	$(OFFLINE)/venv/bin/python -m pip check
	rm -rf $(OFFLINE)

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

# The SLURM profile against a real SLURM (run by .ci/run, not by `make test`): a one-node cluster
# started on this machine, as root (Debian's slurm-wlm and munge installed where missing), the
# tiny study's data step and two training runs through profiles/slurm with sbatch, their losses
# checked against a local run's; then SLURM is shut down (workflows/cluster/test_cluster.sh).
test-cluster: install
	VENV=$(VENV) workflows/cluster/test_cluster.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
