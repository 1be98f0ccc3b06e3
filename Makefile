# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, simulates a heterogeneous AdK dataset, reconstructs its consensus map
#   make test   -> creates .venv, runs the default test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,check]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxhet demo -o demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python experiments/bench_forward.py

clean:
	rm -rf $(VENV) demo_out
