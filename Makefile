# Everything a fresh machine needs: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install bnlab with the pinned versions in constraints.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/bnlab: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/bnlab

demo: install
	$(BIN)/bnlab demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
