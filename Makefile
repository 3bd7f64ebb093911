# ernie-mesh — the two commands: `make up` (whole mesh on this machine) and `make test` (every test).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
MODEL ?=
ENGINES ?= 2
PYTEST_ARGS ?=

.PHONY: up down test install lint test-unit test-integration test-e2e bench clean

install:
	@scripts/install.sh all

up: install
	@$(VENV)/bin/ernie-mesh up --engines $(ENGINES) $(if $(MODEL),--model $(MODEL))

down:
	@$(VENV)/bin/ernie-mesh down

# Every test: lint and types (ruff, mypy), unit, integration (real Consul + Envoy), e2e (real vLLM,
# headless Chromium).
# pytest's exit code 5 ("no tests collected") is a failure, not a pass.
test:
	@scripts/install.sh test
	@scripts/lint.sh
	@$(PY) -m pytest -ra $(PYTEST_ARGS) tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint:
	@scripts/lint.sh

test-unit:
	@$(PY) -m pytest -ra $(PYTEST_ARGS) tests/unit

test-integration:
	@$(PY) -m pytest -ra $(PYTEST_ARGS) tests/integration

test-e2e:
	@$(PY) -m pytest -ra $(PYTEST_ARGS) tests/e2e

bench: install
	@$(PY) -m bench

clean:
	rm -rf $(VENV) $(CURDIR)/.venv-ui $(CURDIR)/.cache
