# The README's two commands: `make demo` and `make test`. Both set up .venv from scratch when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test check unit integration bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

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
