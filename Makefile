# `make run` (or `make train`) trains the default task; `make test` runs the test suite and the type check.
# train-full adds curriculum + augmentation + EMA, train-quick is 100 steps, train-resume continues
# RUN=DIR (default: the newest run), train-9x9 is the 9 x 9 recipe (recipes/latin-9x9.toml, about
# 18 CPU-minutes), hw-report shows the hardware; ARGS=... adds run options.
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

.PHONY: run test typecheck bench install clean train train-full train-quick train-resume train-9x9 hw-report

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

# Seed 000's training targets: thin wrappers over the CLI; ARGS adds run options, RUN names a run.
train: $(STAMP)
	$(BIN)/kktrain run $(ARGS)

train-full: $(STAMP)
	$(BIN)/kktrain run --plugin curriculum --plugin ema -o task.augment=true $(ARGS)

train-quick: $(STAMP)
	$(BIN)/kktrain run --max-steps 100 -o log_every=20 $(ARGS)

train-9x9: $(STAMP)
	$(BIN)/kktrain run --config recipes/latin-9x9.toml $(ARGS)

train-resume: $(STAMP)
	$(if $(RUN),$(BIN)/kktrain resume $(RUN) $(ARGS),$(BIN)/kktrain run --resume auto $(ARGS))

hw-report: $(STAMP)
	$(BIN)/kktrain hw-report $(ARGS)

test: $(STAMP) typecheck
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) build core/build core/*.egg-info plugins/*/build plugins/*/src/*.egg-info
