# kubetrain: every command bootstraps what it needs on a fresh machine.
#   make demo   train the whole curriculum locally on the CPU (examples/tiny-run.yaml)
#   make test   install everything the tests need and run every tier
#   make images build the operator and trainer images (podman or docker)
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
KUBETRAIN := $(VENV)/bin/kubetrain
STAMP := $(VENV)/.installed
CACHE := .cache
BIN := $(CACHE)/bin
PYTEST_ARGS ?=

.PHONY: help
help:
	@echo "make demo         train examples/tiny-run.yaml locally (pretrain -> sft -> dpo -> grpo on CPU)"
	@echo "make test         install what the tests need and run unit, integration and e2e tiers"
	@echo "make test-unit    only the fast unit tier"
	@echo "make crd          regenerate crds/ and the chart's copy from kubetrain.core.api"
	@echo "make docs         regenerate the README's field reference"
	@echo "make cluster-bin  build kube-apiserver, controller-manager, scheduler, etcd, kwok, helm, weed, kueue"
	@echo "make bench        run the benchmarks (numbers in bench/results/)"
	@echo "make bench-scale  the operator at RUNS runs on NODES KWOK nodes (default 100, 18)"
	@echo "make images       build the operator and trainer images (REGISTRY=..., TAG=...)"
	@echo "make push-images  push them to REGISTRY"
	@echo "make test-images  build the images, then run the tests that run them"
	@echo "make lint         ruff check, ruff format --check, mypy"

# ---------------------------------------------------------------- python environment
# pip is upgraded first: the old resolver can backtrack for many minutes.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $@

.PHONY: venv
venv: $(STAMP)

.PHONY: constraints
constraints: $(STAMP)
	{ sed -n '1,2p' requirements/constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^kubetrain'; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

# ---------------------------------------------------------------- system packages
# A real Prometheus (and promtool) from Debian's packages for the metrics tests.
.PHONY: prometheus
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	  pkill -x prometheus >/dev/null 2>&1 || true; }

# Podman from Debian's packages, when neither podman nor docker is installed: with runc
# (see images/engine.sh), mmdebstrap for a base image where no registry is reachable.
CONTAINER_PACKAGES := podman runc uidmap slirp4netns fuse-overlayfs netavark aardvark-dns \
	containernetworking-plugins mmdebstrap
.PHONY: container-tools
container-tools:
	@{ command -v podman >/dev/null && command -v mmdebstrap >/dev/null; } \
	  || { command -v docker >/dev/null && docker info >/dev/null 2>&1; } || { \
	  echo "installing Debian's podman and mmdebstrap packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(CONTAINER_PACKAGES) >/dev/null; }

# ---------------------------------------------------------------- images
.PHONY: images
images: container-tools
	bash images/build.sh

.PHONY: push-images
push-images:
	bash images/build.sh --push

# The image tests skip (saying why) when the images are missing; here they are built.
.PHONY: test-images
test-images: $(STAMP) prometheus cluster-bin images
	$(PY) -m pytest tests -m images $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || exit 1; exit $$rc

# ---------------------------------------------------------------- control plane (Go)
# The control plane, Helm and SeaweedFS (the e2e tier's S3 server); ONLY="weed" builds
# just the binaries named.
.PHONY: cluster-bin
cluster-bin:
	bash tests/cluster/build.sh

# ---------------------------------------------------------------- generated files
.PHONY: crd
crd: $(STAMP)
	$(KUBETRAIN) crd -o crds/trainingrun.yaml
	cp crds/trainingrun.yaml charts/kubetrain/crds/trainingrun.yaml

.PHONY: docs
docs: $(STAMP)
	$(PY) -m kubetrain.docgen.fields README.md
	$(PY) -m kubetrain.docgen.metrics README.md

# ---------------------------------------------------------------- the two commands
.PHONY: demo
demo: $(STAMP)
	$(KUBETRAIN) run examples/tiny-run.yaml --local

# pytest exits 5 when it collected nothing: treat that as a failure, never as green.
.PHONY: test
test: $(STAMP) prometheus cluster-bin
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

.PHONY: test-unit
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || exit 1; exit $$rc

.PHONY: lint
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# scale.py needs the cluster binaries and a quarter of an hour: it has a target of its own.
.PHONY: bench
bench: $(STAMP)
	mkdir -p bench/results
	for b in bench/*.py; do [ $$b = bench/scale.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

RUNS ?= 100
NODES ?= 18
.PHONY: bench-scale
bench-scale: $(STAMP) cluster-bin
	$(PY) bench/scale.py --runs $(RUNS) --nodes $(NODES)

.PHONY: clean
clean:
	rm -rf .kubetrain bench/results .pytest_cache
