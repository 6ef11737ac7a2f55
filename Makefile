# Two commands do all the set-up: `make run` and `make test` create .venv from pyproject.toml
# when it is missing or older than pyproject.toml, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-pyproject
PYTEST_ARGS ?=
# Test processes: both cores of the development and CI machines.
PYTEST_WORKERS ?= 2
CONFIG ?=

.PHONY: venv browser slurm run test lint format bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# The report's page is tested in the distribution's headless Chromium (driven by selenium).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; }

# pwf's Slurm job scripts are tested on a real single-node cluster (tests/test_slurm.py) run by
# the distribution's Slurm and munge, started by the test in a temporary folder.
slurm:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
	  && command -v munged >/dev/null || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; }

run: $(STAMP)
	$(VENV)/bin/pwf run $(CONFIG)

# pytest exits with 5 when a marker filter selects no test; that is not a failure of the suite.
test: $(STAMP) browser slurm
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Every script in benchmarks/ (each writes its JSON to benchmarks/results/).
bench: $(STAMP)
	set -e; for script in benchmarks/[a-z]*.py; do \
	  case $$script in benchmarks/results_file.py) continue;; esac; \
	  echo "== $$script"; $(PY) $$script; done
