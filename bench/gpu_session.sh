#!/usr/bin/env bash
# Everything issue 5 asks of a GPU, in one command on a lent GPU machine (the image's
# python3 holds a CUDA torch and triton; nothing is installed):
#
#   bench/gpu_session.sh [test|bench|sanitize|all]      (default all)
#
#   1. builds seqfuse._C with its CUDA kernels (SEQFUSE_CUDA=1, the GPU's own arch);
#   2. test: the CUDA and Triton tests on CUDA tensors (tests/cuda, tests/ops, tests/nn/test_module_backends.py), then the
#      whole suite (modules and export on the "auto" backend, which is now CUDA's);
#   3. bench: bench/test_bench_gpu.py, JSON + markdown table; the suite's GPU rows
#      (seqfuse bench -k cuda), report + saved run in $OUT/suite;
#   4. sanitize: tests/cuda under compute-sanitizer, memcheck then racecheck (issue 9),
#      with PyTorch's caching allocator off so that memcheck sees every allocation's
#      bounds; logs in $OUT/memcheck.log and $OUT/racecheck.log.
# Logs and results go to $OUT (the device tool's output folder) or bench/results/gpu/.
# The last lines printed are the summary: the device tool returns only the output's tail.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
summary=()

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$PY - > "$OUT/versions.txt" 2>&1 <<'PY'
import torch, triton
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__} "
      f"{torch.cuda.get_device_name()} cc {torch.cuda.get_device_capability()}")
PY
summary+=("$(cat "$OUT/versions.txt")")

arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
start=$(date +%s)
if ! SEQFUSE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 $PY setup.py -q develop > "$OUT/build.log" 2>&1; then
  tail -80 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
summary+=("build: ok in $(( $(date +%s) - start )) s (sm_${arch/./})")
$PY -c "import seqfuse; print(sorted(seqfuse.ops.NATIVE_KERNELS))" >> "$OUT/versions.txt"

if [ "$STAGE" = test ] || [ "$STAGE" = all ]; then
  GPU_TESTS=(tests/cuda tests/ops tests/nn/test_module_backends.py)
  $PY -m pytest "${GPU_TESTS[@]}" -q -rs -p no:cacheprovider > "$OUT/tests-gpu.log" 2>&1
  summary+=("tests/cuda + tests/ops + module backends: $(tail -1 "$OUT/tests-gpu.log")")
  $PY -m pytest tests -q -p no:cacheprovider --ignore=tests/cuda --ignore=tests/ops \
    --ignore=tests/nn/test_module_backends.py -x \
    > "$OUT/tests-all.log" 2>&1
  summary+=("rest of the suite: $(tail -1 "$OUT/tests-all.log")")
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  $PY -m pytest bench/test_bench_gpu.py -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/gpu.json" > "$OUT/bench.log" 2>&1
  summary+=("bench: $(tail -1 "$OUT/bench.log")")
  $PY bench/report.py "$OUT/gpu.json" --markdown > "$OUT/gpu.md" 2>&1 && tail -120 "$OUT/gpu.md"
  # the latency suite's GPU rows (sweeps, zoo models in cuDNN / CUDA / onnxruntime-cuda)
  $PY -m seqfuse.cli bench --only recurrent,attention,zoo -k cuda --report "$OUT/suite" > "$OUT/suite.log" 2>&1
  summary+=("suite GPU rows: $(grep -E 'passed|failed' "$OUT/suite.log" | tail -1)")
  cp bench/results/*/*.json "$OUT/suite/" 2>/dev/null
fi
if [ "$STAGE" = sanitize ] || [ "$STAGE" = all ]; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
      --print-limit 100 $PY -m pytest tests/cuda -q -x -p no:cacheprovider > "$OUT/$tool.log" 2>&1
    rc=$?
    summary+=("compute-sanitizer $tool: exit $rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1); $(grep -E 'passed|failed' "$OUT/$tool.log" | tail -1)")
  done
fi
grep -h -E "FAILED|Error" "$OUT"/tests-*.log 2>/dev/null | head -40
printf '%s\n' "${summary[@]}"
