# medssl — the two set-up commands are `make demo` and `make test`; both build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/medssl demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/throughput.py --method mocov2 --backbone resnet18 --image-size 64 --batch-size 64 --steps 8 --threads 1
	$(BIN)/python benchmarks/throughput.py --method mae --backbone vit_small_patch16_224 --image-size 64 --batch-size 64 --steps 6 --threads 1 --mask0
	$(BIN)/python benchmarks/dataloading.py --n 32 --size 512 --workers 0 2
	$(BIN)/python benchmarks/quality.py --threads 1

clean:
	rm -rf $(VENV) runs .pytest_cache build src/*.egg-info
