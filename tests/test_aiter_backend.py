"""The aiter backend without AMD hardware: backend selection with a faked ROCm
torch and a fake `aiter` module, and AiterOps' argument mapping against fake
AITER ops that check what they are given and compute the result with TorchOps.
Nothing here runs a real AITER kernel."""
from __future__ import annotations

import importlib
import importlib.abc
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

import atom_rollout.kernels as kernels
from atom_rollout.kernels import AttentionMetadata, Backend, TorchOps, registry
from atom_rollout.kernels import aiter as aiter_backend
from atom_rollout.kernels.aiter import AiterOps
from atom_rollout.kernels.aiter.ops import UNIFIED_ATTENTION_MODULES

REF = TorchOps()
GLOBAL_BACKENDS = registry._BACKENDS
ENV_AT_START = os.environ.get(registry.ENV_VAR)


@dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict


def _fake_aiter_modules(calls: list[Call], with_unified: bool) -> dict[str, ModuleType]:
    """`aiter` and its unified-attention submodules, ops recording each call."""
    aiter = ModuleType("aiter")

    def op(fn):
        def recorded(*args, **kwargs):
            calls.append(Call(fn.__name__, args, kwargs))
            return fn(*args, **kwargs)
        setattr(aiter, fn.__name__, recorded)
        return recorded

    for fn in (reshape_and_cache_flash, paged_attention_v1, rmsnorm2d_fwd,
               rmsnorm2d_fwd_with_add, rope_cached_positions_2c_fwd_inplace, silu_and_mul):
        op(fn)
    modules = {"aiter": aiter}
    if with_unified:
        path = UNIFIED_ATTENTION_MODULES[0]
        parts = path.split(".")
        for i in range(2, len(parts) + 1):
            modules[".".join(parts[:i])] = ModuleType(".".join(parts[:i]))
        modules[path].unified_attention = op(unified_attention)
    return modules


# --- fake AITER ops: the signatures of ROCm/aiter, checks, then TorchOps -------

def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                            kv_cache_dtype, k_scale, v_scale):
    assert kv_cache_dtype == "auto" and key.dtype == key_cache.dtype
    assert key.stride(2) == 1 and key.stride(1) == key.shape[2]
    assert k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.numel() == 1
    assert key_cache.stride(0) == value_cache.stride(0)
    REF.write_kv(key, value, key_cache, value_cache, slot_mapping)


def paged_attention_v1(out, workspace_buffer, query, key_cache, value_cache, scale,
                       block_tables, cu_query_lens, context_lens, max_context_len,
                       alibi_slopes, kv_cache_dtype, kv_cache_layout, logits_soft_cap,
                       k_scale, v_scale, fp8_out_scale=None, partition_size=256, mtp=1,
                       sliding_window=0):
    assert (kv_cache_layout, kv_cache_dtype, logits_soft_cap) == ("NHD", "auto", 0.0)
    assert alibi_slopes is None and fp8_out_scale is None and mtp == 1
    assert k_scale.dtype == torch.float32 and query.is_contiguous()
    assert context_lens.dtype == block_tables.dtype == torch.int32
    num_seqs, num_heads, head_size = query.shape
    assert block_tables.shape[1] >= math.ceil(max_context_len / key_cache.shape[1])
    cells = num_seqs * num_heads * math.ceil(max_context_len / partition_size)
    assert workspace_buffer.numel() >= cells * (head_size * query.element_size() + 8)
    if cu_query_lens is None:
        cu_query_lens = torch.arange(num_seqs + 1, dtype=torch.int32)
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), cu_query_lens, context_lens,
                             block_tables, 1, max_context_len)
    out.copy_(REF.attention(query, key_cache, value_cache, meta, scale))
    return out


