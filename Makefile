# `make test` and `make demo` work on a fresh clone: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first: a bare `torch` requirement could otherwise pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo lint bench mutation clean chromium

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# tests/test_explore.py drives Debian's Chromium (Playwright's own browser download cannot be used): installed where
# missing, which needs root (CI runs as root) or a Chromium already at /usr/bin/chromium.
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: $(VENV)/.installed chromium
	$(PY) -m ruff check gpt2_scratch tests benchmarks training space
	$(PY) -m pytest -q -n 2

demo: $(VENV)/.installed
	$(PY) -m gpt2_scratch.demo

lint: $(VENV)/.installed
	$(PY) -m ruff check gpt2_scratch tests benchmarks training space

# Mutation testing (docs/testing.md), not part of `make test`: the functions below, each mutant against the tests that
# call it ([tool.mutmut] in pyproject.toml). Results stay in mutants/ (`.venv/bin/mutmut results`, `mutmut show NAME`).
MUTANTS := 'gpt2_scratch.bpe.*' 'gpt2_scratch.metrics.*' 'gpt2_scratch.checkpoints.*' \
	'gpt2_scratch.training.xǁLimitsǁ*' 'gpt2_scratch.training.x_check_numeric_arguments*' \
	'gpt2_scratch.training.x_check_training_arguments*' 'gpt2_scratch.modeling_gpt2_scratch.*'

# One OpenMP thread: mutmut forks each mutant's run from a process whose OpenMP pool is already up, and a forked
# child that enters a parallel region hangs until the timeout (which would count as killed).
mutation: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m mutmut run --max-children 2 $(MUTANTS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
