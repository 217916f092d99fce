# dl_inference developer commands. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= examples/models
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: install serve examples test test-unit test-integration lint proto proto-check bench clean bench-balancer

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

examples: install
	$(PY) -m dl_inference make-examples $(REPO)

serve: examples
	$(PY) -m dl_inference serve --model-repository $(REPO) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: install
	$(PY) scripts/gen_protos.py --check
	$(VENV)/bin/ruff check dl_inference tests load_tests scripts
	$(VENV)/bin/mypy dl_inference
	$(PY) -m pytest -q -ra

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

lint: install
	$(VENV)/bin/ruff check dl_inference tests load_tests scripts
	$(VENV)/bin/ruff format --check dl_inference tests load_tests scripts
	$(VENV)/bin/mypy dl_inference

proto: install
	$(PY) scripts/gen_protos.py

proto-check: install
	$(PY) scripts/gen_protos.py --check

# Served latency/throughput of the tiny model next to a bare grpc.aio server and in-process ORT.
bench: install
	$(PY) -m load_tests.bench_tiny --json load_tests/results/bench_tiny.json

bench-balancer: install
	$(PY) -m load_tests.bench_balancer --delay-ms 20 --concurrency 8 --rounds 3 --duration 8

clean:
	rm -rf $(VENV) examples/models .pytest_cache .mypy_cache .ruff_cache
