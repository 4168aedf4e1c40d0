"""Start-up warm-up: the kernel variants a first rollout would otherwise compile inside
its timed steps.

Decode graphs are captured (and their kernels compiled) at start-up already; prefill
tiles and the sampling kernels, whose block sizes follow the number of rows, compile
on first use, which made a first 7 s rollout on an H100 take ~12 s. The warm-up runs
one short prompt with n = 1, 2, 4, ... up to max_num_seqs samples (seeded, so unseeded
requests later draw the same noise as on an engine without it), then clears the prefix
cache and the counters, so the engine looks unused.
"""
from __future__ import annotations

from ..sampler import SamplingParams

PROMPT_TOKENS = 33  # more than the decode tiles' 16 query tokens: the prefill tiles
MAX_STEPS_PER_REQUEST = 100  # a prefill chunk or two and two tokens take a handful


def warm_up(core) -> None:
    prompt_len = max(1, min(PROMPT_TOKENS, core.max_model_len - 2))
    prompt = [1 + i % (core.vocab_size - 1) for i in range(prompt_len)]
    rows = 1
    while rows <= _most_rows(core, prompt_len):
        params = SamplingParams(n=rows, max_tokens=2, temperature=1.0, seed=0,
                                ignore_eos=True)
        seqs = core.add_request(f"warmup-{rows}", prompt, params)
        for _ in range(MAX_STEPS_PER_REQUEST):
            if all(seq.is_finished for seq in seqs):
                break
            core.step()
        else:
            raise RuntimeError(f"warm-up: {rows} samples of a {prompt_len}-token prompt did "
                               f"not finish in {MAX_STEPS_PER_REQUEST} steps")
        rows *= 2
    core.drain()
    core.step()  # hands back what the drain finished
    core.reset_prefix_cache()
    core.reset_counters()


def _most_rows(core, prompt_len: int) -> int:
    """Up to max_num_seqs samples, as many as the KV pool holds at once (so that a
    small pool does not turn the warm-up into waves of preemptions)."""
    tokens = prompt_len + 2 + 2 * core.num_draft
    blocks_per_seq = -(-tokens // core.config.block_size)
    return max(1, min(core.config.max_num_seqs,
                      len(core.block_manager.blocks) // blocks_per_seq))
