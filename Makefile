# Two commands on a fresh machine: `make run` starts an agent with the embedded
# defaults; `make test` runs every check (ruff check, ruff format --check, mypy,
# lint-imports, pytest). Each creates the virtualenv in .venv and installs what it
# needs into it first: `run` only the agent's own dependencies, `test` the [test]
# extra as well, both at the versions pinned in constraints.txt (`make lock`
# regenerates it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: run test lint unit bench-deps lock clean mypyc pure

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run-deps: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[test]'
	touch $@ $(VENV)/.run-deps

$(VENV)/.bench-deps: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[bench]'
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/mesh agent $(ARGS)

# `ruff check .`, `ruff format --check .`, `mypy` and `lint-imports`: the hooks of
# .pre-commit-config.yaml, all `repo: local` tools of this venv, so nothing is fetched;
# PRE_COMMIT_HOME inside the venv keeps pre-commit's cache out of $HOME, and `run
# --all-files` needs no git hook installed (it checks the files git tracks).
lint: $(VENV)/.test-deps
	PRE_COMMIT_HOME=$(CURDIR)/$(VENV)/pre-commit PATH=$(CURDIR)/$(BIN):$$PATH \
		$(BIN)/pre-commit run --all-files

# The suites whose tests share nothing but loopback (each agent on ports of its own, no
# kernel object outside a namespace it made) run on XDIST_WORKERS processes at once, a
# test file to a worker; the suites that build network namespaces, time faults or loss,
# or boot the VM run one test at a time after them. Both run even when the first fails.
# tests/unit/test_make_test.py checks that every suite is in one of the two.
PARALLEL_SUITES := tests/unit tests/integration
SERIAL_SUITES := tests/cluster tests/e2e tests/kernel tests/lb tests/netdrv
XDIST_WORKERS ?= 2
PYTEST_PARALLEL = $(BIN)/pytest -n $(XDIST_WORKERS) --dist loadfile $(PARALLEL_SUITES) $(PYTEST_ARGS)
PYTEST_SERIAL = $(BIN)/pytest $(SERIAL_SUITES) $(PYTEST_ARGS)

test: lint
	@status=0; \
	echo "$(PYTEST_PARALLEL)"; $(PYTEST_PARALLEL) || status=$$?; \
	echo "$(PYTEST_SERIAL)"; $(PYTEST_SERIAL) || status=$$?; \
	exit $$status

unit: $(VENV)/.test-deps
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench-deps: $(VENV)/.bench-deps

# Re-resolve every pin of constraints.txt (the agent's dependencies and the [test] and
# [bench] extras, meshplane itself excluded) to the newest releases allowed by
# pyproject.toml, with pip-tools from a throwaway venv.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet --upgrade pip pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)-lock/bin/pip-compile --quiet --upgrade \
		--strip-extras --no-emit-index-url --no-emit-find-links \
		--extra test --extra bench --output-file constraints.txt pyproject.toml
	rm -rf $(VENV)-lock

# The compiled build of the hot modules (buildtools/mypyc_build.py: the HTTP router's and
# the DNS server's UDP fast path): C extensions next to their .py files, made by mypyc when
# a C compiler is present (pure Python, with a note, when not); `make pure` removes them.
# The tests pass on both (MESH_BUILD says which one a run expects:
# tests/unit/test_compiled_build.py).
mypyc: $(VENV)/.run-deps
	MESH_MYPYC=1 $(PIP_INSTALL) --no-deps -e .

pure:
	rm -f *__mypyc.*.so lb/http/*.so dns/*.so

clean: pure
	rm -rf $(VENV) $(VENV)-lock build *.egg-info
