# Exogenesis Omega — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard proto/omega/v1/*.proto)
PROTO_OUT := libs/omega_protocol

.PHONY: help setup run data test test-unit test-integration chaos lint format typecheck proto proto-check bench bench-sync bench-brain bench-federation bench-quality bench-recommend bench-fleet fuzz deploy-secrets deploy-check prometheus-live clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the project with its dev tools

data: $(STAMP) ## Fetch MovieLens 100K and the embedding model into the cache, embed the catalog
	$(PY) -m omega_data fetch

run: $(STAMP) ## Start Postgres (embedded if none configured), 2 shards, the federation worker; replay MovieLens; print the report
	$(PY) -m omega_simulator run

test: $(STAMP) ## Run all tests (unit + integration against real Postgres and gRPC)
	$(PY) -m pytest

test-unit: $(STAMP) ## Run the unit tests only
	$(PY) -m pytest tests/unit

chaos: $(STAMP) ## Long fault tests (minutes): replicas SIGKILLed and Postgres stopped, repeatedly
	OMEGA_CHAOS=1 $(PY) -m pytest -m chaos -s tests/integration

lint: $(STAMP) ## ruff lint + format check, mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench
	$(VENV)/bin/mypy tools

format: $(STAMP) ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP) ## mypy (strict) on our code
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench
	$(VENV)/bin/mypy tools

bench: bench-sync bench-brain bench-federation bench-recommend bench-quality ## Every benchmark (about 25 min); figures in reports/bench.json

bench-sync: $(STAMP) ## The shard's SyncPatterns pipeline vs a bare grpc.aio echo server, same requests and load generator (about 2 min)
	$(PY) -m bench.sync_throughput

bench-brain: $(STAMP) ## The TV brain on one core, MovieLens and 100K synthetic catalogs: start/reopen, recommend/observe p50/p99, RSS, store size, recall@10 (about 2 min)
	$(PY) -m bench.brain_bench

bench-federation: $(STAMP) ## The federation worker at 10K/100K/1M patterns: aggregation alone and whole rounds over gRPC, wall time and peak RSS (about 2 min)
	$(PY) -m bench.federation_bench

bench-recommend: $(STAMP) ## recommend() p50/p99 at 100K items with the collaborative model vs without, one core
	$(PY) bench/recommend_latency.py

bench-fleet: $(STAMP) ## The largest fleet one shard on this machine sustains at one sync / 5 min with p99 < 200 ms: open-loop steps, doubling then bisecting; CPU by simulator, shard, Postgres (about 5 min; ARGS="--shards 2 --replicas 2" for a bigger constellation)
	$(PY) -m bench.fleet_capacity $(ARGS)

bench-quality: $(STAMP) ## Tune federated CF on a validation split; hold-out quality vs epsilon (JSON + PNG in reports/collaborative)
	$(PY) bench/collaborative_quality.py --out reports/collaborative

FUZZ_CASES ?= 10000
FUZZ_SEED ?= 0
FUZZ_TARGET ?=
FUZZ_TIME_LIMIT ?= 900
FUZZ_AUTH ?= true

fuzz: $(STAMP) ## Fuzz a local shard with credentials (FUZZ_CASES=10000 FUZZ_SEED=0 FUZZ_AUTH=false: without; FUZZ_TARGET=127.0.0.1:port to use a running one)
	$(PY) -m tools.fuzz --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --time-limit $(FUZZ_TIME_LIMIT) \
		$(if $(filter false,$(FUZZ_AUTH)),--no-auth) \
		$(if $(FUZZ_TARGET),$(foreach t,$(FUZZ_TARGET),--target $(t)))

define generate_proto
	rm -rf $(1) && mkdir -p $(1)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -I proto --python_out=$(1) \
		--grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1) $(PROTO_FILES)
	touch $(1)/omega/__init__.py $(1)/omega/v1/__init__.py $(1)/omega/py.typed
endef

proto: $(STAMP) ## Generate Python stubs and .pyi from proto/ into libs/omega_protocol/omega
	$(call generate_proto,build/proto)
	rm -rf $(PROTO_OUT)/omega && cp -r build/proto/omega $(PROTO_OUT)/omega

proto-check: $(STAMP) ## Fail when the committed generated code differs from what proto/ generates
	$(call generate_proto,build/proto-check)
	diff -r -x __pycache__ build/proto-check/omega $(PROTO_OUT)/omega \
		|| (echo "generated code is stale: run 'make proto' and commit" && exit 1)

deploy-secrets: $(STAMP) ## Generate deploy/dev-secrets/ (git-ignored): dev PKI, fleet keys, worker token, passwords
	PYTHON=$(PY) bash deploy/dev-secrets.sh

deploy-check: $(STAMP) ## Lint deploy/, k8s/ and helm/ statically: hadolint, compose schema, Kubernetes schemas, the chart rendered by Helm's engine, deploy tests
	$(VENV)/bin/hadolint -c deploy/docker/.hadolint.yaml deploy/docker/*.Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml
	$(VENV)/bin/kubernetes-validate --strict --quiet -k 1.31.0 $(filter-out k8s/kustomization.yaml,$(wildcard k8s/*.yaml))
	$(VENV)/bin/check-jsonschema --schemafile helm/omega/values.schema.json helm/omega/values.yaml
	bash tools/install-system-deps.sh
	promtool check config deploy/prometheus/prometheus.yml
	promtool test rules deploy/prometheus/tests/omega-alerts.test.yml
	$(PY) -m pytest tests/deploy

prometheus-live: $(STAMP) ## A real Prometheus scraping a local shard and worker with the alert rules (~11 s)
	$(PY) -m pytest -m integration tests/integration/test_prometheus_live.py

clean: ## Remove caches and build artefacts (keeps .venv and the data cache)
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
