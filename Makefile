# slurm-quota: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv test unit demo lab-up lab-down bench lint clean

all: test

# A private virtualenv with the project (editable) and its test dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Every test: unit, Lua (lupa 5.1-5.4 + LuaJIT, real lua5.1 + LuaDBI), the real Slurm lab.
# System packages are installed on first use when root; otherwise those tests skip loudly
# (and fail when SLURM_QUOTA_REQUIRE_SYSTEM=1, as .ci/run sets).
test: venv
	$(BIN)/ruff check slurm_quota tests bench
	$(BIN)/python -m pytest

unit: venv
	$(BIN)/python -m pytest tests/unit tests/lua -m 'not integration'

lint: venv
	$(BIN)/ruff check slurm_quota tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
