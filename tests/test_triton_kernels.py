"""TritonOps against TorchOps on random inputs. Without a GPU the kernels run
under the Triton interpreter on CPU (TRITON_INTERPRET is set below, before the
first TritonOps decorates its kernels); with CUDA they run on the GPU."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from atom_rollout.kernels import AttentionMetadata, TorchOps, unfused_prepare_qkv  # noqa: E402
from atom_rollout.kernels.triton import TritonOps, is_available  # noqa: E402
from atom_rollout.kernels.triton.attention import (  # noqa: E402
    ORDER_MIN_SEQS, TileConfig, choose_num_splits, paged_attention)
from atom_rollout.kernels.triton.split_k_linear import (  # noqa: E402
    MAX_ROWS, ONE_ROW_UNSPLIT, STREAMING_BYTES, SplitKConfig, choose_config,
    split_k_partials)
from atom_rollout.models.decoder import (  # noqa: E402
    Attention, DecoderForCausalLM, DecoderSpec)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The CPU interpreter runs tl.dot on bfloat16 wrongly and truncates instead of
# rounding when it casts to bfloat16, so bf16 attention is checked on GPU only.
ATTN_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-4, rtol=1e-3), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module")
def ref() -> TorchOps:
    return TorchOps()


@pytest.fixture(scope="module")
def tri() -> TritonOps:
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return TritonOps()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def make_meta(query_lens: list[int], context_lens: list[int], block_size: int,
              num_blocks: int) -> AttentionMetadata:
    """Metadata for sequences whose blocks are a random, non-contiguous pick
    of the pool; tables carry one extra -1 column of padding."""
    tables_len = max(-(-c // block_size) for c in context_lens) + 1
    pool = torch.randperm(num_blocks).tolist()
    tables = torch.full((len(query_lens), tables_len), -1, dtype=torch.int32)
    slots = []
    for b, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        owned = [pool.pop() for _ in range(-(-ctx // block_size))]
        tables[b, :len(owned)] = torch.tensor(owned, dtype=torch.int32)
        slots += [owned[p // block_size] * block_size + p % block_size
                  for p in range(ctx - q_len, ctx)]
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=starts.to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), max_query_len=max(query_lens),
        max_context_len=max(context_lens))


def attention_inputs(query_lens, context_lens, heads, kv_heads, head_dim, block_size, dtype):
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 7
    meta = make_meta(query_lens, context_lens, block_size, num_blocks)
    k_cache = _randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = _randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    query = _randn(sum(query_lens), heads, head_dim, dtype=dtype)
    return query, k_cache, v_cache, meta


BATCHES = {
    "decode": ([1, 1, 1, 1, 1], [1, 17, 64, 100, 33]),
    "prefill": ([10, 37, 3], [10, 37, 3]),
    "cached_prefix_chunk": ([20, 9], [50, 33]),
    "mixed": ([1, 30, 1, 7, 2], [40, 30, 90, 19, 5]),
    "long_decode": ([1, 1], [300, 257]),
    "long_chunk": ([70, 1, 4], [150, 20, 4]),
    "spec_decode": ([3, 2, 4], [50, 2, 130]),
}
# (heads, kv_heads, head_dim, block_size)
LAYOUTS = {
    "gqa2_d64_bs16": (4, 2, 64, 16),
    "mqa_d32_bs4": (4, 1, 32, 4),
    "mha_d64_bs32": (2, 2, 64, 32),
    "gqa3_d80_bs1": (6, 2, 80, 1),
    "gqa4_d128_bs8": (8, 2, 128, 8),
}
HALF_LAYOUTS = ("gqa2_d64_bs16", "gqa3_d80_bs1")
ATTENTION_CASES = [(b, lay, dtype) for b in BATCHES for lay in LAYOUTS for dtype in ATTN_DTYPES
                   if dtype == torch.float32 or lay in HALF_LAYOUTS]


def check_attention(ref, out, query, k_cache, v_cache, meta):
    scale = query.shape[-1] ** -0.5
    expected = ref.attention(query, k_cache, v_cache, meta, scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    torch.testing.assert_close(out.float(), expected.float(), **TOL[query.dtype])


@pytest.mark.parametrize("batch,layout,dtype", ATTENTION_CASES, ids=str)
def test_attention(ref, tri, batch, layout, dtype):
    inputs = attention_inputs(*BATCHES[batch], *LAYOUTS[layout], dtype)
    out = tri.attention(*inputs, scale=inputs[0].shape[-1] ** -0.5)
    check_attention(ref, out, *inputs)


@pytest.mark.parametrize("batch", ["decode", "long_decode", "mixed"])
@pytest.mark.parametrize("num_splits", [2, 8])
def test_attention_split_kv(ref, batch, num_splits):
    inputs = attention_inputs(*BATCHES[batch], 4, 2, 64, 16, torch.float32)
    out = paged_attention(*inputs, scale=64 ** -0.5, num_splits=num_splits)
    check_attention(ref, out, *inputs)


@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_attention_reads_no_split_past_the_keys(ref, monkeypatch, batch):
    """A graph's grid has splits for its longest context; with shorter contexts the
    splits past the keys write nothing, and the merge must not read them: split
    buffers start as NaN (and the split counts huge) so any stray read shows."""
    import atom_rollout.kernels.triton.attention as attention_module
    real = attention_module._split_buffers

    def poisoned(query, num_splits):
        *floats, counts = real(query, num_splits)
        return (*(t.fill_(float("nan")) for t in floats), counts.fill_(1 << 20))
    monkeypatch.setattr(attention_module, "_split_buffers", poisoned)
    inputs = attention_inputs(*BATCHES[batch], 4, 2, 64, 16, torch.float32)
    out = paged_attention(*inputs, scale=64 ** -0.5, num_splits=32)
    check_attention(ref, out, *inputs)


@pytest.mark.parametrize("query_len", [1, 3])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_attention_decode_longest_first(ref, query_len, num_splits):
    """From ORDER_MIN_SEQS sequences up the decode grid walks them longest first; every
    sequence must still get exactly its own output (ties and padding-like rows too)."""
    gen = torch.Generator().manual_seed(query_len * 10 + num_splits)
    num_seqs = ORDER_MIN_SEQS + 3
    context_lens = (torch.randint(query_len, 90, (num_seqs,), generator=gen)).tolist()
    context_lens[3] = context_lens[7] = 41  # a tie
    context_lens[-1] = query_len  # a graph's padding row: q keys only
    inputs = attention_inputs([query_len] * num_seqs, context_lens, 4, 2, 64, 16,
                              torch.float32)
    out = paged_attention(*inputs, scale=64 ** -0.5, num_splits=num_splits)
    check_attention(ref, out, *inputs)
    order = inputs[3].longest_first.tolist()
    assert sorted(order) == list(range(num_seqs))
    assert [context_lens[i] for i in order] == sorted(context_lens, reverse=True)
    assert order.index(3) < order.index(7)  # stable


@pytest.mark.parametrize("seed", range(4))
def test_attention_random_batches(ref, tri, seed):
    gen = torch.Generator().manual_seed(seed)
    num_seqs = int(torch.randint(1, 6, (), generator=gen))
    query_lens = torch.randint(1, 24, (num_seqs,), generator=gen).tolist()
    cached = torch.randint(0, 80, (num_seqs,), generator=gen).tolist()
    decode = torch.rand(num_seqs, generator=gen) < 0.5
    query_lens = [1 if d else q for q, d in zip(query_lens, decode.tolist())]
    context_lens = [q + c for q, c in zip(query_lens, cached)]
    layout = list(LAYOUTS.values())[seed % len(LAYOUTS)]
    inputs = attention_inputs(query_lens, context_lens, *layout, torch.float32)
    check_attention(ref, tri.attention(*inputs, scale=layout[2] ** -0.5), *inputs)


def test_attention_strided_query_written_by_write_kv(ref, tri):
    """The engine's path: q/k/v are views of one qkv projection, new KV goes
    through write_kv, then attention reads only the cache."""
    heads, kv_heads, head_dim, block_size = 4, 2, 64, 16
    query_lens, context_lens = [3, 1, 12], [20, 9, 12]
    _, k_cache, v_cache, meta = attention_inputs(query_lens, context_lens, heads, kv_heads,
                                                 head_dim, block_size, torch.float32)
    qkv = _randn(sum(query_lens), (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (t.view(t.shape[0], -1, head_dim) for t in (q, k, v))
    tri.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = tri.attention(q, k_cache, v_cache, meta, head_dim ** -0.5)
    check_attention(ref, out, q, k_cache, v_cache, meta)


def test_choose_num_splits():
    decode = TileConfig(block_q=1, block_m=16, block_n=64, num_warps=4)
    meta = make_meta([1] * 4, [4096] * 4, 16, 1100)
    assert choose_num_splits(meta, decode, kv_heads=8, target_programs=264) == 8
    meta.max_context_len = 300  # splits keep at least MIN_KEYS_PER_SPLIT keys
    assert choose_num_splits(meta, decode, kv_heads=8, target_programs=264) == 2
    prefill = make_meta([40], [40], 16, 4)
    assert choose_num_splits(prefill, decode, kv_heads=8, target_programs=264) == 1


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv(ref, tri, dtype, block_size):
    kv_heads, head_dim, num_tokens = 2, 80, 9
    meta = make_meta([num_tokens], [num_tokens + 5], block_size, 40)
    kv = _randn(num_tokens, 2 * kv_heads, head_dim, dtype=dtype)
    key, value = kv[:, :kv_heads], kv[:, kv_heads:]  # strided views, as from a qkv split
    caches = [_randn(40, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    ref.write_kv(key, value, *expected, meta.slot_mapping)
    tri.write_kv(key, value, *caches, meta.slot_mapping)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_write_kv_skips_negative_slots(tri):
    k_cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(2, 1, 16, device=DEVICE)
    tri.write_kv(key, key, k_cache, v_cache, torch.tensor([5, -1], device=DEVICE))
    assert k_cache.sum().item() == 16 and k_cache[1, 1].sum().item() == 16


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 64), (5, 4, 128), (2, 80)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(ref, tri, dtype, shape, with_residual):
    x, weight = _randn(*shape, dtype=dtype), _randn(shape[-1], dtype=dtype)
    residual = _randn(*shape, dtype=dtype) if with_residual else None
    expected = ref.rms_norm(x, weight, 1e-6, residual)
    got = tri.rms_norm(x, weight, 1e-6, residual)
    if not with_residual:
        expected, got = (expected,), (got,)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), **TOL[dtype])


def test_rms_norm_fp32_weight_promotes(ref, tri):
    x, weight = _randn(4, 64, dtype=torch.float16), _randn(64)
    expected, got = ref.rms_norm(x, weight, 1e-5), tri.rms_norm(x, weight, 1e-5)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL[torch.float16])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (3, 1, 80), (2, 2, 128)])
def test_rotary(ref, tri, dtype, heads, kv_heads, head_dim):
    num_tokens, max_pos = 7, 50
    qkv = _randn(num_tokens, heads + kv_heads, head_dim, dtype=dtype)
    cos_sin = _randn(max_pos, head_dim)
    positions = torch.randint(0, max_pos, (num_tokens,), device=DEVICE)
    q, k = qkv[:, :heads], qkv[:, heads:]
    expected = ref.rotary(q, k, positions, cos_sin)
    got = tri.rotary(q.clone(), k.clone(), positions.to(torch.int32), cos_sin)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.float(), e.float(), **TOL[dtype])


def test_rotary_in_place_on_views(tri):
    qkv = _randn(5, 3, 64)
    q, k = qkv[:, :2], qkv[:, 2:]
    before = qkv.clone()
    got_q, got_k = tri.rotary(q, k, torch.arange(5, device=DEVICE), _randn(8, 64))
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert not torch.equal(qkv, before)


# prepare_qkv: (heads, kv_heads, head_dim, block_size); GQA ratios 1, 2 and 4
PREPARE_LAYOUTS = {
    "mha_d64_bs16": (2, 2, 64, 16),
    "gqa2_d128_bs1": (4, 2, 128, 1),
    "gqa4_d96_bs16": (8, 2, 96, 16),
    "gqa2_d80_bs1": (4, 2, 80, 1),
}
PREPARE_DTYPES = [torch.float32, torch.bfloat16]
# Against TorchOps: bf16 rounds three times (norm, weight, rotary), each a
# truncation under the CPU interpreter, so allow ~3 ulp at magnitudes near 2.
PREPARE_TOL = {**TOL, torch.bfloat16: dict(atol=6e-2, rtol=4e-2)}


def prepare_inputs(heads, kv_heads, head_dim, block_size, dtype, norm, num_tokens=7,
                   weight_dtype=None):
    """Arguments of prepare_qkv as the engine passes them: q/k/v strided views of
    one qkv row, shuffled positions, distinct shuffled slots with some padding
    (-1), caches filled with noise so that stray writes show."""
    max_pos, num_blocks = 64, 2 + -(-2 * num_tokens // block_size)
    qkv = _randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (t.view(num_tokens, t.shape[1] // head_dim, head_dim) for t in (q, k, v))
    weight_dtype = weight_dtype or dtype
    weights = [(_randn(head_dim) + 1).to(weight_dtype) if norm else None for _ in range(2)]
    positions = torch.randperm(max_pos, device=DEVICE)[:num_tokens]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    if num_tokens > 3:
        slots[[1, num_tokens - 2]] = -1
    cos_sin = _randn(max_pos, head_dim)
    caches = [_randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    return dict(query=q, key=k, value=v, q_weight=weights[0], k_weight=weights[1], eps=1e-6,
                positions=positions, cos_sin=cos_sin, k_cache=caches[0], v_cache=caches[1],
                slot_mapping=slots)


def run_prepare(prepare, inputs):
    """prepare on fresh copies of the mutable inputs: (query, key, k_cache, v_cache)."""
    args = dict(inputs)
    for name in ("query", "key", "k_cache", "v_cache"):
        args[name] = inputs[name].clone()
    query, key = prepare(**args)
    return query, key, args["k_cache"], args["v_cache"]


def max_abs_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", PREPARE_DTYPES, ids=str)
@pytest.mark.parametrize("norm", [False, True], ids=["no_norm", "qk_norm"])
@pytest.mark.parametrize("layout", PREPARE_LAYOUTS)
def test_prepare_qkv(ref, tri, layout, norm, dtype):
    inputs = prepare_inputs(*PREPARE_LAYOUTS[layout], dtype, norm)
    fused = run_prepare(tri.prepare_qkv, inputs)
    expected = run_prepare(ref.prepare_qkv, inputs)
    for got, want in zip(fused, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **PREPARE_TOL[dtype])
    # Bit-for-bit the unfused Triton sequence (rms_norm, rotary, write_kv): the
    # kernel rounds where those ops store. bf16 against TorchOps differs by a few
    # ulp on CPU only because the interpreter truncates its bf16 casts.
    unfused = run_prepare(lambda **a: unfused_prepare_qkv(tri, **a), inputs)
    assert max_abs_diff(fused, unfused) == 0.0
    # slots never written (free or padding) keep their noise
    written = inputs["slot_mapping"][inputs["slot_mapping"] >= 0]
    untouched = torch.ones(inputs["k_cache"][:, :, 0, 0].numel(), dtype=torch.bool,
                           device=DEVICE)
    untouched[written] = False
    for cache, before in zip(fused[2:], (inputs["k_cache"], inputs["v_cache"])):
        flat, flat_before = cache.flatten(0, 1), before.flatten(0, 1)
        assert torch.equal(flat[untouched], flat_before[untouched])
        assert not torch.equal(flat[written], flat_before[written])


def test_prepare_qkv_promoting_weights(ref, tri):
    """bf16 activations with fp32 norm weights: q/k come back fp32 (rms_norm's
    promotion) while the bf16 cache gets the rotated key rounded once more."""
    inputs = prepare_inputs(4, 2, 64, 16, torch.bfloat16, True, weight_dtype=torch.float32)
    fused = run_prepare(tri.prepare_qkv, inputs)
    expected = run_prepare(ref.prepare_qkv, inputs)
    assert [t.dtype for t in fused] == [torch.float32, torch.float32] + [torch.bfloat16] * 2
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got.float(), want.float(), **PREPARE_TOL[torch.bfloat16])
    unfused = run_prepare(lambda **a: unfused_prepare_qkv(tri, **a), inputs)
    assert max_abs_diff(fused, unfused) == 0.0


def test_prepare_qkv_in_place_on_views(tri):
    inputs = prepare_inputs(4, 2, 64, 16, torch.float32, True)
    q, k = tri.prepare_qkv(**inputs)
    assert q.data_ptr() == inputs["query"].data_ptr()
    assert k.data_ptr() == inputs["key"].data_ptr()


def test_prepare_qkv_rejects_one_norm_weight(tri):
    inputs = prepare_inputs(2, 2, 64, 16, torch.float32, True)
    inputs["k_weight"] = None
    with pytest.raises(ValueError, match="both"):
        tri.prepare_qkv(**inputs)


def test_attention_layer_calls_prepare_qkv(tri):
    """Attention.attend on TritonOps equals the separate q_norm/k_norm, rotary
    and write_kv calls it made before prepare_qkv (Qwen3's odd head_dim 24)."""
    spec = DecoderSpec(vocab_size=16, hidden_size=48, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=24, rms_norm_eps=1e-5,
                       qkv_bias=False, qk_norm=True, tie_word_embeddings=False)
    layer = Attention(spec).to(DEVICE)
    for param in layer.parameters():
        param.data.normal_(0, 0.2)
    _, k_cache, v_cache, meta = attention_inputs([3, 1], [3, 6], 4, 2, 24, 4, torch.float32)
    x, positions = _randn(4, 48), torch.tensor([0, 1, 2, 5], device=DEVICE)
    cos_sin = _randn(8, 24)
    outs = []
    for ops in (tri, _unfused_ops()):
        caches = (k_cache.clone(), v_cache.clone())
        outs.append((layer.attend(ops, x, positions, cos_sin, caches, meta), *caches))
    assert max_abs_diff(outs[0], outs[1]) == 0.0


def test_lm_head_through_the_backend_linear(ref, tri, monkeypatch):
    """compute_logits(ops=) projects with ops.linear (TritonOps' one-row kernel for one
    row of a vocabulary that fills two of its tiles per SM) and matches nn.Linear;
    without ops it is nn.Linear."""
    vocab = 2 * ONE_ROW_UNSPLIT.block_n * tri._multiprocessor_count(DEVICE) + 16
    spec = DecoderSpec(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=24, rms_norm_eps=1e-5,
                       qkv_bias=False, qk_norm=True, tie_word_embeddings=False)
    model = DecoderForCausalLM(spec, None).to(DEVICE)
    model.lm_head.weight.data.normal_(0, 0.2)
    hidden = _randn(1, 48)
    calls = []
    one_row = tri._split_k.one_row_linear
    monkeypatch.setattr(tri._split_k, "one_row_linear",
                        lambda *a, **k: calls.append(1) or one_row(*a, **k))
    got = model.compute_logits(hidden, ops=tri)
    assert calls and got.dtype == torch.float32
    torch.testing.assert_close(got, model.compute_logits(hidden), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.compute_logits(hidden, ops=ref), model.compute_logits(hidden))


def _unfused_ops() -> TritonOps:
    ops = TritonOps()
    ops.fused_qkv = False
    return ops


def test_prepare_qkv_falls_back_when_the_kernel_fails(tri, monkeypatch):
    """A Triton build the fused kernel does not compile on: warn once, then run the
    separate kernels (same results)."""
    ops = TritonOps()

    def broken(*args):
        raise RuntimeError("does not compile here")
    monkeypatch.setattr(ops._prepare_qkv, "prepare_qkv", broken)
    layout = next(iter(PREPARE_LAYOUTS))
    inputs = prepare_inputs(*PREPARE_LAYOUTS[layout], torch.float32, True)
    with pytest.warns(UserWarning, match="fused prepare_qkv"):
        got = run_prepare(ops.prepare_qkv, inputs)
    assert ops.fused_qkv is False
    want = run_prepare(lambda **a: unfused_prepare_qkv(tri, **a), inputs)
    assert max_abs_diff(got, want) == 0.0


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 192), (2, 3, 128), (3, 3000)])
def test_silu_and_mul(ref, tri, dtype, shape):
    x = _randn(*shape, dtype=dtype) * 3
    expected, got = ref.silu_and_mul(x), tri.silu_and_mul(x)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


