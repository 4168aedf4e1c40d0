#!/usr/bin/env bash
# One device call: GPU tests, kernel/sampling timing, engine checks, benchmarks ($OUT).
#   bash scripts/gpu_run.sh [all|checks|bench|bench8b|profile|spec|serving]
# spec needs SMOL=<SmolLM2 dir with an MTP head> (scripts/gpu_smollm2.sh makes one).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
what=${1:-all}
if [[ $what == all || $what == checks ]]; then
  python -m pytest tests/test_triton_kernels.py tests/test_triton_sampling.py \
    tests/test_gpu_engine.py tests/test_speculative_graphs.py tests/test_weight_apply_kernel.py \
    -q -p no:cacheprovider 2>&1 | tail -6
  python scripts/gpu_sampling.py --out $OUT 2>&1 | tail -8
  python scripts/bench_prepare_qkv.py --out $OUT 2>&1 | tail -9
  python scripts/gpu_engine_checks.py 2>&1 | tail -2
  python scripts/gpu_spec_checks.py 2>&1 | tail -2
  python scripts/bench_weight_apply.py 2>&1 | tail -4
fi
if [[ $what == all || $what == bench ]]; then
  python -m atom_rollout.bench --model qwen3-0.6b --suite ${SUITE:-full} \
    --json $OUT/bench_0.6b.json 2>&1 | tail -9
fi
if [[ $what == all || $what == bench8b ]]; then
  python -m atom_rollout.bench --model qwen3-8b --suite latency --no-hf \
    --json $OUT/bench_8b.json 2>&1 | tail -3
fi
if [[ $what == profile ]]; then  # where the time goes: by step kind, kernel family, tiles
  python scripts/profile_workload.py --kernels --workload nano-vllm \
    --json $OUT/profile_nano_async.json 2>&1 | grep -v Warn | tail -16
  python scripts/bench_decode_attention.py --out $OUT 2>&1 | grep -v "^  "
  python scripts/profile_decode.py --batch 1 2>&1 | tail -22
fi
if [[ $what == spec ]]; then
  python scripts/bench_speculative.py ${SMOL:?set SMOL} --k 3 --batches 1,16,64 \
    --eager-too 2>&1 | tail -9
fi
if [[ $what == serving ]]; then  # needs pyzmq (carry its wheel)
  python scripts/bench_core_process.py --model qwen3-0.6b --device cuda --repeats 2 \
    --json $OUT/core_process.json 2>&1 | tail -6
fi
