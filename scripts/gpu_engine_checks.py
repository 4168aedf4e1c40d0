"""GPU engine checks (issue 4): Triton+CUDA-graph engine vs the torch backend and
vs transformers. Run on a CUDA machine; prints a table and writes JSON to $OUT.

  python scripts/gpu_engine_checks.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import build_checkpoint  # noqa: E402

from atom_rollout import RolloutEngine, SamplingParams  # noqa: E402

MEDIUM = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=2048)


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 300, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def backend_agreement(model_dir: str) -> dict:
    """bf16: triton (graphs) vs torch (eager) greedy tokens and logprobs."""
    ps = prompts(64, MEDIUM["vocab_size"])
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    outs = {}
    for backend, eager in (("triton", False), ("torch", True)):
        engine = RolloutEngine(model_dir, dtype="bfloat16", device="cuda", kernel_backend=backend,
                               enforce_eager=eager, show_progress=False, max_num_seqs=64)
        start = time.perf_counter()
        outs[backend] = engine.generate_batch(ps, params)
        outs[backend + "_s"] = time.perf_counter() - start
        del engine
        torch.cuda.empty_cache()
    same = total = 0
    diffs = []
    for a, b in zip(outs["triton"], outs["torch"]):
        ta, tb = a.samples[0].token_ids, b.samples[0].token_ids
        same += sum(x == y for x, y in zip(ta, tb))
        total += len(ta)
        agree = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        diffs += [abs(x - y) for x, y in zip(a.samples[0].logprobs[:agree],
                                             b.samples[0].logprobs[:agree])]
    diffs = torch.tensor(diffs)
    forced = teacher_forced_agreement(model_dir, ps[:16], outs["torch"][:16])
    return {"check": "bf16 triton+graphs vs torch greedy", "token_agreement": same / total,
            "teacher_forced_agreement": forced,
            "logprob_max_abs_diff": diffs.max().item(), "logprob_mean_abs_diff": diffs.mean().item(),
            "triton_s": outs["triton_s"], "torch_s": outs["torch_s"]}


def teacher_forced_agreement(model_dir: str, ps, reference) -> float:
    """Given the torch backend's own greedy prefix, does the triton engine pick the
    same next token? (Free-running agreement compounds one near-tie into a whole
    divergent tail; this isolates per-step agreement.)"""
    engine = RolloutEngine(model_dir, dtype="bfloat16", device="cuda", show_progress=False)
    prefixes, expected = [], []
    for prompt, out in zip(ps, reference):
        tokens = out.samples[0].token_ids
        for i in range(len(tokens)):
            prefixes.append(prompt + tokens[:i])
            expected.append(tokens[i])
    got = engine.generate_batch(prefixes, SamplingParams(temperature=0, max_tokens=1,
                                                         ignore_eos=True))
    return sum(o.samples[0].token_ids[0] == e for o, e in zip(got, expected)) / len(expected)


def fp32_vs_transformers(model_dir: str, hf_model) -> dict:
    """fp32 GPU engine (triton, graphs) sampled logprobs vs transformers' scores."""
    engine = RolloutEngine(model_dir, dtype="float32", device="cuda", show_progress=False)
    ps = prompts(16, MEDIUM["vocab_size"], seed=1)
    outs = engine.generate_batch(ps, SamplingParams(n=2, temperature=1.0, max_tokens=64,
                                                    ignore_eos=True, seed=3))
    hf_model = hf_model.cuda()
    worst = 0.0
    score_worst = 0.0
    for prompt, out in zip(ps, outs):
        for sample in out.samples:
            ids = torch.tensor([prompt + sample.token_ids], device="cuda")
            with torch.no_grad():
                logits = hf_model(ids).logits[0, len(prompt) - 1:-1].float()
            ref = torch.log_softmax(logits, -1).gather(
                -1, torch.tensor(sample.token_ids, device="cuda")[:, None])[:, 0].cpu()
            worst = max(worst, (torch.tensor(sample.logprobs) - ref).abs().max().item())
            score = engine.score([prompt], [sample.token_ids])[0]
            score_worst = max(score_worst, (score - ref).abs().max().item())
    return {"check": "fp32 GPU vs transformers", "sampled_logprob_max_abs_diff": worst,
            "score_max_abs_diff": score_worst}


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_checkpoint(tmp, "qwen3", seed=0, **MEDIUM)
        results = [fp32_vs_transformers(tmp, hf_model), backend_agreement(tmp)]
    with open(os.path.join(out_dir, "engine_checks.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
