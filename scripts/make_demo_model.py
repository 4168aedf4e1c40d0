"""Make the built-in demo model (atom_rollout/rl/demo_model): a small Qwen3-shaped model
over a character tokenizer, given a short supervised warm-up on 2-digit addition
("37+45=" -> "82</s>") so it starts non-trivial but weak; `atom-rollout demo` then
improves it with GRPO.

    python scripts/make_demo_model.py [--out atom_rollout/rl/demo_model] [--target 0.25]

The warm-up stops once greedy accuracy on held-out problems reaches --target.
"""
from __future__ import annotations

import argparse
import os
import random

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = "0123456789+-*= "
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "atom_rollout", "rl", "demo_model")


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>",
                                                unk_token="<pad>")


def make_model(vocab_size: int) -> transformers.PreTrainedModel:
    config = transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rms_norm_eps=1e-6, architectures=["Qwen3ForCausalLM"])
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def supervised_batch(tokenizer, rng: random.Random, size: int):
    """Token ids and labels (answer and EOS only) of `size` problems, right-padded."""
    rows = []
    for _ in range(size):
        prompt, answer = problem(rng)
        p = tokenizer.encode(prompt, add_special_tokens=False)
        a = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, labels


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rng: random.Random, num: int = 256) -> float:
    """Greedy decoding yields the answer exactly iff the argmax is right at every
    answer position (EOS included) under teacher forcing: one batched forward."""
    ids, labels = supervised_batch(tokenizer, rng, num)
    predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    right = (predicted == target) | (target == -100)
    return right.all(dim=1).float().mean().item()


def warm_up(model, tokenizer, target: float, max_steps: int, seed: int) -> None:
    rng, eval_rng = random.Random(seed), random.Random(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(1, max_steps + 1):
        ids, labels = supervised_batch(tokenizer, rng, 128)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            model.eval()
            accuracy = greedy_accuracy(model, tokenizer, eval_rng)
            model.train()
            print(f"step {step}  loss {loss.item():.3f}  greedy accuracy {accuracy:.2f}")
            if accuracy >= target:
                return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    warm_up(model, tokenizer, args.target, args.max_steps, args.seed)
    model.save_pretrained(args.out)
    model.generation_config.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    for name in sorted(os.listdir(args.out)):
        print(f"{os.path.getsize(os.path.join(args.out, name)) / 1024:8.1f} KiB  {name}")


if __name__ == "__main__":
    main()
