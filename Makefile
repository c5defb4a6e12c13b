# The two commands of the README, and the steps they rest on. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own, so that the package's bare `torch` requirement finds
# it. Which build is the user's choice, one variable away:
#   TORCH_BUILD=auto     (the default) the CPU-only build from PyTorch's own index on a machine
#                        with no NVIDIA driver where pip's configured index would give the CUDA
#                        build; pip's choice everywhere else (harness/tools/torch_build.py)
#   TORCH_BUILD=default  whatever pip's configured index gives for TORCH_SPEC; on PyPI for Linux
#                        x86_64 that is the CUDA build (several GB of CUDA libraries)
#   TORCH_BUILD=cpu      the CPU-only build, from PyTorch's own index
#   TORCH_BUILD=cu126    a CUDA build (cu118, cu124, cu126, ...), from PyTorch's own index
#   TORCH_BUILD=none     (make wheelhouse) no torch: the node's venv takes its system's torch
TORCH_SPEC ?= torch==2.13.0
TORCH_BUILD ?= auto
TORCH_URL := $(if $(filter auto default none,$(TORCH_BUILD)),,https://download.pytorch.org/whl/$(TORCH_BUILD))
# auto: asked of pip when the recipe runs (a dry run, metadata only), by the Python that installs
TORCH_AUTO = $$($(1) -m harness.tools.torch_build $(2) '$(TORCH_SPEC)')
TORCH_INDEX = $(if $(filter auto,$(TORCH_BUILD)),$(call TORCH_AUTO,$(BIN)/python),$(if $(TORCH_URL),--index-url $(TORCH_URL)))
STAMP := $(VENV)/.installed
# On a machine whose Python already has a CUDA torch, the venv can use it (and whatever else that
# Python has, pip included: no ensurepip needed) instead of installing its own: SITE_FROM=python3
# (harness/tools/host_site.py; this works where that Python is itself a venv), or
# VENV_FLAGS=--system-site-packages for a system Python.
VENV_FLAGS ?=
SITE_FROM ?=
EXTRAS ?= dev,tensorboard
# A node without network: `make install WHEELS=DIR` installs from a folder that `make wheelhouse
# WHEELS=DIR` filled elsewhere, checked against its SHA256SUMS first; torch from it too, if there.
WHEELS ?=
PIP_FROM := $(if $(WHEELS),--no-index --find-links $(abspath $(WHEELS)))
TORCH_REQ = $(if $(WHEELS),torch,"$(TORCH_SPEC)" $(TORCH_INDEX))

.PHONY: install wheelhouse check-offline test test-slow test-all clock-check bench bench-smoke lint study report-check test-cluster gpu-wheelhouse gpu-check gpu-check-rehearsal clean

$(STAMP): pyproject.toml
	$(if $(WHEELS),cd $(WHEELS) && sha256sum --check --quiet SHA256SUMS)
	$(PYTHON) -m venv $(VENV_FLAGS) $(if $(SITE_FROM),--without-pip) $(VENV)
	$(if $(SITE_FROM),$(PYTHON) -m harness.tools.host_site $(BIN)/python $(SITE_FROM))
	$(BIN)/python -m pip install --quiet --upgrade $(PIP_FROM) pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(PIP_FROM) $(TORCH_REQ)
	$(BIN)/python -m pip install --quiet $(PIP_FROM) -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

install: $(STAMP)

# Every dependency as wheels in WHEELS, for `make install WHEELS=DIR` on a node without network
# (harness/tools/wheelhouse.py): for this host's Python and platform, or PYTHON_VERSION=3.12
# PLATFORM=manylinux_2_28_x86_64; torch as TORCH_BUILD says (none: left out). Leave out more
# that the node has already: WHEELHOUSE_EXCLUDE="transformers tokenizers".
PYTHON_VERSION ?=
PLATFORM ?=
WHEELHOUSE_EXCLUDE ?=
wheelhouse:
	@test -n "$(WHEELS)" || { echo "make wheelhouse WHEELS=DIR: name the folder to fill" >&2; exit 2; }
	$(PYTHON) -m harness.tools.wheelhouse $(WHEELS) --extras '$(EXTRAS)' \
		--torch $(if $(filter none,$(TORCH_BUILD)),none,'$(TORCH_SPEC)') \
		$(if $(filter auto,$(TORCH_BUILD)),$(if $(PLATFORM),,--torch-index "$(call TORCH_AUTO,$(PYTHON),--url)"),$(if $(TORCH_URL),--torch-index $(TORCH_URL))) \
		$(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) $(if $(PLATFORM),--platform $(PLATFORM)) \
		--exclude $(WHEELHOUSE_EXCLUDE)

# CI: a wheelhouse for this host, torch included, then `make install` from it into a new venv
# with no index, no pip configuration and no reachable proxy: a wheel missing from the folder
# fails here, not on a node without network. No bytecode compiling: it would double the time and
# proves nothing here. Then a venv on top of that one's packages, as `make gpu-check` makes on a
# GPU machine (SITE_FROM), and the GPU machine's wheelhouse (make gpu-wheelhouse), built to fit.
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
	@echo "== a second venv on top of the first's packages (make gpu-check's install): nothing reinstalled"
	env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_NO_COMPILE=1 \
		$(MAKE) --no-print-directory install WHEELS=$(OFFLINE)/wheels VENV=$(OFFLINE)/on-host SITE_FROM=$(OFFLINE)/venv/bin/python EXTRAS=
	$(OFFLINE)/on-host/bin/python -c "import torch, snakemake; \
		assert torch.__file__.startswith('$(OFFLINE)/venv/'), torch.__file__; print('torch from', torch.__file__)"
	test -z "$$(ls $(OFFLINE)/on-host/lib/python*/site-packages | grep -i -E '^(torch|snakemake|numpy)')"
	@echo "== the GPU machine's wheelhouse resolves for its Python and fits the transfer"
	$(MAKE) --no-print-directory gpu-wheelhouse GPU_WHEELS=$(OFFLINE)/gpu-wheels
	rm -rf $(OFFLINE)

# The README's test command: lint, then every test not marked `slow` (about 2 minutes on two quiet
# cores). `make test-slow` runs the slow tier (end to end through snakemake, torchrun, lm-eval, a
# browser; long simulations); `make test-all` runs both. CI runs `make test` then `make test-slow`.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/actionlint

test: lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -m slow --durations=25

test-all: lint
	$(BIN)/python -m pytest

# harness plan against the clock on the tiny study (tests/workflow/test_plan_clock.py): planned,
# then run here in results/tiny, each stage within 2x of its estimate where the host was quiet.
# CI runs it just before `make study STUDY=tiny`, which then finds the study done.
clock-check: install
	MOE_HARNESS_CLOCK_IN=$(CURDIR) $(BIN)/python -m pytest tests/workflow/test_plan_clock.py -k tiny -m slow -rxs

# Micro-benchmarks (pytest-benchmark, tests/benchmarks/), kept out of `make test`. `make bench`
# runs each at full length and asserts its goals: one JSON per benchmark file in
# results/benchmarks/ (test_moe_ffn.py -> moe_ffn.json), written also when a goal fails; every
# file runs, and any failure fails the target at the end. The report shows
# cpu_training_step.json beside the pipeline's FFN benchmark (harness report --bench).
# `make bench-smoke` (CI) runs each once with a few rounds and records the goals without
# asserting them: a benchmark that errors fails it.
BENCH_FILES = $(sort $(wildcard tests/benchmarks/test_*.py))
# Short tracebacks, and no DEBUG records (torch.compile's trace) under a failed goal.
BENCH_PYTEST = -o addopts="" -o log_level=WARNING -p no:cacheprovider --tb=short --benchmark-only
bench: install
	mkdir -p results/benchmarks
	@failed=; for f in $(BENCH_FILES); do \
		name=$$(basename "$$f" .py); name=$${name#test_}; \
		echo "== $$f -> results/benchmarks/$$name.json"; \
		$(BIN)/python -m pytest "$$f" $(BENCH_PYTEST) --benchmark-json=results/benchmarks/$$name.json \
			|| failed="$$failed $$name"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

bench-smoke: install
	$(BIN)/python -m pytest tests/benchmarks $(BENCH_PYTEST) --smoke

# `full` where CUDA is visible, `tiny` otherwise; another study: make study STUDY=quick
STUDY ?=
study: install
	$(BIN)/snakemake $(if $(STUDY),--config study=$(STUDY))

# Open results/<study>/report.html in headless Chromium: every image loads, no table overflows,
# and a screenshot next to it (report.png). Installs Debian's chromium where apt-get can.
report-check: install
	@$(BIN)/python -m harness.report.browser_check --which >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
			sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "report-check needs Chromium: install Debian's chromium package (apt-get install chromium)" \
				"or set CHROMIUM to a Chromium or Chrome executable" >&2; exit 1; \
		fi; }
	$(BIN)/python -m harness.report.browser_check results/$(or $(STUDY),tiny)/report.html

# The SLURM profile against a real SLURM (run by .ci/run, not by `make test`): a one-node cluster
# started on this machine, as root (Debian's slurm-wlm and munge installed where missing), the
# tiny study's data step and two training runs through profiles/slurm with sbatch, their losses
# checked against a local run's; then SLURM is shut down (workflows/cluster/test_cluster.sh).
# Not root, but with passwordless sudo (a GitHub runner): through sudo.
test-cluster: install
	@if [ "$$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then as_root="sudo -n"; fi; \
		echo "$${as_root:+$$as_root }env VENV=$(VENV) workflows/cluster/test_cluster.sh"; \
		$${as_root:-} env VENV=$(VENV) workflows/cluster/test_cluster.sh

# A GPU machine without network (harness/tools/gpu_check.py). `make gpu-wheelhouse` (here, with network)
# fills GPU_WHEELS with what such a machine lacks: the project and its dependencies for its Python
# and platform, less torch and the packages it has already (workflows/gpu/preinstalled.txt), at
# most GPU_WHEELS_MIB so that it travels with the checkout. `make gpu-check` (there) installs
# from that folder, when it exists, into a venv on top of the machine's own Python and its CUDA
# torch, then runs every check and writes results/reference/<device>/gpu-check/. It asks first,
# in seconds and before any install, whether there is a CUDA device at all (harness/tools/cuda_probe.py).
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORM ?= manylinux_2_28_x86_64
GPU_WHEELS_MIB ?= 48
GPU_CHECK_ARGS ?=
gpu-wheelhouse:
	$(PYTHON) -m harness.tools.wheelhouse $(GPU_WHEELS) --extras '' --torch none \
		--python-version $(GPU_PYTHON_VERSION) --platform $(GPU_PLATFORM) \
		--exclude-from workflows/gpu/preinstalled.txt --max-mib $(GPU_WHEELS_MIB)

gpu-check:
	$(if $(filter --rehearse,$(GPU_CHECK_ARGS)),,$(PYTHON) -m harness.tools.cuda_probe)
	$(MAKE) --no-print-directory install SITE_FROM=$(PYTHON) EXTRAS= \
		$(if $(wildcard $(GPU_WHEELS)/SHA256SUMS),WHEELS=$(GPU_WHEELS))
	$(BIN)/python -m harness.tools.gpu_check $(GPU_CHECK_ARGS)

# The same stages on this CPU at the tiny study's size (run by .ci/run): the script, the pipeline
# slice and the summary work before a GPU is lent.
gpu-check-rehearsal: install
	$(BIN)/python -m harness.tools.gpu_check --rehearse

# CI's steps (.ci/run and .github/workflows/ci.yml run the same targets in the same order;
# tests/test_ci.py checks it). check-studies: every shipped study parses and plans (snakemake -n).
# summary: the at-a-glance table, claims and reproduction of results/<study>/report.md as Markdown,
# with any python3 (harness/report/summary.py); it exits 1 when a loss, bits-per-byte or accuracy
# number did not reproduce the committed reference (throughput is annotated only).
# snakemake-report: Snakemake's one-file HTML report.
.PHONY: check-studies summary snakemake-report
check-studies: install
	@for study in workflows/studies/*.yaml; do \
		name=$$(basename "$$study" .yaml); \
		echo "== snakemake -n --config study=$$name"; \
		$(BIN)/snakemake -n --quiet rules --config study="$$name" || exit 1; \
	done

summary:
	@$(PYTHON) -m harness.report.summary results/$(or $(STUDY),tiny)/report.md --check-reproduction

snakemake-report: install
	$(BIN)/snakemake --config study=$(or $(STUDY),tiny) --report results/$(or $(STUDY),tiny)/snakemake_report.html

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
