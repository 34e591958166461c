# recsqueeze: every target creates .venv and installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PY ?= python3
BIN := .venv/bin
STATE ?= .recsqueeze
# torch: take the pinned CPU build where the machine has it, else any release the range allows.
TORCH ?= torch==2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench up down status clean browser postgres

# the same install script the Dockerfile runs (infra/install.sh)
.venv: pyproject.toml infra/install.sh
	PY=$(PY) TORCH='$(TORCH)' EDITABLE=1 infra/install.sh .venv dev
	touch .venv

up: .venv
	$(BIN)/recsqueeze up --state-dir $(STATE)

down: .venv
	$(BIN)/recsqueeze down --state-dir $(STATE)

status: .venv
	$(BIN)/recsqueeze status --state-dir $(STATE)

demo: up
	$(BIN)/recsqueeze run --size small --state-dir $(STATE)
	$(BIN)/recsqueeze registry list --state-dir $(STATE)

# the browser test's Chromium (Debian's package), installed only where it is missing; where it
# cannot be installed the test says why it skips
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Debian's chromium for tests/e2e/test_ui_form.py"; \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
	      -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "could not install chromium: the browser test will skip and say why"; }

# PostgreSQL for `recsqueeze up --db postgres` and its test (Debian's package), where missing;
# without the package's default cluster (nothing is left running: the stack starts its own)
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for recsqueeze up --db postgres"; \
	  { $(SUDO) mkdir -p /etc/postgresql-common/createcluster.d && \
	    echo "create_main_cluster = false" | $(SUDO) tee \
	      /etc/postgresql-common/createcluster.d/recsqueeze.conf >/dev/null && \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
	      -y -qq --no-install-recommends postgresql >/dev/null; } \
	  || echo "could not install postgresql: the PostgreSQL test will skip and say why"; }

test: .venv browser postgres
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20 tests

bench: .venv
	mkdir -p bench-results
	for s in quantize qat prune factorize distill dlrm two_tower sasrec search; do \
	  $(BIN)/recsqueeze bench --suite $$s --size small --seeds 2 --json bench-results/$$s-small.json; done

clean: down
	rm -rf $(STATE)
