"""The fused Triton sampling pass against the torch sampler (top_k = 0, top_p = 1
rows). Without a GPU the kernels run under the Triton interpreter on CPU, so
shapes stay small and explicit ``block`` sizes split short rows into chunks."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from atom_rollout.sampler import SamplingTensors, processed_logprobs, sample  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BOUNDARY_TOL = 1e-6  # how close to a CDF step a uniform may land for tokens to differ


@pytest.fixture(scope="module")
def fused():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    # Imported here so that the kernels are decorated after TRITON_INTERPRET is set.
    from atom_rollout.kernels.triton.sampling import fused_sample
    return fused_sample


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _settings(temps: list[float], min_ps: list[float], rows: int):
    """Per-row temperature and min_p tensors, cycling through the given values."""
    temp = torch.tensor([temps[r % len(temps)] for r in range(rows)], device=DEVICE)
    min_p = torch.tensor([min_ps[r % len(min_ps)] for r in range(rows)], device=DEVICE)
    return temp, min_p


def reference(logits, temp, min_p, uniforms, banned, need_raw):
    """The torch sampler's output with SamplingTensors as the engine builds them."""
    rows = logits.shape[0]
    greedy = temp == 0
    st = SamplingTensors(
        temperature=temp, top_k=torch.zeros(rows, dtype=torch.int64, device=DEVICE),
        top_p=torch.ones(rows, device=DEVICE), min_p=min_p, uniforms=uniforms, banned=banned,
        use_sort=False, use_min_p=bool(((min_p > 0) & ~greedy).any()), num_top_logprobs=0,
        all_greedy=bool(greedy.all()), any_greedy=bool(greedy.any()),
        need_raw=need_raw or bool(greedy.any()))
    return sample(logits, st)


def torch_cdf(logits, temp, min_p, banned, row: int) -> torch.Tensor:
    """The float64 CDF the torch sampler inverts for one row."""
    logits = logits.float()
    if banned is not None:
        logits = logits.index_put((banned[0], banned[1]),
                                  torch.tensor(float("-inf"), device=DEVICE))
    zeros = torch.zeros(logits.shape[0], dtype=torch.int64, device=DEVICE)
    logp = processed_logprobs(logits, temp, zeros, torch.ones_like(temp), min_p, False, True)
    return logp[row].double().exp().cumsum(0)


def assert_at_boundary(cdf: torch.Tensor, uniform: float, token_a: int, token_b: int) -> None:
    """Two draws may differ only when the target sits on the CDF step between
    them, with no mass worth a rounding error in between."""
    lo, hi = sorted((token_a, token_b))
    target = uniform * cdf[-1].item()
    assert abs(target - cdf[lo].item()) <= BOUNDARY_TOL, (token_a, token_b, target)
    assert cdf[hi - 1].item() - cdf[lo].item() <= BOUNDARY_TOL, (token_a, token_b)