def unified_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                      softmax_scale, causal, window_size, block_table, softcap, q_descale,
                      k_descale, v_descale, q_scales=None, alibi_slopes=None,
                      output_scale=None, qq_bias=None, sinks=None, shuffled_kv_cache=False,
                      skip_reduce=False):
    assert causal and tuple(window_size) == (-1, -1) and softcap == 0
    assert q_descale is k_descale is v_descale is None and not shuffled_kv_cache
    assert k.dim() == v.dim() == 4 and q.shape[1] % k.shape[2] == 0  # flash layout, GQA
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), cu_seqlens_q, seqused_k,
                             block_table, max_seqlen_q, max_seqlen_k)
    out.copy_(REF.attention(q, k, v, meta, softmax_scale))


def rmsnorm2d_fwd(input, weight, epsilon, use_model_sensitive_rmsnorm=0):
    assert input.dim() == 2 and input.is_contiguous()
    return REF.rms_norm(input, weight, epsilon)


def rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon,
                           gemma_norm=False, use_model_sensitive_rmsnorm=0):
    assert input.dim() == residual_in.dim() == 2 and residual_in.is_contiguous()
    normed, summed = REF.rms_norm(input, weight, epsilon, residual_in)
    out.copy_(normed)
    residual_out.copy_(summed)


def rope_cached_positions_2c_fwd_inplace(input_x, input_y, cos, sin, positions,
                                         rotate_style, reuse_freqs_front_part, nope_first):
    assert (rotate_style, reuse_freqs_front_part, nope_first) == (0, True, False)
    assert input_x.dim() == input_y.dim() == 4 and input_x.stride(-1) == input_y.stride(-1) == 1
    assert cos.is_contiguous() and cos.shape[1:3] == (1, 1)
    assert cos.shape[-1] * 2 == input_x.shape[-1]
    assert positions.dtype == torch.int64 and positions.shape == input_x.shape[:2]
    c, s = cos[positions].squeeze(2), sin[positions].squeeze(2)  # [s, b, 1, d/2]
    for x in (input_x, input_y):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))


