# `make run` trains the default task; `make test` runs the test suite and the type check.
# Both create .venv and install everything first, on a fresh machine with Python 3.11.
#
# Every distribution of the repository (core/ and each plugins/kktrain-*/) goes into .venv in
# editable mode, with the dev tools of the root pyproject's `test` dependency group.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch; the library itself only asks for torch>=2.4.
TORCH   := torch==2.13.0
PLUGINS := $(sort $(wildcard plugins/kktrain-*))
# Reinstall when any distribution's metadata (pyproject, README = its long description) changes.
METADATA := pyproject.toml core/pyproject.toml core/README.md $(PLUGINS:%=%/pyproject.toml) $(PLUGINS:%=%/README.md)

.PHONY: run test typecheck bench install clean

$(STAMP): $(METADATA)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet --no-build-isolation -e './core[export,plot]' $(PLUGINS:%=-e ./%)
	$(BIN)/python -m pip install --quiet --group test
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/kktrain run $(ARGS)

test: $(STAMP) typecheck
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) build core/build core/*.egg-info plugins/*/build plugins/*/src/*.egg-info