def check(fused, logits, temp, min_p, uniforms, banned=None, need_raw=True,
          on_steps: bool = False, **kwargs):
    """fused_sample equals the torch sampler: same tokens up to CDF-boundary
    ties (a vanishing fraction, unless the uniforms sit ``on_steps`` on
    purpose), logprobs within 1e-5. Returns the fused tokens."""
    tokens, logprobs, raw = fused(logits, temp, min_p, uniforms, banned, need_raw, **kwargs)
    ref = reference(logits, temp, min_p, uniforms, banned, need_raw)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert (raw is not None) == need_raw
    same = tokens == ref.token_ids
    for row in (~same).nonzero()[:, 0].tolist():
        assert temp[row] > 0, f"greedy row {row} differs"
        assert_at_boundary(torch_cdf(logits, temp, min_p, banned, row), uniforms[row].item(),
                           int(tokens[row]), int(ref.token_ids[row]))
    assert on_steps or (~same).sum() <= max(1, logits.shape[0] // 50)
    torch.testing.assert_close(logprobs[same], ref.logprobs[same], atol=1e-5, rtol=1e-6)
    if need_raw:
        torch.testing.assert_close(raw[same], ref.raw_logprobs[same], atol=1e-5, rtol=1e-6)
    return tokens


def _uniforms(rows: int) -> torch.Tensor:
    return torch.rand(rows, dtype=torch.float64, device=DEVICE).clamp(1e-12, 1 - 1e-12)


def _banned(rows: int, vocab: int, logits: torch.Tensor) -> torch.Tensor:
    """Random (row, token) pairs plus every third row's argmax, shuffled, with a
    repeated pair: the kernel may not assume the engine's row-sorted order."""
    pairs = torch.stack([torch.randint(0, rows, (rows,), device=DEVICE),
                         torch.randint(0, vocab, (rows,), device=DEVICE)])
    tops = torch.arange(0, rows, 3, device=DEVICE)
    pairs = torch.cat([pairs, torch.stack([tops, logits[tops].argmax(-1)]), pairs[:, :1]], 1)
    return pairs[:, torch.randperm(pairs.shape[1], device=DEVICE)].contiguous()


# (rows, vocab, block): rows of many chunks, a ragged last chunk, one chunk per row
MIXED_SHAPES = [(1, 1000, 64), (5, 777, 128), (64, 200, 256)]


@pytest.mark.parametrize("rows,vocab,block", MIXED_SHAPES, ids=str)
def test_mixed_rows_match_torch(fused, rows, vocab, block):
    logits = torch.randn(rows, vocab, device=DEVICE) * 3
    temp, min_p = _settings([0.7, 0.0, 1.0, 1.3, 0.5], [0.0, 0.0, 0.1, 0.05, 0.0, 0.3], rows)
    banned = _banned(rows, vocab, logits)
    check(fused, logits, temp, min_p, _uniforms(rows), banned, block=block)


def test_greedy_rows_take_first_argmax_and_report_raw(fused):
    rows, vocab = 6, 500
    logits = torch.randn(rows, vocab, device=DEVICE)
    logits[:, [40, 170, 499]] = 9.0  # ties across chunks: the first index wins
    banned = torch.tensor([[2, 3, 3], [40, 40, 170]], device=DEVICE)
    temp = torch.zeros(rows, device=DEVICE)
    tokens = check(fused, logits, temp, torch.full((rows,), 0.2, device=DEVICE),
                   _uniforms(rows), banned, need_raw=False, block=64, use_min_p=False)
    assert tokens.tolist() == [40, 40, 170, 499, 40, 40]


def test_greedy_pick_fused_equals_torch(fused):
    """The speculative tail's argmax (sampler.greedy_pick): fused pass == log-softmax +
    argmax, bf16 logits with a tie across chunks, more rows than the settings need."""
    from atom_rollout.sampler.sampler import greedy_pick
    rows, vocab = 5, 3000
    logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(torch.bfloat16)
    logits[1, [7, 2900]] = 20.0
    settings = (torch.zeros(8, device=DEVICE),
                torch.full((8,), 0.5, dtype=torch.float64, device=DEVICE))
    tokens, logprobs = greedy_pick(logits, settings)
    ref_tokens, ref_logprobs = greedy_pick(logits)
    assert tokens.tolist() == ref_tokens.tolist() and tokens[1].item() == 7
    assert ref_tokens.tolist() == logits.float().argmax(-1).tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,block", [(torch.float32, None), (torch.bfloat16, 512)])
def test_scaled_log_softmax_equals_the_torch_processing(fused, dtype, block):
    """Speculation's one-pass processed rows: log_softmax(logits / T), T = 0 as 1, a
    vocabulary that is not a multiple of the block, a strided input."""
    from atom_rollout.kernels.triton.scaled_log_softmax import scaled_log_softmax
    rows, vocab = 5, 4100
    wide = (torch.randn(rows, vocab + 7, device=DEVICE) * 4).to(dtype)
    logits = wide[:, :vocab]
    temp = torch.tensor([1.0, 0.0, 0.7, 1.6, 0.05], device=DEVICE)
    expected = processed_logprobs(logits.float(), temp, torch.zeros(rows, dtype=torch.int64,
                                  device=DEVICE), torch.ones(rows, device=DEVICE),
                                  torch.zeros(rows, device=DEVICE), False, False)
    got = scaled_log_softmax(logits, temp, block=block)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-6)
    buffer = torch.zeros(rows, 3, vocab, device=DEVICE)  # rows of a [B, k, V] buffer
    written = scaled_log_softmax(logits, temp, block=block, out=buffer[:, 1])
    assert written.data_ptr() == buffer[:, 1].data_ptr()
    torch.testing.assert_close(buffer[:, 1], got, atol=0, rtol=0)
    assert not buffer[:, [0, 2]].any()