def linear_norm_inputs(rows: int, k: int, n: int, gated: bool, dtype) -> dict:
    return dict(x=_randn(rows, 2 * k if gated else k, dtype=dtype),
                weight=(_randn(n, k) * k ** -0.5).to(dtype), residual=_randn(rows, n, dtype=dtype),
                norm_weight=_randn(n, dtype=dtype), eps=1e-6, gated=gated)


# rows 1 (multiply and sum), 3 and 16 (tl.dot), 17 (over MAX_ROWS: cuBLAS + rms_norm);
# k = 320 and n = 80 leave partial tiles and give 3 K splits.
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_linear_add_rms_norm(ref, tri, dtype, rows, gated):
    inputs = linear_norm_inputs(rows, 320, 80, gated, dtype)
    expected, got = ref.linear_add_rms_norm(**inputs), tri.linear_add_rms_norm(**inputs)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == dtype
        torch.testing.assert_close(g.float(), e.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_one_row_linear(ref, tri, dtype, bias):
    """One row and 160 outputs (>= two 8-column tiles per "SM" of the interpreter's 8):
    the one-row kernel, K = 96 a partial block of it."""
    x, weight = _randn(1, 96, dtype=dtype), (_randn(160, 96) * 0.1).to(dtype)
    b = _randn(160, dtype=dtype) if bias else None
    torch.testing.assert_close(tri.linear(x, weight, b).float(),
                               ref.linear(x, weight, b).float(), **TOL[dtype])
    tri.one_row_linear = False
    try:
        torch.testing.assert_close(tri.linear(x, weight, b), ref.linear(x, weight, b))
    finally:
        tri.one_row_linear = True


@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_split_k_partials_sum_to_the_projection(splits):
    """Any split of K (5 splits of 3 blocks leave empty ones) sums to x @ W.T."""
    inputs = linear_norm_inputs(2, 320, 80, True, torch.float32)
    partials = split_k_partials(inputs["x"], inputs["weight"], gated=True,
                                config=SplitKConfig(block_n=32, block_k=128, splits=splits))
    assert partials.shape == (splits, 2, 80) and partials.dtype == torch.float32
    expected = TorchOps().silu_and_mul(inputs["x"]) @ inputs["weight"].T
    torch.testing.assert_close(partials.sum(0), expected, atol=1e-5, rtol=1e-5)


def test_split_k_config_fills_the_grid():
    assert choose_config(1024, 2048, 1, 132) == SplitKConfig(16, 256, 4, 8)
    assert choose_config(1024, 3072, 1, 132) == SplitKConfig(16, 256, 4, 8)
    assert choose_config(1024, 2048, 4, 132) == SplitKConfig(32, 128, 4, 4)
    # the test shapes above on the interpreter's 8 "multiprocessors"
    assert choose_config(80, 320, 1, 8).splits == 2
    assert choose_config(80, 320, 3, 8).splits == 3
    assert choose_config(4096, 1024, 1, 132).splits == 1
    assert choose_config(64, 64, 1, 8).splits == 1


def test_split_k_config_streams_large_weights():
    """Qwen3-8B's o_proj and down_proj (over STREAMING_BYTES): 8 x 2,048 tiles, 4 warps,
    no split (512 column tiles already give ~4 programs per SM); 16 MiB itself does not;
    a K of 1,024 (Qwen3-0.6B's LM head) or 576 keeps K's power of two."""
    assert choose_config(4096, 4096, 1, 132) == SplitKConfig(8, 2048, 1, 4)
    assert choose_config(4096, 12288, 1, 132) == SplitKConfig(8, 2048, 1, 4)
    assert choose_config(151936, 1024, 1, 132) == SplitKConfig(8, 1024, 1, 4)
    assert choose_config(49152, 576, 1, 132) == SplitKConfig(8, 1024, 1, 4)
    assert choose_config(4096, 2048, 1, 132) == SplitKConfig(16, 256, 1, 8)
    assert choose_config(4096, 4096, 1, 132, element_size=1).block_k == 256
    assert choose_config(4096, 4096, 4, 132).block_n == 32  # more rows: unchanged


def test_one_row_linear_past_streaming_bytes(ref, tri):
    """A weight just over STREAMING_BYTES (2,048 x 4,160 bf16) takes the streaming tiles,
    K = 4,160 ending in a partial 2,048-column block; as before, it matches TorchOps."""
    x = _randn(1, 4160, dtype=torch.bfloat16)
    weight = (_randn(2048, 4160) * 4160 ** -0.5).to(torch.bfloat16)
    assert weight.numel() * 2 > STREAMING_BYTES
    torch.testing.assert_close(tri.linear(x, weight).float(), ref.linear(x, weight).float(),
                               **TOL[torch.bfloat16])


def test_split_k_one_split_in_the_model_dtype_is_a_projection():
    x, weight = _randn(3, 320, dtype=torch.float16), _randn(80, 320, dtype=torch.float16)
    y = split_k_partials(x, weight, out_dtype=torch.float16,
                         config=SplitKConfig(block_n=32, block_k=128, splits=1))
    assert y.shape == (1, 3, 80) and y.dtype == torch.float16
    torch.testing.assert_close(y[0].float(), (x.float() @ weight.float().T),
                               **TOL[torch.float16])


def test_split_k_partials_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="split_k_partials"):
        split_k_partials(_randn(2, 30), _randn(8, 16), gated=True)
    with pytest.raises(ValueError, match="split_k_partials"):
        split_k_partials(_randn(MAX_ROWS + 1, 16), _randn(8, 16))


