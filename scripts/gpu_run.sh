#!/usr/bin/env bash
# One device call: GPU tests, sampling kernel timing, engine checks, benchmarks ($OUT).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
what=${1:-all}
if [[ $what == all || $what == checks ]]; then
  python -m pytest tests/test_triton_kernels.py tests/test_triton_sampling.py \
    tests/test_gpu_engine.py -q -x -p no:cacheprovider 2>&1 | tail -3
  python scripts/gpu_sampling.py --out $OUT 2>&1 | tail -8
  python scripts/gpu_engine_checks.py 2>&1 | tail -2
fi
if [[ $what == all || $what == bench ]]; then
  python -m atom_rollout.bench --model qwen3-0.6b --suite ${SUITE:-full} \
    --json $OUT/bench_0.6b.json 2>&1 | tail -9
fi
if [[ $what == all || $what == bench8b ]]; then
  python -m atom_rollout.bench --model qwen3-8b --suite latency --no-hf \
    --json $OUT/bench_8b.json 2>&1 | tail -3
fi
