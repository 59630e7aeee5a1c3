# bigtrain: `make train` and `make test` are the two commands a user needs.
# Everything is installed into .venv with pinned versions (constraints.txt), in one pip
# command, so a CPU machine never pulls torch's CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bigtrain-installed
DEV_STAMP := $(VENV)/.bigtrain-dev-installed
CONFIG ?= configs/debug.yaml
# Threads for CPU runs; tests pin their own.
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-dev demo-data train test test-fast test-isa lint bench clean

setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# `make train` needs only the product's dependencies; `make test` adds the test tools
# (Triton's CPU interpreter, transformers, torchao, tensorboard, pytest).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "bigtrain needs Python >= 3.10, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(DEV_STAMP)

demo-data: setup
	$(BIN)/bigtrain data demo

train: demo-data
	$(BIN)/bigtrain train $(CONFIG)

# Two pytest-xdist workers, given whole test files: one runs the multi-rank launches in turn while the other runs
# the rest (tests/conftest.py pytest_xdist_make_scheduler).
# PYTEST_WORKERS=0 runs the suite in this one process (for a debugger).
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadscope)

test: setup-dev
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=15 tests

test-fast: setup-dev
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow" tests

# The tolerance policy's check (docs/architecture.md): every numerics test under ATen's scalar kernels
# (ATEN_CPU_CAPABILITY=default, which rounds differently from AVX2 as AVX-512 does), then under this machine's best.
test-isa: setup-dev
	@echo "== numerics tests under ATEN_CPU_CAPABILITY=default (scalar kernels)"
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m numerics tests
	@echo "== numerics tests under this CPU's best capability: $$($(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
	env -u ATEN_CPU_CAPABILITY $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m numerics tests

# Static checks (configured in pyproject.toml): ruff's lint rules and mypy on bigtrain/, and every
# `# type: ignore[code]` must say why after it (`# type: ignore[code]  # reason`). All three run, so one
# call lists every finding; any finding fails the target.
lint: setup-dev
	@status=0; \
	echo "ruff check bigtrain tests bench"; $(BIN)/ruff check bigtrain tests bench || status=1; \
	echo "mypy"; $(BIN)/mypy || status=1; \
	if grep -rnE --include='*.py' 'type: *ignore(\[[^]]*\])? *$$' bigtrain; then \
		echo 'each `# type: ignore[code]` above needs its reason: `# type: ignore[code]  # why`'; status=1; \
	fi; \
	exit $$status

bench: demo-data
	$(BIN)/python bench/overhead.py --out bench/results/overhead-cpu-2core.md

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache .mypy_cache .ruff_cache