def test_empty_batches(tri):
    x = _randn(0, 64)
    assert tri.rms_norm(x, _randn(64), 1e-6).shape == (0, 64)
    assert tri.silu_and_mul(x).shape == (0, 32)
    inputs = prepare_inputs(2, 1, 16, 4, torch.float32, True, num_tokens=0)
    assert [t.shape for t in tri.prepare_qkv(**inputs)] == [(0, 2, 16), (0, 1, 16)]
    query, k_cache, v_cache, meta = attention_inputs([1], [3], 2, 1, 16, 4, torch.float32)
    meta.slot_mapping = meta.slot_mapping[:0]
    meta.query_start_loc = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    meta.context_lens = meta.context_lens[:0]
    meta.block_tables = meta.block_tables[:0]
    assert tri.attention(query[:0], k_cache, v_cache, meta, 0.25).shape == (0, 2, 16)


def test_is_available():
    assert not is_available(torch.device("cpu"))
    assert is_available(torch.device("cuda")) == HAS_CUDA


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_attention_cuda_graph_replay(ref, tri):
    """Captured once, replayed on new lengths and tables of the same shape."""
    query, k_cache, v_cache, meta = attention_inputs([1] * 4, [700, 5, 64, 1000], 8, 2, 128,
                                                     16, torch.bfloat16)
    meta.max_context_len = 4096  # the graph's bound; real lengths come from device tensors
    tri.attention(query, k_cache, v_cache, meta, 128 ** -0.5)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri.attention(query, k_cache, v_cache, meta, 128 ** -0.5)
    new_meta = make_meta([1] * 4, [30, 999, 2, 400], 16, k_cache.shape[0])
    meta.context_lens.copy_(new_meta.context_lens)
    meta.block_tables.fill_(-1)
    meta.block_tables[:, :new_meta.block_tables.shape[1]].copy_(new_meta.block_tables)
    query.copy_(_randn(*query.shape, dtype=query.dtype))
    graph.replay()
    new_meta.block_tables = meta.block_tables
    check_attention(ref, out, query, k_cache, v_cache, new_meta)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_prepare_qkv_cuda_graph_replay(ref, tri):
    """Captured once at Qwen3-0.6B head shapes, replayed on new tokens, positions and slots."""
    shape = (16, 8, 128, 16, torch.bfloat16, True)
    inputs = prepare_inputs(*shape, num_tokens=4)
    tri.prepare_qkv(**inputs)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        query, key = tri.prepare_qkv(**inputs)
    fresh = prepare_inputs(*shape, num_tokens=4)
    for name in ("query", "key", "value", "positions", "slot_mapping", "k_cache", "v_cache"):
        inputs[name].copy_(fresh[name])
    expected = run_prepare(ref.prepare_qkv, {**fresh, **{n: inputs[n] for n in (
        "q_weight", "k_weight", "cos_sin")}})
    graph.replay()
    for got, want in zip((query, key, inputs["k_cache"], inputs["v_cache"]), expected):
        torch.testing.assert_close(got.float(), want.float(), **PREPARE_TOL[torch.bfloat16])


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("query_lens,context_lens", [([1], [9]), ([1, 1, 1], [5, 20, 33]),
                                                     ([20], [20])], ids=["1row", "3rows", "20rows"])
