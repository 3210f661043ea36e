# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/posttrain demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

$(VENV)/.bench: $(VENV)/.installed
	$(PIP) -e ".[test,bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/sft.py
	$(PY) benchmarks/rm.py

clean:
	rm -rf $(VENV) runs .pytest_cache
