# Two entry points for a fresh clone (see README):
#   make demo   set up .venv and run the quickstart
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned to the release this project is tested with;
# pip takes it from the local wheel cache where there is one.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

$(BIN)/optima: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(BIN)/optima

setup: $(BIN)/optima

# one torch thread whatever OMP_NUM_THREADS says: the run the README's numbers come from
demo: setup
	$(BIN)/optima run gin/quickstart.gin --threads 1
	@echo "optima is installed in $(BIN), not on your PATH: 'source $(BIN)/activate' to use the README's optima commands"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
