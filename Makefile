# make demo: Neon on the 2-D toy models (quick: DEMO_FLAGS=--quick).  make test: the test suite.
# Both create .venv in the repo root when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_FLAGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/neon demo $(DEMO_FLAGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf outputs .pytest_cache
