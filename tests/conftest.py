import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter; it must be chosen before triton is
    # imported, and transformers may import triton early.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU tests compare with transformers in fp32; on a GPU machine device="auto" would
# pick cuda/bf16. GPU tests pass device="cuda" explicitly.
os.environ.setdefault("ATOM_ROLLOUT_DEVICE", "cpu")

from models import VARIANTS, build_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """variant name -> (model_dir, the transformers model holding the same weights)."""
    built = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        built[variant] = (str(path), build_checkpoint(path, variant))
    return built


@pytest.fixture(scope="session")
def tiny_vocab_checkpoint(tmp_path_factory):
    """A model over 8 tokens, for comparing sample frequencies with probabilities."""
    path = tmp_path_factory.mktemp("tiny_vocab")
    model = build_checkpoint(path, "qwen3", seed=3, vocab_size=8, bos_token_id=0,
                             eos_token_id=7, pad_token_id=0)
    return str(path), model


@pytest.fixture(scope="session")
def llama(checkpoints):
    return checkpoints["llama"]


@pytest.fixture(scope="session")
def llama_engine(llama):
    from atom_rollout import RolloutEngine
    return RolloutEngine(llama[0], show_progress=False)


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation, EOS not special (like ignore_eos)."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(int(hf_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt):]


# ---- serving layers (core process, HTTP server, Ray): a checkpoint with a tokenizer

@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """The llama test model plus a character tokenizer with a chat template."""
    from char_tokenizer import save_char_tokenizer
    path = tmp_path_factory.mktemp("served")
    build_checkpoint(path, "llama")
    save_char_tokenizer(path)
    return str(path)
