#!/usr/bin/env bash
# The GPU proof in one script (about 8 minutes on an H200): the CUDA tests, then the layer,
# training and decode benchmarks. Tables and logs go to $OUT (default ./gpu-out):
#   pytest_cuda.txt   `pytest -m cuda` (parity on CUDA, graph decoding, no host syncs)
#   gpu_tables.md     the benchmark tables (benchmarks/gpu.py), appended section by section
#   gpu_bench.txt     the benchmark's full output
# Uses the machine's python3 (with torch and transformers) and this checkout's src/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-180}" "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py \
    2>&1 | tee "$OUT/pytest_cuda.txt"
timeout "${BENCH_TIMEOUT:-360}" "$PY" benchmarks/gpu.py --out "$OUT" ${GPU_BENCH_ARGS:-} \
    2>&1 | tee "$OUT/gpu_bench.txt"
