# dl_inference developer commands. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= examples/models
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# MLServer for load_tests/compare_mlserver.py lives in its own venv: its pins must not touch ours.
# mlserver 1.7.1 supports Python 3.9-3.12; uvloop >= 0.22 crashes its parallel inference workers.
MLSERVER_VENV ?= .venv-mlserver
MLSERVER_PYTHON ?= $(PYTHON)
MLSERVER_VERSION ?= 1.7.1
# Intel Extension for TensorFlow (ITEX) workers live in their own venv: its last CPU build (2.15.0.0; the
# later 2.15.0.x are XPU-only; the trailing .0 of intel-extension-for-tensorflow-lib's version marks the
# CPU build) needs TensorFlow 2.15 and protobuf<4.24, so only the workers of models whose config says
# `worker_environment: itex` run there (serve --worker-environment itex=$(ITEX_VENV)/bin/python).
# TensorFlow 2.15 takes Python 3.9-3.11 and dl_inference 3.11+, so 3.11 (ITEX_PYTHON: the venv's interpreter).
ITEX_VENV ?= .venv-itex
ITEX_PYTHON ?= $(PYTHON)
ITEX_VERSION ?= 2.15.0.0
ITEX_TF_VERSION ?= 2.15.1

.PHONY: install serve examples test test-unit test-integration test-tools fuzz lint proto proto-check bench clean bench-balancer perf \
	mlserver-env bench-mlserver itex-env bench-tensorflow-cpu \
	bench-pytorch-gpu faults faults-quick soak k8s-validate images containers-lint test-containers

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'tensorflow-serving-api>=2.16'
	touch $@

install: $(VENV)/.installed

examples: install
	$(PY) -m dl_inference make-examples $(REPO)

serve: examples
	$(PY) -m dl_inference serve --model-repository $(REPO) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# The ITEX worker environment is part of the suite (tests/integration/test_itex_env.py; built once, ~1 min),
# and so is the compose stack under podman (test-containers: ~5 min cold, ~1.5 min with images cached).
test: install itex-env
	$(PY) scripts/gen_protos.py --check
	$(VENV)/bin/ruff check dl_inference tests load_tests scripts
	$(VENV)/bin/ruff format --check dl_inference tests load_tests scripts
	$(VENV)/bin/mypy dl_inference
	$(PY) -m pytest -q -ra
	$(MAKE) test-containers

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

# The tests of load_tests (the library and the scripts); about a minute.
test-tools: install
	$(PY) -m pytest -q tests/tools

# Long property-based fuzz of the HTTP/gRPC parsers, validation and the real server (tests/fuzz):
# FUZZ_EXAMPLES per test (the server tests a quarter of it, at most 5,000 requests), new random
# seeds each run; failures are kept in .hypothesis/ and replayed first next time. Hours on 2 cores
# at the default; `make test` runs the same tests briefly (profile "ci", well under a minute).
# e.g. make fuzz FUZZ_EXAMPLES=2000 FUZZ_ARGS="--hypothesis-seed=1 -k http_codec"
FUZZ_EXAMPLES ?= 20000
FUZZ_ARGS ?=
fuzz: install
	HYPOTHESIS_PROFILE=long FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q --timeout=0 \
		--hypothesis-show-statistics tests/fuzz $(FUZZ_ARGS)

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

# perf_analyzer-style sweep against a running server (`make serve` in another shell), e.g.
# make perf PERF_ARGS="--scenario image_bytes --url localhost:8001 --concurrency 1,4 --csv out.csv"
PERF_ARGS ?= --scenario tiny_mlp --url localhost:$(GRPC_PORT)
perf: install
	$(PY) -m load_tests.perf $(PERF_ARGS)

# Fault scenarios under open-loop load (SIGKILL a worker, SIGSTOP / cut off / SIGTERM a node, SIGTERM the gateway,
# 2x overload): one table in load_tests/results/faults.{json,txt}; ~7 min (faults-quick: ~3 min,
# results/faults_quick.*). E.g. make faults FAULTS_ARGS="--only overload,stop_node --rate 300"
FAULTS_ARGS ?=
faults: install
	$(PY) -m load_tests.faults $(FAULTS_ARGS)

faults-quick: install
	$(PY) -m load_tests.faults --quick $(FAULTS_ARGS)

# 30 min at half capacity: RSS growth (target < 5%), errors, p50/p99 per 5-min slice, in
# load_tests/results/soak.{json,txt}. A short one: make soak SOAK_ARGS="--minutes 2"
SOAK_ARGS ?=
soak: install
	$(PY) -m load_tests.soak $(SOAK_ARGS)

# ResNet-50 fp32 / fp16 / fp16 + torch.compile on the PyTorch backend, on GPU 0 (needs a CUDA torch);
# on the GPU machine without the venv: `python3 -m load_tests.bench_pytorch_gpu` from the repo root.
bench-pytorch-gpu: install
	$(PY) -m load_tests.bench_pytorch_gpu

