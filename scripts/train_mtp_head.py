"""Train an MTP draft head for a checkpoint by self-distillation, save it in the
checkpoint's own directory (our layout, see atom_rollout/models/mtp.py) and print the
engine's draft acceptance per position with it.

    python scripts/train_mtp_head.py MODEL_DIR [--device cuda] [--steps 300] [--loss kl|ce|tv]
        [--depth D] [--greedy-prompts N] [--bf16] [--init last-layer] [--data FILE]
        [--out DIR] [--init-from MTP_SAFETENSORS]
    python scripts/train_mtp_head.py MODEL_DIR --steps 0     # measure MODEL_DIR's head

Data: the model's own continuations of arithmetic prompts, made with the rollout engine:
``--n`` samples at temperature 1 of each of ``--prompts`` prompts plus the greedy
continuation of ``--greedy-prompts`` other prompts (greedy text is what a temperature-0
rollout drafts against; sampled text alone under-represents it). ``--data FILE`` keeps
the token ids in FILE (made once, reused by later runs). The head is
`atom_rollout.rl.mtp_head.MTPHead`, the same layer the engine drafts with; the policy
stays frozen. ``--init last-layer`` starts its decoder block from a copy of the policy's
last layer instead of a random one. The loss is KL(policy || draft) over ``--depth``
chained draft steps (as the engine chains them) by default; ``--loss ce --depth 1`` is
plain next-next-token cross-entropy; ``--loss tv`` minimises TV(policy, draft), i.e.
maximises the acceptance probability itself (meant for fine-tuning a KL-trained head,
``--init-from``). AdamW, 5% warmup, cosine decay to 10%; ``--bf16``
runs the policy and the head under bfloat16 autocast. The head goes to MODEL_DIR, or with
``--out DIR`` to a new directory that links MODEL_DIR's files; acceptance is printed for
temperature 1 and 0 on held-out prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.rl.mtp_head import MTPHead
from atom_rollout.rl.rollout import encode_prompt
from atom_rollout.rl.tasks import TaskConfig, arithmetic_rows


def distillation_data(model_dir: str, args) -> list[list[int]]:
    if args.data and os.path.exists(args.data):
        with open(args.data) as f:
            return json.load(f)
    engine = RolloutEngine(model_dir, device=args.device, show_progress=False,
                           gpu_memory_utilization=args.gpu_memory_utilization)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = arithmetic_rows(TaskConfig(num=args.prompts + args.greedy_prompts,
                                      template=args.template, seed=1))
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    sampled = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outs = engine.generate_batch(prompts[:args.prompts], sampled)
    if args.greedy_prompts:
        outs += engine.generate_batch(prompts[args.prompts:], greedy)
    sequences = [p + s.token_ids for p, o in zip(prompts, outs) for s in o.samples]
    if args.data:
        with open(args.data + ".part", "w") as f:
            json.dump(sequences, f)
        os.replace(args.data + ".part", args.data)  # whole or absent for another process
    return sequences


def train(policy, sequences: list[list[int]], args) -> MTPHead:
    head = MTPHead(policy).float()
    if args.init == "last-layer":
        _copy_last_layer(head, policy)
    if args.init_from:
        head.load_named_tensors(load_file(args.init_from))
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(args.steps))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(args.steps):
        if args.max_seconds and time.perf_counter() - start > args.max_seconds:
            print(f"stopped at step {step}: --max-seconds {args.max_seconds}")
            break
        batch = [sequences[i] for i in torch.randint(len(sequences), (args.batch,),
                                                     generator=generator).tolist()]
        ids, mask = _padded(batch, args.device)
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=args.bf16):
            hidden, teacher = _policy_outputs(policy, ids, with_logits=args.loss != "ce")
            loss = head.loss(ids, hidden, mask, teacher_logits=teacher, depth=args.depth,
                             divergence="tv" if args.loss == "tv" else "kl")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  mtp {args.loss} loss (depth {args.depth}) {loss.item():.3f}")
    return head


def _copy_last_layer(head: MTPHead, policy) -> None:
    """The head's decoder block (attention, MLP and their norms) from the policy's last."""
    last, layer = policy.model.layers[-1], head.layers[0]
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        getattr(layer, name).load_state_dict(getattr(last, name).state_dict())


def _padded(batch: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in batch)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in batch], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch],
                        device=device, dtype=torch.bool)
    return ids, mask


@torch.no_grad()
def _policy_outputs(policy, ids: torch.Tensor, with_logits: bool):
    """The frozen policy's last hidden states and (for distillation) its logits, one forward."""
    hidden = policy.model(ids).last_hidden_state.float()
    logits = policy.get_output_embeddings()(hidden) if with_logits else None
    return hidden, logits


