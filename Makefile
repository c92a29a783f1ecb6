# All targets use the virtual environment in .venv (created by `make install`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pair that timm needs; override on other machines, e.g. make install TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# two test processes (pytest-xdist; tests that share a resource are grouped in tests/conftest.py);
# serial: make test PYTEST_XDIST=
PYTEST_XDIST ?= -n 2 --dist loadgroup
DEMO_DIR ?= demo_out
NPROC ?= 2
DEMO_DATA_ARGS ?=
# extra key=value overrides for the demo's train/evaluate (tests use them for a tiny run)
DEMO_OVERRIDES ?=

.PHONY: install system-deps demo demo-data test test-fast bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev,crf,deepspeed]'
	$(PY) -m primaps_dist.primaps.native  # builds the CPU proposal kernel once (falls back with a warning without a C++ compiler)
	touch $@

demo-data: install
	$(VENV)/bin/primaps-dist make-demo-data --out $(DEMO_DIR)/images $(DEMO_DATA_ARGS)
	$(VENV)/bin/primaps-dist make-shards --images $(DEMO_DIR)/images/train/images --labels $(DEMO_DIR)/images/train/labels --out $(DEMO_DIR)/shards/train --shard-size 32 --classes $(DEMO_DIR)/images/classes.json
	$(VENV)/bin/primaps-dist make-shards --images $(DEMO_DIR)/images/val/images --labels $(DEMO_DIR)/images/val/labels --out $(DEMO_DIR)/shards/val --shard-size 32 --classes $(DEMO_DIR)/images/classes.json

demo: demo-data
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m primaps_dist.train --config configs/demo.yaml \
		data.train_shards=$(DEMO_DIR)/shards/train data.val_shards=$(DEMO_DIR)/shards/val train.output_dir=$(DEMO_DIR)/run \
		$(DEMO_OVERRIDES)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m primaps_dist.evaluate --config configs/demo.yaml \
		--checkpoint $(DEMO_DIR)/run/checkpoints/latest --out $(DEMO_DIR)/run/metrics.json \
		data.train_shards=$(DEMO_DIR)/shards/train data.val_shards=$(DEMO_DIR)/shards/val train.output_dir=$(DEMO_DIR)/run \
		$(DEMO_OVERRIDES)
	$(VENV)/bin/python -m primaps_dist.predict --checkpoint $(DEMO_DIR)/run/checkpoints/latest \
		--images $(DEMO_DIR)/images/val/images --out $(DEMO_DIR)/predictions --limit 8 --assignment $(DEMO_DIR)/run/metrics.json
	@echo "pictures: $(DEMO_DIR)/run/metrics.json and confusion/per-class IoU/overlay PNGs beside it, $(DEMO_DIR)/run/eval/, $(DEMO_DIR)/predictions/"

# System packages for the integration tests (Debian/Ubuntu, root or sudo): a real single-node SLURM
# (slurm-wlm + munge) for tests/test_slurm.py, g++ for DeepSpeed's JIT-built CPU comm op. .ci/run calls this.
system-deps:
	@if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1; then \
		echo "system-deps: slurm-wlm, munge and g++ are installed"; \
	else \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq slurm-wlm munge g++ >/dev/null; \
	fi

test: install
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_XDIST) $(PYTEST_ARGS)

bench: install
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# The GPU path in one command (needs CUDA; under 8 minutes; one JSON line at the end). GPU_CHECK_ARGS=--dry: CPU.
GPU_CHECK_ARGS ?=
gpu-check: install
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(DEMO_DIR) mlflow.db mlruns .pytest_cache