def test_speculative_draft_rows_fused_draw_the_torch_tokens(fused):
    """engine.speculation.draft_rows with the Triton passes (sampled rows, one greedy row)
    draws the torch path's tokens and returns its processed distribution."""
    from types import SimpleNamespace

    from atom_rollout.engine.speculation import RowKind, draft_rows
    rows, vocab = 6, 3000
    logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(torch.bfloat16)
    model = SimpleNamespace(compute_logits=lambda hidden, as_float32=True:
                            logits.float() if as_float32 else logits)
    temp = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.9], device=DEVICE)
    params = SimpleNamespace(
        kind=RowKind(False, True, False, False), temperature=temp,
        top_k=torch.zeros(rows, dtype=torch.int64, device=DEVICE),
        top_p=torch.ones(rows, device=DEVICE), min_p=torch.zeros(rows, device=DEVICE),
        greedy=temp == 0, greedy_rows=(temp == 0)[:, None])
    uniforms = _uniforms(rows)
    tokens, logp = draft_rows(model, None, params, uniforms, fused=True)
    ref_tokens, ref_logp = draft_rows(model, None, params, uniforms, fused=False)
    assert tokens.tolist() == ref_tokens.tolist()
    assert tokens[2].item() == logits[2].float().argmax().item()
    torch.testing.assert_close(logp, ref_logp, atol=2e-5, rtol=1e-6)
    for fused_pass in (True, False):  # out=: straight into a [B, k, V] buffer's rows
        buffer = torch.zeros(rows, 2, vocab, device=DEVICE)
        draft_rows(model, None, params, uniforms, fused=fused_pass, out=buffer[:, 1])
        torch.testing.assert_close(buffer[:, 1], logp, atol=2e-5, rtol=1e-6)
        assert not buffer[:, 0].any()


def test_min_p_rows(fused):
    rows, vocab = 8, 900
    logits = torch.randn(rows, vocab, device=DEVICE) * 4
    temp, min_p = _settings([1.0, 0.6], [0.01, 0.1, 0.5, 0.9], rows)
    tokens = check(fused, logits, temp, min_p, _uniforms(rows), block=128)
    probs = torch.softmax(logits / temp[:, None], -1)
    picked = probs.gather(-1, tokens[:, None])[:, 0]
    assert (picked >= min_p * probs.max(-1).values * (1 - 1e-5)).all()


def test_banned_tokens_are_never_drawn(fused):
    rows, vocab = 4, 300
    logits = torch.randn(rows, vocab, device=DEVICE)
    logits[:, :5] = 30.0  # nearly all the mass, and all of it banned
    pairs = [(r, t) for r in range(rows) for t in range(5)]
    banned = torch.tensor(pairs[::-1], device=DEVICE).T.contiguous()
    temp, min_p = _settings([1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.2, 0.0], rows)
    tokens = check(fused, logits, temp, min_p, _uniforms(rows), banned, block=64)
    assert (tokens >= 5).all()


def test_bfloat16_and_default_block(fused):
    rows, vocab = 4, 5000
    logits = (torch.randn(rows, vocab, device=DEVICE) * 2).to(torch.bfloat16)
    temp, min_p = _settings([1.0, 0.8, 0.0, 1.1], [0.0, 0.05], rows)
    check(fused, logits, temp, min_p, _uniforms(rows))


def test_peaked_rows_many_tiny_probabilities(fused):
    rows, vocab = 8, 2000
    logits = torch.randn(rows, vocab, device=DEVICE) * 12
    temp, min_p = _settings([1.0, 0.3, 1.5], [0.0], rows)
    check(fused, logits, temp, min_p, _uniforms(rows), block=512, use_min_p=False)