def _warmup_cosine(steps: int, warmup_fraction: float = 0.05, floor: float = 0.1):
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def save_head(model_dir: str, head: MTPHead, out: str | None) -> str:
    """Writes the head (and the config field) to model_dir, or to a new directory ``out``
    holding links to model_dir's other files; returns the directory."""
    target = out or model_dir
    if out:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(model_dir):
            link = os.path.join(out, name)
            if name not in ("config.json", "mtp.safetensors") and not os.path.exists(link):
                os.symlink(os.path.abspath(os.path.join(model_dir, name)), link)
    tensors = {name: t.to(torch.bfloat16).cpu().contiguous() for name, t in head.named_tensors()}
    save_file(tensors, os.path.join(target, "mtp.safetensors"))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return target


def acceptance(model_dir: str, args, k: int) -> list[dict]:
    """Draft acceptance per position on held-out prompts, at temperature 1 and 0."""
    engine = RolloutEngine(model_dir, device=args.device, show_progress=False,
                           num_speculative_tokens=k,
                           gpu_memory_utilization=args.gpu_memory_utilization)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = arithmetic_rows(TaskConfig(num=args.eval_prompts, template=args.template, seed=2))
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    results = []
    for temperature in (1.0, 0.0):
        engine.core.reset_counters()
        start = time.perf_counter()
        engine.generate_batch(prompts, SamplingParams(temperature=temperature,
                                                      max_tokens=args.max_tokens))
        results.append({"k": k, "temperature": temperature, "acceptance_by_position":
                        engine.stats()["draft_acceptance_by_position"],
                        "seconds": time.perf_counter() - start})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=300,
                        help="0: only measure the acceptance of MODEL_DIR's head")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop training early (the schedule is cut short) after this")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--template", default="{a}{op}{b}=")
    parser.add_argument("--loss", choices=["kl", "ce", "tv"], default="kl",
                        help="kl: match the policy's distributions; ce: its sampled tokens; "
                        "tv: the acceptance probability itself")
    parser.add_argument("--greedy-prompts", type=int, default=0,
                        help="prompts whose greedy continuation joins the data")
    parser.add_argument("--data", default=None, help="token-id file: load, or make and save")
    parser.add_argument("--init", choices=["random", "last-layer"], default="random")
    parser.add_argument("--init-from", default=None,
                        help="an mtp.safetensors to start from (fine-tuning a trained head)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="of the engines that make data and measure acceptance")
    parser.add_argument("--out", default=None, help="a new model directory for the head")
    parser.add_argument("--depth", type=int, default=None,
                        help="chained draft steps trained (default: min(k, 3))")
    args = parser.parse_args(argv)
    args.depth = args.depth or min(args.k, 3)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 policy forward and vocab-sized loss
    if args.steps == 0:  # measure the head MODEL_DIR already has
        for result in acceptance(args.model_dir, args, args.k):
            print(json.dumps(result))
        return
    start = time.perf_counter()
    sequences = distillation_data(args.model_dir, args)
    print(f"data: {len(sequences)} sequences in {time.perf_counter() - start:.1f} s")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the data engine's KV cache, for other processes
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    policy = policy.to(args.device).eval()
    policy.requires_grad_(False)
    start = time.perf_counter()
    head = train(policy, sequences, args)
    print(f"training: {args.steps} steps in {time.perf_counter() - start:.1f} s")
    target = save_head(args.model_dir, head, args.out)
    for result in acceptance(target, args, args.k):
        print(json.dumps(result))


if __name__ == "__main__":
    main()