def silu_and_mul(out, input, limit=0.0):
    assert input.is_contiguous() and out.shape == (*input.shape[:-1], input.shape[-1] // 2)
    out.copy_(REF.silu_and_mul(input))


# --- fixtures ---------------------------------------------------------------

@pytest.fixture
def calls() -> list[Call]:
    return []


@pytest.fixture
def fake_aiter(monkeypatch, calls):
    for name, module in _fake_aiter_modules(calls, with_unified=True).items():
        monkeypatch.setitem(sys.modules, name, module)
    return sys.modules["aiter"]


@pytest.fixture
def no_aiter(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiter", None)  # makes `import aiter` raise


@pytest.fixture
def rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


class RecordingOps(TorchOps):
    """Stands in for the Triton fallback and records which ops reached it."""
    name = "recording"

    def __init__(self):
        self.used: list[str] = []

    def __getattribute__(self, attr):
        if attr in ("write_kv", "attention", "rms_norm", "rotary", "silu_and_mul"):
            object.__getattribute__(self, "used").append(attr)
        return object.__getattribute__(self, attr)


@pytest.fixture
def fallback() -> RecordingOps:
    return RecordingOps()


@pytest.fixture
def ops(fake_aiter, fallback) -> AiterOps:
    return AiterOps(fallback=fallback)


def names(calls: list[Call]) -> list[str]:
    return [c.name for c in calls]


def make_batch(query_lens, context_lens, *, heads=4, kv_heads=2, head_dim=64,
               block_size=16, dtype=torch.bfloat16, seed=0):
    """Random query and caches, and metadata over shuffled blocks with -1 padding."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(c / block_size) for c in context_lens]
    width = max(blocks) + 1  # at least one -1 in every row
    num_blocks = sum(blocks) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(blocks), width), -1, dtype=torch.int32)
    for b, n in enumerate(blocks):
        tables[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(torch.zeros(sum(query_lens), dtype=torch.long), starts,
                             torch.tensor(context_lens, dtype=torch.int32), tables,
                             max(query_lens), max(context_lens))
    return query, k_cache, v_cache, meta


# --- availability and selection --------------------------------------------

class BrokenAiter(importlib.abc.MetaPathFinder):
    """Notes every attempt to import aiter and fails it as a broken install would."""

    def __init__(self):
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "aiter":
            self.attempts.append(name)
            raise RuntimeError("aiter: no GPU to JIT for")
        return None


@pytest.mark.usefixtures("rocm")
def test_package_import_never_imports_aiter(monkeypatch):
    """Importing the backend afresh does not import aiter; an aiter that fails
    to import makes is_available False instead of raising."""
    guard = BrokenAiter()
    monkeypatch.setattr(sys, "meta_path", [guard, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "aiter", raising=False)
    for name in ("atom_rollout.kernels.aiter", "atom_rollout.kernels.aiter.ops"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(kernels, "aiter", kernels.aiter)  # the re-import rebinds it
    fresh = importlib.import_module("atom_rollout.kernels.aiter")
    assert fresh is not aiter_backend and guard.attempts == []
    assert fresh.is_available(torch.device("cuda")) is False
    assert guard.attempts == ["aiter"]


@pytest.mark.usefixtures("rocm")
def test_is_available_needs_aiter_and_a_rocm_gpu(monkeypatch, calls):
    cuda = torch.device("cuda")
    monkeypatch.setitem(sys.modules, "aiter", None)
    assert not aiter_backend.is_available(cuda)
    monkeypatch.setitem(sys.modules, "aiter", _fake_aiter_modules(calls, False)["aiter"])
    assert aiter_backend.is_available(cuda)
    assert aiter_backend.is_available("cuda:0")
    assert not aiter_backend.is_available(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not aiter_backend.is_available(cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)  # a CUDA build of torch
    assert not aiter_backend.is_available(cuda)


class StubTriton:
    name = "triton"


@pytest.fixture
def backends(monkeypatch):
    """A private registry: aiter (real), triton (stub: on any GPU), torch (real)."""
    private = {"torch": Backend("torch", lambda device: True, TorchOps),
               "triton": Backend("triton", lambda device: torch.device(device).type == "cuda",
                                 StubTriton),
               "aiter": Backend("aiter", aiter_backend.is_available, AiterOps)}
    monkeypatch.setattr(registry, "_BACKENDS", private)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    return private


@pytest.mark.usefixtures("backends", "rocm", "fake_aiter")
def test_select_prefers_aiter_on_rocm_with_aiter():
    assert registry.available_backends(torch.device("cuda")) == ["aiter", "triton", "torch"]
    assert registry.select_backend("cuda").name == "aiter"
    assert isinstance(registry.select_backend("cuda"), AiterOps)
    assert registry.select_backend("cpu").name == "torch"


@pytest.mark.usefixtures("backends", "rocm", "no_aiter")
def test_select_falls_to_triton_then_torch_without_aiter():
    assert registry.select_backend("cuda").name == "triton"
    assert registry.select_backend("cpu").name == "torch"


@pytest.mark.usefixtures("backends", "rocm", "fake_aiter")
def test_option_and_env_override_preference(monkeypatch):
    assert registry.select_backend("cuda", requested="torch").name == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.select_backend("cuda").name == "triton"
    assert registry.select_backend("cuda", requested="aiter").name == "aiter"  # option wins
    monkeypatch.setenv(registry.ENV_VAR, "aiter")
    assert registry.select_backend("cuda").name == "aiter"


@pytest.mark.usefixtures("backends", "rocm", "no_aiter")
def test_requesting_aiter_where_unavailable_names_kernel_backend(monkeypatch):
    with pytest.raises(ValueError, match="kernel_backend"):
        registry.select_backend("cuda", requested="aiter")
    monkeypatch.setenv(registry.ENV_VAR, "aiter")
    with pytest.raises(ValueError, match="kernel_backend"):
        registry.select_backend("cuda")


@pytest.mark.usefixtures("backends", "fake_aiter")
def test_requesting_aiter_off_rocm_names_kernel_backend():
    with pytest.raises(ValueError, match="kernel_backend.*aiter"):
        registry.select_backend("cpu", requested="aiter")


def test_fixtures_leave_no_global_state():
    assert registry._BACKENDS is GLOBAL_BACKENDS and "aiter" not in sys.modules
    assert torch.version.hip is None and os.environ.get(registry.ENV_VAR) == ENV_AT_START


# --- argument mapping -------------------------------------------------------

def test_name_and_default_fallback_is_triton(fake_aiter):
    ops = AiterOps()
    assert ops.name == "aiter"
    pytest.importorskip("triton")
    assert ops._fallback_ops().name == "triton"


def test_write_kv_maps_to_reshape_and_cache_flash(ops, calls, fallback):
    _, k_cache, v_cache, _ = make_batch([1], [16], dtype=torch.bfloat16)
    k_cache.zero_(), v_cache.zero_()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(5, 3, 2, 64)  # float32 key/value strided out of a packed tensor
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([3, -1, 17, 0, 40])
    ops.write_kv(key, value, k_cache, v_cache, slots)
    REF.write_kv(key, value, ref_k, ref_v, slots)
    assert names(calls) == ["reshape_and_cache_flash"] and not fallback.used
    args = calls[0].args
    assert args[2] is k_cache and args[3] is v_cache and args[4] is slots
    assert args[0].dtype == torch.bfloat16 and args[5] == "auto"
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_write_kv_unpacked_cache_falls_back(ops, calls, fallback):
    _, k_cache, v_cache, _ = make_batch([1], [16])
    k_view, v_view = k_cache[..., :32], v_cache[..., :32]  # head_dim not packed
    kv = torch.randn(2, 2, 32).to(torch.bfloat16)
    ops.write_kv(kv, kv, k_view, v_view, torch.tensor([0, 1]))
    assert calls == [] and fallback.used == ["write_kv"]


def test_decode_uses_paged_attention_v1_nhd(ops, calls, fallback):
    query, k_cache, v_cache, meta = make_batch([1, 1, 1], [5, 33, 16])
    out = ops.attention(query, k_cache, v_cache, meta, 0.125)
    assert names(calls) == ["paged_attention_v1"] and not fallback.used
    args = calls[0].args
    assert args[2] is query and args[3] is k_cache and args[4] is v_cache  # no layout change
    assert args[6] is meta.block_tables and args[7] is None and args[8] is meta.context_lens
    assert args[9] == meta.max_context_len and args[12] == "NHD"
    torch.testing.assert_close(out, REF.attention(query, k_cache, v_cache, meta, 0.125))


def test_decode_clamps_an_upper_bound_context_to_the_block_table(ops, calls):
    query, k_cache, v_cache, meta = make_batch([1, 1], [20, 7], block_size=16)
    meta.max_context_len = 10_000  # an upper bound far past the table's 3 blocks
    out = ops.attention(query, k_cache, v_cache, meta, 0.125)
    assert calls[0].args[9] == meta.block_tables.shape[1] * 16
    meta.max_context_len = 20
    torch.testing.assert_close(out, REF.attention(query, k_cache, v_cache, meta, 0.125))


@pytest.mark.parametrize("query_lens, context_lens", [
    ([7, 3], [7, 3]),              # plain prefill
    ([4, 1, 6], [20, 9, 40]),      # chunked prefill over cached prefixes, and a decode
    ([2, 2], [18, 5]),             # two tokens per sequence (e.g. speculative)
])
def test_prefill_and_mixed_use_unified_attention(ops, calls, fallback, query_lens,
                                                 context_lens):
    query, k_cache, v_cache, meta = make_batch(query_lens, context_lens)
    out = ops.attention(query, k_cache, v_cache, meta, 0.1)
    assert names(calls) == ["unified_attention"] and not fallback.used
    args, kwargs = calls[0].args, calls[0].kwargs
    assert args[0] is query and args[1] is k_cache and args[2] is v_cache
    assert kwargs["cu_seqlens_q"] is meta.query_start_loc
    assert kwargs["seqused_k"] is meta.context_lens and kwargs["block_table"] is meta.block_tables
    assert kwargs["max_seqlen_q"] == meta.max_query_len
    assert kwargs["max_seqlen_k"] == meta.max_context_len and kwargs["causal"] is True
    torch.testing.assert_close(out, REF.attention(query, k_cache, v_cache, meta, 0.1))


def test_decode_shape_outside_paged_attention_v1_uses_unified(ops, calls):
    query, k_cache, v_cache, meta = make_batch([1, 1], [9, 30], head_dim=48, block_size=8)
    out = ops.attention(query, k_cache, v_cache, meta, 0.2)
    assert names(calls) == ["unified_attention"]
    torch.testing.assert_close(out, REF.attention(query, k_cache, v_cache, meta, 0.2))


def test_float32_attention_falls_back(ops, calls, fallback):
    query, k_cache, v_cache, meta = make_batch([1, 3], [4, 19], dtype=torch.float32)
    out = ops.attention(query, k_cache, v_cache, meta, 0.125)
    assert calls == [] and fallback.used == ["attention"]
    torch.testing.assert_close(out, REF.attention(query, k_cache, v_cache, meta, 0.125))


def test_without_unified_attention_prefill_falls_back(monkeypatch, calls, fallback):
    for name, module in _fake_aiter_modules(calls, with_unified=False).items():
        monkeypatch.setitem(sys.modules, name, module)
    for path in UNIFIED_ATTENTION_MODULES:
        monkeypatch.setitem(sys.modules, path, None)
    with pytest.warns(RuntimeWarning, match="unified_attention"):
        ops = AiterOps(fallback=fallback)
    query, k_cache, v_cache, meta = make_batch([3, 1], [3, 17])
    ops.attention(query, k_cache, v_cache, meta, 0.125)
    assert calls == [] and fallback.used == ["attention"]
    query, k_cache, v_cache, meta = make_batch([1, 1], [3, 17])
    ops.attention(query, k_cache, v_cache, meta, 0.125)  # decode still on AITER
    assert names(calls) == ["paged_attention_v1"]


def test_rms_norm_without_residual(ops, calls):
    x = torch.randn(2, 3, 64).to(torch.bfloat16)  # e.g. q_norm over [T, heads, head_dim]
    weight = torch.randn(64).to(torch.bfloat16)
    out = ops.rms_norm(x, weight, 1e-6)
    assert names(calls) == ["rmsnorm2d_fwd"]
    assert calls[0].args[0].shape == (6, 64) and calls[0].args[1] is weight
    assert calls[0].args[2] == 1e-6 and out.shape == x.shape
    torch.testing.assert_close(out, REF.rms_norm(x, weight, 1e-6))


def test_rms_norm_with_residual_uses_fused_add(ops, calls):
    x, residual = (torch.randn(5, 128).to(torch.float16) for _ in range(2))
    weight = torch.randn(128).to(torch.float16)
    out, new_residual = ops.rms_norm(x, weight, 1e-5, residual)
    assert names(calls) == ["rmsnorm2d_fwd_with_add"]
    out_arg, x_arg, res_in, res_out, w_arg, eps = calls[0].args
    assert out_arg.data_ptr() == out.data_ptr() and res_out.data_ptr() == new_residual.data_ptr()
    assert torch.equal(x_arg, x) and torch.equal(res_in, residual) and w_arg is weight
    assert eps == 1e-5
    ref_out, ref_residual = REF.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(new_residual, ref_residual)


def test_rms_norm_mixed_dtypes_fall_back(ops, calls, fallback):
    x = torch.randn(3, 32).to(torch.bfloat16)
    ops.rms_norm(x, torch.randn(32), 1e-6)
    assert calls == [] and fallback.used == ["rms_norm"]


def test_rotary_maps_to_rope_cached_positions_2c_inplace(ops, calls):
    heads, kv_heads, dim = 4, 2, 64
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.reshape(6, heads, dim), k.reshape(6, kv_heads, dim)  # strided views, as in the model
    freqs = torch.outer(torch.arange(32.0), 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.tensor([0, 1, 2, 30, 31, 5])
    ref_q, ref_k = REF.rotary(q.clone(), k.clone(), positions, cos_sin)
    out_q, out_k = ops.rotary(q, k, positions, cos_sin)
    assert names(calls) == ["rope_cached_positions_2c_fwd_inplace"]
    x_arg, y_arg, cos, sin, pos = calls[0].args[:5]
    assert x_arg.shape == (1, 6, heads, dim) and y_arg.shape == (1, 6, kv_heads, dim)
    assert cos.shape == sin.shape == (32, 1, 1, dim // 2) and cos.dtype == torch.float32
    assert pos.shape == (1, 6) and pos.dtype == torch.int64
    assert out_q.data_ptr() == q.data_ptr()  # rotated in place, in the qkv buffer
    torch.testing.assert_close(out_q, ref_q, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_k, ref_k, atol=2e-2, rtol=2e-2)
    ops.rotary(q, k, positions, cos_sin)
    assert calls[1].args[2] is cos  # the split table is cached


def test_rotary_mixed_dtypes_fall_back(ops, calls, fallback):
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8).to(torch.bfloat16)
    ops.rotary(q, k, torch.tensor([0, 1]), torch.randn(4, 8))
    assert calls == [] and fallback.used == ["rotary"]


def test_prepare_qkv_composes_norms_rotary_and_cache_write(ops, calls, fallback):
    heads, kv_heads, dim = 4, 2, 64
    qkv = torch.randn(5, (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.reshape(5, heads, dim), k.reshape(5, kv_heads, dim), v.reshape(5, kv_heads, dim)
    q_weight, k_weight = (torch.randn(dim).to(torch.bfloat16) for _ in range(2))
    freqs = torch.outer(torch.arange(32.0), 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions, slots = torch.tensor([7, 0, 31, 2, 3]), torch.tensor([3, -1, 17, 0, 9])
    _, k_cache, v_cache, _ = make_batch([1], [32], kv_heads=kv_heads, head_dim=dim)
    ref_caches = (k_cache.clone(), v_cache.clone())
    expected = REF.prepare_qkv(q.clone(), k.clone(), v, q_weight, k_weight, 1e-6, positions,
                               cos_sin, *ref_caches, slots)
    got = ops.prepare_qkv(q, k, v, q_weight, k_weight, 1e-6, positions, cos_sin, k_cache,
                          v_cache, slots)
    assert names(calls) == ["rmsnorm2d_fwd", "rmsnorm2d_fwd",
                            "rope_cached_positions_2c_fwd_inplace", "reshape_and_cache_flash"]
    assert not fallback.used
    assert calls[0].args[1] is q_weight and calls[1].args[1] is k_weight
    for g, e in zip((*got, k_cache, v_cache), (*expected, *ref_caches)):
        torch.testing.assert_close(g, e, atol=2e-2, rtol=2e-2)


def test_silu_and_mul_maps_out_and_input(ops, calls):
    x = torch.randn(3, 2, 40).to(torch.bfloat16)[:, :, 4:]  # non-contiguous [.., 2d]
    out = ops.silu_and_mul(x)
    assert names(calls) == ["silu_and_mul"]
    out_arg, in_arg = calls[0].args
    assert out_arg is out and out.shape == (3, 2, 18) and in_arg.is_contiguous()
    torch.testing.assert_close(out, REF.silu_and_mul(x))
