# slurm-quota: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv test unit demo lab-up lab-down bench bench-plugin lint clean completion rpm

all: test

# A private virtualenv with the project (editable) and its test dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,mariadb]'
	touch $(STAMP)

venv: $(STAMP)

# The Slurm releases of the lab (docs/lab.md): bookworm = 22.05 (Debian 12), trixie = 24.11
# (Debian 13), sid = 26.05. A release other than the host's runs in a cached root filesystem.
RELEASES ?= bookworm trixie sid
# The releases whose integration tests run on both ledgers (SQLite, then MariaDB); the others
# run on SQLite only. The MariaDB pass adds about 9 minutes per release here, so CI's 90
# minutes hold the oldest and the newest Slurm on both: `make test MARIADB_RELEASES="bookworm
# trixie sid"` runs every release on both.
MARIADB_RELEASES ?= bookworm sid
# `make demo RELEASE=trixie`, `make lab-up RELEASE=sid`: empty = the host's release.
RELEASE ?=
LAB_RELEASE = $(if $(RELEASE),SLURM_QUOTA_LAB_RELEASE=$(RELEASE))

# Every test: unit, Lua (lupa 5.1-5.4 + LuaJIT, real lua5.1/lua5.4 + LuaDBI) once, the unit
# tests again under Python 3.9 with EL9's libraries (test-py39), then the real Slurm lab's
# integration tests and the demo once per release of RELEASES (every release runs even
# when one fails; the target fails if any did). System packages are installed on first use
# when root; otherwise those tests skip loudly (and fail when SLURM_QUOTA_REQUIRE_SYSTEM=1, as
# .ci/run sets).
test: venv
	$(BIN)/ruff check slurm_quota tests bench
	$(BIN)/python -m pytest -m 'not integration'
	$(BIN)/python -m tests.py39.run
	@failed=""; for r in $(RELEASES); do \
	    ledgers=sqlite; \
	    case " $(MARIADB_RELEASES) " in *" $$r "*) ledgers=sqlite,mariadb;; esac; \
	    echo "== integration tests on the $$r lab, ledgers: $$ledgers"; \
	    start=$$(date +%s); \
	    SLURM_QUOTA_LAB_RELEASE=$$r SLURM_QUOTA_LAB_LEDGER=$$ledgers \
	        $(BIN)/python -m pytest tests/integration || failed="$$failed $$r"; \
	    echo "== make demo on the $$r lab"; \
	    NO_COLOR=1 SLURM_QUOTA_LAB_RELEASE=$$r $(BIN)/python -m tests.integration.demo \
	        || failed="$$failed $$r(demo)"; \
	    echo "== $$r: $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "integration tests failed on:$$failed"; exit 1; fi

# The unit tests (and tests/lua's lupa-hosted ones) again under CPython 3.9 with the library
# versions EL9 ships (EL9's python3 is 3.9, its SQLite 3.34.1): tests/py39/run.py builds a
# Debian 11 tree once, cached in /var/cache/slurm-quota-lab/bullseye-py39, and runs them there
# (root; about 3 minutes on 2 cores, 40 s more when the tree or its venv is (re)built).
.PHONY: test-py39
test-py39: venv
	$(BIN)/python -m tests.py39.run

unit: venv
	$(BIN)/python -m pytest tests/unit tests/lua -m 'not integration'

# The main job: a real Slurm lab showing accept, refusal with its message, charge and stats.
demo: venv
	$(LAB_RELEASE) $(BIN)/python -m tests.integration.demo

lint: venv
	$(BIN)/ruff check slurm_quota tests bench

# The real single-node Slurm lab of tests/integration (root; docs/lab.md). Directory and ports
# from SLURM_QUOTA_LAB_DIR (/tmp/slurmlab[-release]) and SLURM_QUOTA_LAB_PORT_BASE (16817,
# +100 for trixie, +200 for sid); the release from RELEASE= or SLURM_QUOTA_LAB_RELEASE.
lab-up: venv
	$(LAB_RELEASE) $(BIN)/python -m tests.integration.lab up

lab-down: venv
	$(LAB_RELEASE) $(BIN)/python -m tests.integration.lab down

# Plugin decision latency (real lua5.1 + LuaDBI, 10k users, 1k vs 100k preallocations) and
# sbatch throughput with our plugin vs a no-op one on the lab; results in docs/benchmarks.md.
bench: bench-plugin

bench-plugin: venv
	$(BIN)/python bench/plugin_latency.py --lab

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

# Packaging. `make completion` regenerates the shipped bash completion from the click tree
# (tests/packaging checks the shipped file is current). `make rpm` builds the three RPMs into
# ./rpmbuild/RPMS/noarch/ (rpmbuild: Debian package `rpm`; --nodeps because on Debian the
# build dependencies come from dpkg, not from the empty rpm database).
PKG_VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' slurm_quota/__init__.py)
RPMTOP := $(CURDIR)/rpmbuild

completion: venv
	_SLURM_QUOTA_COMPLETE=bash_source $(BIN)/slurm-quota > packaging/completion/slurm-quota.bash.tmp
	mv packaging/completion/slurm-quota.bash.tmp packaging/completion/slurm-quota.bash

rpm: venv
	rm -rf $(RPMTOP)
	mkdir -p $(RPMTOP)/SOURCES
	$(BIN)/pip wheel -q --no-deps -w $(RPMTOP)/SOURCES .
	tar -czf $(RPMTOP)/SOURCES/slurm-quota-$(PKG_VERSION).tar.gz --exclude=__pycache__ \
	    --transform 's,^,slurm-quota-$(PKG_VERSION)/,' README.md docs lua man packaging scripts
	rpmbuild -bb --nodeps --define '_topdir $(RPMTOP)' \
	    --define 'py3_installer $(CURDIR)/$(BIN)/python' packaging/rpm/slurm-quota.spec
