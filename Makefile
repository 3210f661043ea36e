# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup world demo test test-fast bench mutate clean

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

# Two pytest-xdist workers, one thread each; --dist loadfile keeps a file on one worker, so the tests that share the
# demo run (tests/test_learning.py) run it once; --no-loadscope-reorder keeps conftest's order (the demo first).
test: world
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

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
	$(PY) benchmarks/grpo.py
	$(PY) benchmarks/grpo_world.py --model runs/demo/sft/model  # needs `make demo` first
	$(PY) -m pytest -q tests/test_trl_parity.py  # loss parity with TRL (needs the bench extra's trl)

# Mutation testing (docs/mutation.md): mutmut mutates the modules of pyproject's [tool.mutmut] only_mutate and runs
# the fast tests that cover each mutant, in a copy of the tree under ./mutants (kept: a rerun re-tests only changed
# functions; after editing tests, rm -rf mutants).
# Not part of `make test`. MUTANTS="posttrain.maths.stats.*" runs a subset; MUTATE_MIN is the score it must reach.
MUTATE_JOBS ?= 2
MUTATE_MIN  ?= 90
MUTANTS     ?=

$(VENV)/.mutate: $(VENV)/.installed
	$(PIP) -e ".[test,mutate]"
	touch $@

mutate: $(VENV)/.mutate
	$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results  # the mutants that survived (or timed out, or were not checked)
	$(VENV)/bin/mutmut results --all true | sed -E 's/\.x_[^:]*:/:/' | sort | uniq -c  # per module and status
	$(VENV)/bin/mutmut export-cicd-stats > /dev/null
	$(PY) -c "import json, sys; s = json.load(open('mutants/mutmut-cicd-stats.json')); k = s['killed'] + s['timeout']; \
		n = s['total'] - s['skipped']; print(f'mutation score: {k} / {n} killed = {100 * k / n:.1f} %'); \
		sys.exit(100 * k < $(MUTATE_MIN) * n)"

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
