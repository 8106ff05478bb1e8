# Everything a fresh machine needs: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install bnlab with the pinned versions in constraints.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-cpus test-seeds install clean

$(BIN)/bnlab: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/bnlab

demo: install
	$(BIN)/bnlab demo

# ruff first (lint, import order, formatting; line length 100, see pyproject.toml): cheap, and a
# style slip fails fast
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=10

# The Numba kernels' tests again with code generated for other CPUs than this one: AVX2 only
# (haswell) and no AVX at all (generic), each with its own kernel cache. Float results must hold
# whatever vector width the kernels were compiled for.
NUMBA_TESTS := tests/kernels/test_cpu.py tests/kernels/test_contract.py tests/kernels/test_registry.py \
	tests/nn/test_batchnorm.py tests/test_functional_act.py tests/test_functional_residual.py \
	tests/test_concat.py
NUMBA_CPUS := haswell generic

test-cpus: install
	@for cpu in $(NUMBA_CPUS); do \
		echo "== NUMBA_CPU_NAME=$$cpu"; \
		NUMBA_CPU_NAME=$$cpu NUMBA_CACHE_DIR=$(CURDIR)/.numba-cache/$$cpu \
			$(BIN)/python -m pytest -q -p no:cacheprovider -k "not triton and not gpu" $(NUMBA_TESTS) || exit 1; \
	done

# Each test seeds its random draws from its own id (tests/conftest.py), so runs repeat exactly;
# this draws the suite again under other seeds, to find tolerances that only hold for one draw.
SEEDS := 1 2 3
test-seeds: install
	@failed=""; for seed in $(SEEDS); do \
		echo "== BNLAB_TEST_SEED=$$seed"; \
		BNLAB_TEST_SEED=$$seed $(BIN)/python -m pytest -q -p no:cacheprovider || failed="$$failed $$seed"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed under BNLAB_TEST_SEED:$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .numba-cache
