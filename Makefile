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
	$(PY) -m pip install -q --no-deps "spikingjelly==2.0.0" loguru  # see pyproject.toml: not its torchaudio
	touch $(STAMP)

$(DEMO_DATA)/train.beton: | $(STAMP)
	$(PY) -m data_pipelines.build digits --out $(DEMO_DATA)

$(SEQ_DATA)/train.beton: | $(STAMP)
	$(PY) -m data_pipelines.build seqdigits --out $(SEQ_DATA)

demo: $(STAMP) $(DEMO_DATA)/train.beton
	$(PY) -m train --config configs/demo_digits.yaml data.path=$(DEMO_DATA)

# The functional-roles study on three embedded tasks: the paper's 12 variants (leak x reset x
# recurrence) x 3 seeds on the digits (static), the delayed spiking XOR (memory) and MNIST-1D
# (temporal; sequential digits until configs/study_mnist1d.yaml exists), in two worker processes of
# one thread each; a report per task and the cross-task findings table. A rerun resumes; the exit
# code says whether some run failed (the reports name it).
XOR_DATA := data/delayed_xor_d40
STUDY_XOR := $(wildcard configs/study_xor.yaml)
STUDY_MNIST1D := $(wildcard configs/study_mnist1d.yaml)
STUDY_TASKS := configs/study_digits.yaml $(STUDY_XOR) $(or $(STUDY_MNIST1D),configs/study_seqdigits.yaml)
STUDY_DATA := $(DEMO_DATA)/train.beton $(if $(STUDY_XOR),$(XOR_DATA)/train.beton) \
	$(if $(STUDY_MNIST1D),data/mnist1d/train.beton,$(SEQ_DATA)/train.beton)
STUDY_WORKERS ?= 2

# The embedded XOR is built at a short delay (configs/study_xor.yaml); the builder's defaults are
# DH-SNN's full size (delay 180, T = 200: configs/study_paper_xor.yaml).
$(XOR_DATA)/train.beton: | $(STAMP)
	$(PY) -m data_pipelines.build delayed_xor --out $(XOR_DATA) --delay 40 --train 1000 --val 250

data/%/train.beton: | $(STAMP)
	$(PY) -m data_pipelines.build $* --out data/$*

study: $(STAMP) $(STUDY_DATA)
	$(PY) -m study run $(foreach t,$(STUDY_TASKS),--task $(t)) --workers $(STUDY_WORKERS)

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

# SpikingJelly 2.0 (installed with the test extras) is the anchor the benchmarks compare against.
bench: $(STAMP)
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
