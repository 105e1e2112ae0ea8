# Two entry points for a fresh Debian 12 machine (run as root): `make demo` and `make test`.
# Both install what they need and are idempotent: a second run reuses the venv and the data.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := pkg-config gcc libturbojpeg0-dev libjpeg-dev libopencv-dev slurm-wlm munge iproute2 chromium
DEMO_DATA := data/digits
SEQ_DATA := data/seqdigits
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast study bench mlflow-ui install apt clean-runs

install: $(STAMP)

# apt only when a package is missing, so a second run does not touch the network.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# torch is pinned with the torchvision it was built with (timm needs torchvision; the local
# CPU-only torch wheel cannot load it). FFCV compiles against turbojpeg/OpenCV from apt and
# needs numpy present at build time, hence no build isolation for it. gcc + libjpeg-dev: the
# loaders' region JPEG decoder (data_pipelines/native/jpeg_region.c) is built on first use.
$(STAMP): pyproject.toml | apt
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==2.14.*" "torchvision==0.29.*"
	$(PY) -m pip install -q numpy pkgconfig cython "pillow" "opencv-python-headless"
	$(PY) -m pip install -q --no-build-isolation "ffcv==1.0.2"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

$(DEMO_DATA)/train.beton: | $(STAMP)
	$(PY) -m data_pipelines.build digits --out $(DEMO_DATA)

$(SEQ_DATA)/train.beton: | $(STAMP)
	$(PY) -m data_pipelines.build seqdigits --out $(SEQ_DATA)

demo: $(STAMP) $(DEMO_DATA)/train.beton
	$(PY) -m train --config configs/demo_digits.yaml data.path=$(DEMO_DATA)

# The functional-roles study on the embedded data: 18 LIF variants on the digits (static) and on
# sequential digits (temporal), each trained, evaluated and reported; a rerun resumes. Both grids
# run even if a variant of the first fails (the report lists it); the exit code says so.
study: $(STAMP) $(DEMO_DATA)/train.beton $(SEQ_DATA)/train.beton
	@$(PY) -m study run --config configs/study_digits.yaml data.path=$(DEMO_DATA); a=$$?; \
	$(PY) -m study run --config configs/study_seqdigits.yaml data.path=$(SEQ_DATA); b=$$?; \
	exit $$(( a || b ))

# Two pytest-xdist workers: single-process trainer runs use one thread each, and much of an
# end-to-end test is waiting (process start, Slurm scheduling, a server coming up), so two tests at
# once keep a 2-core CI machine busy. Tests on a Slurm cluster all go to one worker (loadgroup).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PYTEST)

# The inner loop: everything but the tests that start a process, a server or a cluster (marked
# `slow`); `make test` (and CI) runs those too.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# SpikingJelly 2.0 is the anchor the benchmarks compare against (pure-Python wheels).
bench: $(STAMP)
	$(PY) -m pip install -q --no-deps "spikingjelly==2.0.0" loguru
	$(PY) -m benchmarks.run

# MLflow UI over the runs' SQLite store (127.0.0.1 only).
MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP)
	@mkdir -p runs
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --app-name spikescale --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db \
	  --default-artifact-root $(CURDIR)/runs/mlartifacts

clean-runs:
	rm -rf runs
