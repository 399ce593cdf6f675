# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow test-gpu gpu-check lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[onnx,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recede run -c configs/demo.yaml --out runs/demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS)

test-slow: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow

test-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m 'gpu or trt'

# On a lent CUDA machine, nothing installed (docs/gpu-check.md); GPU_CHECK_ARGS=--dry-run on a CPU.
# The interpreter: the venv's where it exists (a CPU machine's system python3 has no torch), else
# python3 (a lent machine has no .venv, and its python3 has torch); tests/test_gpu_check.py.
GPU_CHECK_OUT ?= runs/gpu-check
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_CHECK_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline kernels tests benchmarks

clean:
	rm -rf runs .pytest_cache build *.egg-info

bench: $(STAMP)
	$(PY) benchmarks/kernel_bench.py
	$(PY) -m pip install --quiet 'torch-pruning==1.6.1'
	$(PY) benchmarks/prune_speed.py
	$(VENV)/bin/recede run -c configs/fashion_mnist.yaml --out runs/fashion_mnist