# MLServer's venv; onnxruntime pinned to the version our venv has, so both servers run the same one.
$(MLSERVER_VENV)/.installed: | $(VENV)/.installed
	$(MLSERVER_PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLSERVER_VENV)/bin/python -m pip install -q 'mlserver==$(MLSERVER_VERSION)' 'uvloop<0.22' numpy \
		"onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')"
	$(MLSERVER_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(mlserver|onnxruntime|numpy|uvloop|grpcio) '
	touch $@

mlserver-env: $(MLSERVER_VENV)/.installed

# The ITEX worker venv (~1.7 GB; 40-60 s from scratch on the dev machine, `time make itex-env`).
# tensorflow-cpu instead of the `tensorflow` wheel ITEX names (the same TensorFlow without CUDA kernels,
# a smaller download), so ITEX goes in with --no-deps and its own requirements are listed here. Beside
# them only what `python -m dl_inference worker` imports: grpcio (our generated stubs need >= 1.81.1),
# health/reflection 1.62.3 (the last built for protobuf 4), pyyaml, uvloop, orjson (the standalone
# worker's gRPC frontend, TF-Serving JSON); numpy<2 and ml_dtypes 0.3 come with TensorFlow 2.15. Our
# package: -e . --no-deps. The list lives here, so editing this Makefile re-runs it (pip keeps what fits).
$(ITEX_VENV)/.installed: pyproject.toml Makefile
	@$(ITEX_PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else \
		"TensorFlow 2.15 takes Python 3.9-3.11 and dl_inference 3.11+: make itex-env ITEX_PYTHON=python3.11")'
	$(ITEX_PYTHON) -m venv $(ITEX_VENV)
	$(ITEX_VENV)/bin/python -m pip install -q --upgrade pip
	$(ITEX_VENV)/bin/python -m pip install -q 'tensorflow-cpu==$(ITEX_TF_VERSION)' \
		'intel-extension-for-tensorflow-lib==$(ITEX_VERSION).0' 'protobuf<4.24' 'absl-py==1.4.0' wheel \
		'numpy<2' 'grpcio>=1.81.1,<2' 'grpcio-health-checking==1.62.3' 'grpcio-reflection==1.62.3' \
		'pyyaml>=6' 'uvloop>=0.19' 'orjson>=3.9'
	$(ITEX_VENV)/bin/python -m pip install -q --no-deps 'intel-extension-for-tensorflow==$(ITEX_VERSION)'
	$(ITEX_VENV)/bin/python -m pip install -q --no-deps -e .
	$(ITEX_VENV)/bin/python -c 'import dl_inference.worker.main, dl_inference.frontends.grpc_server, \
		intel_extension_for_tensorflow as itex, tensorflow as tf; \
		print("itex", itex.__version__, "tensorflow", tf.__version__)'
	touch $@

itex-env: $(ITEX_VENV)/.installed

# ResNet-50 SavedModel served on CPU: stock TensorFlow, oneDNN off/on, ITEX, ONNX Runtime (~10 min on 2 cores).
bench-tensorflow-cpu: install itex-env
	$(PY) -m load_tests.bench_tensorflow_cpu

# dl-inference serve vs MLServer on the same models, same client (~10 min).
bench-mlserver: install mlserver-env
	$(PY) -m load_tests.compare_mlserver --mlserver-venv $(MLSERVER_VENV)

# Kubernetes manifests (docker/k8s), offline, no cluster: every manifest strictly against the API schemas
# of Kubernetes 1.30-1.37 (kubernetes-validate, in its own small venv), the kustomize rendering where
# kubectl is installed, then the consistency tests (tests/unit/test_k8s_manifests.py). A few seconds.
K8S_VENV ?= .venv-k8s
K8S_VALIDATE_VERSION ?= 1.37.0
K8S_VERSIONS ?= 1.30,1.31,1.32,1.33,1.34,1.35,1.36,1.37

$(K8S_VENV)/.installed-$(K8S_VALIDATE_VERSION):
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install -q 'kubernetes-validate==$(K8S_VALIDATE_VERSION)'
	touch $@

k8s-validate: install $(K8S_VENV)/.installed-$(K8S_VALIDATE_VERSION)
	$(K8S_VENV)/bin/python docker/k8s/validate.py --versions $(K8S_VERSIONS)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_k8s_manifests.py

# Container images (docker/Dockerfile.*) built with podman from a locally made Debian base (no registry
# needed; as root): sets podman up, makes the base, builds IMAGES (default: gateway, worker-cpu,
# worker-tensorflow; also worker-itex, worker-gpu where a CUDA base is reachable). README "Containers".
IMAGES ?=
images:
	scripts/containers/setup_podman.sh
	scripts/containers/make_base_image.sh
	scripts/containers/build_images.sh $(IMAGES)

# hadolint on every Dockerfile, shellcheck, docker-compose config of each profile (no engine; seconds).
containers-lint:
	scripts/containers/lint.sh

# End to end on podman + docker-compose 1.29 (as root): setup, lint, base + images, compose up (cpu profile),
# health, tritonclient gRPC/HTTP answers, a worker container killed under load and brought back, a worker
# crash, compose down; a table of steps and timings. ~5.5 min cold, 1.5-2.5 min with the images cached.
# CONTAINERS_ARGS: --itex (ITEX image + profile), --no-build (use built images), --keep-up.
CONTAINERS_ARGS ?=
test-containers: install
	$(PY) scripts/containers/test_compose.py $(CONTAINERS_ARGS)

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) $(ITEX_VENV) examples/models .pytest_cache .mypy_cache .ruff_cache
