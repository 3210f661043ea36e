# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup world demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/posttrain demo

# The tiny world's base model is pretrained once per machine (about 12 min on 2 cores) and cached; building it
# before pytest keeps that one-off cost out of the test suite's own time.
world: setup
	$(VENV)/bin/posttrain world build --base-model

test: world
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

$(VENV)/.bench: $(VENV)/.installed
	$(PIP) -e ".[test,bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/sft.py
	$(PY) benchmarks/rm.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/dpo.py
	$(PY) -m pytest -q tests/test_trl_parity.py  # loss parity with TRL (needs the bench extra's trl)

clean:
	rm -rf $(VENV) runs .pytest_cache
