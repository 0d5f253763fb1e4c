# The README's two commands: `make demo` and `make test`. Both set up .venv from scratch when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv tools demo test check unit integration bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Debian's prometheus package (prometheus + promtool): tests/integration/test_prometheus.py runs
# the dashboard's and the alert rules' queries on it, and is skipped, saying so, without it.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ $(if $(filter 0,$(shell id -u)),,sudo )apt-get update -q && \
		  $(if $(filter 0,$(shell id -u)),,sudo )env DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; }

demo: venv
	$(VENV)/bin/streamrec demo

test: check
	$(VENV)/bin/python -m pytest -q

# Static checks: lint and format over the project's code, strict types over the library.
check: venv
	$(VENV)/bin/ruff check pipeline workers tests
	$(VENV)/bin/ruff format --check pipeline workers tests
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/python -m pytest -q -m "not integration"

integration: venv
	$(VENV)/bin/python -m pytest -q -m integration

clean:
	rm -rf $(VENV) streamrec-data .pytest_cache .mypy_cache .ruff_cache
