# Two commands do all the set-up on a fresh machine with Python 3.10+:
#   make demo   creates .venv, installs, runs the whole demo on the built-in synthetic dataset
#   make test   creates .venv, installs, runs the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo

.PHONY: demo test test-quick venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	$(BIN)/python -m detect.check_install
	touch $@

demo: venv
	$(BIN)/detect demo --output-dir $(OUT)

test: venv
	$(BIN)/python -m pytest -q

test-quick: venv
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV)
