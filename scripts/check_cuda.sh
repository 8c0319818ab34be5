#!/usr/bin/env bash
# What a lent CUDA machine runs, in one call (docs/BENCHMARKS.md "GPU"): the engine's tests on CUDA (HELIX_DEVICE
# overrides the tests' device="cpu"; their dtype is fp32, so greedy must stay token-identical), a real out-of-memory
# mid-step, then bench_gpu.py (bf16). Results and logs go to $OUT.
# That machine's image has torch and transformers but reaches no registry: the wheels of what else the engine imports
# travel in .gpu_wheels/ (ignored; carried), made here with
#   pip download --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 --no-deps -d .gpu_wheels llguidance gguf jsonschema referencing rpds-py \
#       jsonschema-specifications
set -u
OUT=${OUT:-bench_results/cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/scripts HELIX_DEVICE=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -m pip install -q --no-index --find-links .gpu_wheels llguidance gguf jsonschema 2>&1 | tail -2
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

ENGINE_TESTS="test_greedy_equivalence test_rejection_sampling test_eagle_engine test_eagle_sampling
  test_engine_lifecycle test_logits_processing test_seeded_sampling test_structured_engine test_planner
  test_step_cost test_embedded_pair test_gguf"
timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider --durations=5 \
  $(for t in $ENGINE_TESTS; do echo "tests/$t.py"; done) 2>&1 | tee "$OUT/tests.log" | tail -30
timeout "${OOM_S:-90}" python3 scripts/check_cuda_oom.py 2>&1 | tee "$OUT/oom.log" | tail -6
timeout "${BENCH_S:-240}" python3 scripts/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
  | grep -v '^{' | tail -12