def test_decoder_forward_on_triton_matches_torch(ref, tri, family, query_lens, context_lens):
    """The whole decoder (fp32) on TritonOps vs TorchOps: one row takes the one-row qkv
    and gate/up kernels and the gated split-K down_proj, three rows the plain split-K,
    20 rows cuBLAS; Qwen2 has qkv biases, Qwen3 q/k norms."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from models import make_config
    from atom_rollout.models.decoder import DecoderForCausalLM
    config = make_config(family)
    model = DecoderForCausalLM(DecoderSpec.from_hf(config, family == "qwen2",
                                                   family == "qwen3"), config).to(DEVICE)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.08) if param.dim() > 1 else param.normal_(
                1.0 if "norm" in name else 0.0, 0.1)
    model.init_rotary(64, DEVICE)
    meta = make_meta(query_lens, context_lens, 4, 24)
    spec = model.spec
    caches = [(_randn(24, 4, spec.num_kv_heads, spec.head_dim),
               _randn(24, 4, spec.num_kv_heads, spec.head_dim)) for _ in range(spec.num_layers)]
    ids = torch.randint(0, spec.vocab_size, (sum(query_lens),), device=DEVICE)
    positions = torch.cat([torch.arange(c - q, c) for q, c in zip(query_lens, context_lens)])
    outs = [model(ops, ids, positions.to(DEVICE), [(k.clone(), v.clone()) for k, v in caches],
                  meta) for ops in (tri, ref)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