def test_uniform_on_a_cdf_step_picks_a_neighbour(fused):
    rows, vocab = 8, 400
    logits = torch.randn(rows, vocab, device=DEVICE)
    temp, min_p = torch.ones(rows, device=DEVICE), torch.zeros(rows, device=DEVICE)
    steps = torch.randint(0, vocab - 1, (rows,), device=DEVICE)
    cdfs = torch.stack([torch_cdf(logits, temp, min_p, None, r) for r in range(rows)])
    uniforms = cdfs.gather(-1, steps[:, None])[:, 0] / cdfs[:, -1]
    tokens = check(fused, logits, temp, min_p, uniforms, on_steps=True, block=64,
                   use_min_p=False)
    assert ((tokens == steps) | (tokens == steps + 1)).all()


def test_extreme_uniforms_and_tiny_vocabularies(fused):
    logits = torch.randn(4, 70, device=DEVICE)
    temp, min_p = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    edges = torch.tensor([1e-300, 1 - 2 ** -53, 1e-300, 1 - 2 ** -53], dtype=torch.float64,
                         device=DEVICE)
    tokens = check(fused, logits, temp, min_p, edges, block=16, use_min_p=False)
    assert tokens.tolist() == [0, 69, 0, 69]
    # A target equal to the total mass (what 1 - 2^-53 can round to on a GPU) is the last
    # token, not the first of the last chunk.
    ones = torch.ones(4, dtype=torch.float64, device=DEVICE)
    tokens, _, _ = fused(logits, temp, min_p, ones, None, True, block=16, use_min_p=False)
    assert tokens.tolist() == [69] * 4
    one = torch.ones(1, device=DEVICE)
    tokens, logprobs, raw = fused(torch.randn(1, 1, device=DEVICE), one, one * 0,
                                  torch.full((1,), 0.5, dtype=torch.float64, device=DEVICE),
                                  None, True)
    assert tokens.tolist() == [0] and logprobs.tolist() == [0.0] and raw.tolist() == [0.0]


def test_choose_block_bounds_the_chunk_count():
    from atom_rollout.kernels.triton.sampling import MAX_CHUNKS, choose_block
    for vocab in (1, 100, 151936, 10 ** 7):
        block = choose_block(64, vocab, torch.device("cpu"))
        assert block & (block - 1) == 0 and -(-vocab // block) <= MAX_CHUNKS


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager(fused):
    rows, vocab = 16, 151936
    logits = torch.randn(rows, vocab, device=DEVICE) * 3
    temp, min_p = _settings([1.0, 0.0, 0.7], [0.0, 0.1], rows)
    uniforms = _uniforms(rows)
    banned = _banned(rows, vocab, logits)
    fused(logits, temp, min_p, uniforms, banned, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fused(logits, temp, min_p, uniforms, banned, True)
    for _ in range(3):
        uniforms.copy_(_uniforms(rows))
        logits.copy_(torch.randn_like(logits) * 3)
        graph.replay()
        expected = fused(logits, temp, min_p, uniforms, banned, True)
        for got, want in zip(outputs, expected):
            assert torch.equal(got, want)
        check(fused, logits, temp, min_p, uniforms, banned)


def test_step_uniforms_one_launch_has_the_torch_bits(fused):
    """The speculative tail's uniforms from one Triton launch equal sampler.noise's torch
    body bit for bit (negative keys, counters past 2**32, several salts)."""
    from atom_rollout.sampler.noise import row_uniforms_np, signed64, step_uniforms
    keys = torch.tensor([signed64(0xFEDCBA9876543210), 0, 12345, -1, 2**62 + 7],
                        dtype=torch.int64, device=DEVICE)
    counters = torch.tensor([0, 1, 2**33 + 5, 77, 123456], dtype=torch.int64, device=DEVICE)
    salts = torch.tensor([0, 8, 9, 15], dtype=torch.int64, device=DEVICE)
    got = step_uniforms(keys, counters, salts, fused=True)
    expected = step_uniforms(keys, counters, salts, fused=False)
    assert got.dtype == torch.float64 and torch.equal(got, expected)
    steps = counters[:, None].cpu().numpy() * 16 + salts.cpu().numpy()
    host = row_uniforms_np(keys.cpu().numpy()[:, None].repeat(4, 1).ravel(), steps.ravel())
    assert torch.equal(got.cpu().ravel(), torch.from_numpy(host))
    assert got.unique().numel() == got.numel() and ((got > 0) & (got < 1)).all()
