# Two commands do everything on a fresh machine:
#   make demo   create .venv if missing, train the default DDPM on the built-in digits
#   make test   create .venv if missing, lint, format check, tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1

.PHONY: setup demo demo-basic test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"

setup: $(BIN)/python

demo: setup
	$(BIN)/python train_ddpm.py --output-dir runs/ddpm
	$(BIN)/python sample.py runs/ddpm/pipeline --num-samples 64 --scheduler ddim --num-inference-steps 50 --eta 1 --output-dir runs/ddpm/samples-ddim50
	@echo "pictures: runs/ddpm/samples/ (training grids) and runs/ddpm/samples-ddim50/grid.png"

demo-basic: setup
	$(BIN)/python train_basic.py --output-dir runs/basic
	@echo "pictures: runs/basic/samples/"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers, each taking whole test files (module fixtures train once): a test of
# one process leaves the second core idle, and half the suite is such tests.
PYTEST_WORKERS ?= 2

test: lint
	$(TEST_ENV) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

clean:
	rm -rf runs outputs wandb .pytest_cache
