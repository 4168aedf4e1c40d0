"""Fused sampling for rows without top-k/top-p: temperature, min-p, banned
tokens, inverse-CDF draw, processed and raw logprobs, in two or three launches.

The vocabulary is split into chunks of BLOCK tokens so that even one row
spreads over many programs:

1. ``_chunk_stats_kernel`` (grid rows x chunks) reads each chunk once and
   writes its max and argmax of the banned-masked logits, its sum of
   exp(logit / T - chunk max) and the same pair for the raw logits.
2. ``_kept_sum_kernel`` (same grid; only when min-p is in use) re-reads the
   chunk and sums the mass that survives min-p, which needs the row max.
3. ``_pick_kernel`` (one program per row) rescales the chunk sums to the row
   max, takes their float64 cumulative sum, finds the chunk where
   ``uniform * total`` lands and scans only that chunk for the token.

Chunk sums and both scans accumulate in float64 (per-token exp stays fp32),
so the CDF stays accurate over a 152k vocabulary. Every chunk's mass is
defined by one formula (exp(s - chunk max) in fp32, summed in fp64) that
stage 3 recomputes with the same ops, so the chunk it picks holds the token
(up to fp64 summation order, covered by falling back to its last token).
Grid sizes and buffers depend only on shapes: no host syncs, graph-capturable.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Fields of the per-chunk float64 partials buffer [R, NUM_FIELDS, chunks].
_MAX = tl.constexpr(0)  # max of banned-masked logits (unscaled)
_SUM = tl.constexpr(1)  # sum exp(s - chunk max of s), s = masked logits / T
_RAW_MAX = tl.constexpr(2)
_RAW_SUM = tl.constexpr(3)  # sum exp(raw - raw chunk max)
_KEPT = tl.constexpr(4)  # like _SUM over the tokens min-p keeps
NUM_FIELDS = 5
_NUM_FIELDS = tl.constexpr(NUM_FIELDS)  # triton 3.6 reads only tl.constexpr(...) globals

MIN_BLOCK = 1024
MAX_BLOCK = 4096
MAX_CHUNKS = 1024  # the pick kernel holds one row's chunk partials in registers
PROGRAMS_PER_SM = 4


@triton.jit
def _load_chunk(logits_ptr, stride, row, cols, vocab, ban_tok_ptr, ban_start_ptr,
                HAS_BANNED: tl.constexpr):
    """(raw, masked) fp32 logits of one chunk; padding and banned tokens are -inf."""
    raw = tl.load(logits_ptr + row * stride + cols, mask=cols < vocab,
                  other=float("-inf")).to(tl.float32)
    masked = raw
    if HAS_BANNED:
        first = tl.load(ban_start_ptr + row)
        end = tl.load(ban_start_ptr + row + 1)
        for j in range(first, end):
            masked = tl.where(cols == tl.load(ban_tok_ptr + j), float("-inf"), masked)
    return raw, masked


@triton.jit
def _chunk_scales(part_row, num_chunks, divisor, CHUNKS_PAD: tl.constexpr):
    """Per chunk: max of s = logits / T (fp32, 0 for empty chunks) and
    exp(chunk max - row max) (fp64, 0 for empty chunks); the row max of s."""
    offs = tl.arange(0, CHUNKS_PAD)
    chunk_max = tl.load(part_row + _MAX * num_chunks + offs, mask=offs < num_chunks,
                        other=float("-inf")).to(tl.float32)
    scaled_max = tl.math.div_rn(chunk_max, divisor)
    row_max = tl.max(scaled_max, 0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a fully banned row
    scale = tl.exp(scaled_max.to(tl.float64) - row_max.to(tl.float64))
    return tl.where(scaled_max == float("-inf"), 0.0, scaled_max), row_max, scale


@triton.jit
def _row_log_z(part_row, num_chunks, scale, CHUNKS_PAD: tl.constexpr):
    """log of the row's sum exp(s - row max) before min-p, fp32."""
    offs = tl.arange(0, CHUNKS_PAD)
    sums = tl.load(part_row + _SUM * num_chunks + offs, mask=offs < num_chunks, other=0.0)
    return tl.log(tl.sum(sums * scale, 0)).to(tl.float32)


@triton.jit
def _min_p_drop(scaled, row_max, log_z, min_p):
    # The torch path's comparison: logp < max logp + log(min_p) is dropped.
    logp = (scaled - row_max) - log_z
    threshold = (0.0 - log_z) + tl.log(tl.maximum(min_p, 1e-38))
    return logp < tl.where(min_p > 0, threshold, float("-inf"))


@triton.jit
def _chunk_stats_kernel(part_ptr, arg_ptr, logits_ptr, temp_ptr, ban_tok_ptr, ban_start_ptr,
                        vocab, num_chunks, stride,
                        HAS_BANNED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    raw, masked = _load_chunk(logits_ptr, stride, row, cols, vocab, ban_tok_ptr,
                              ban_start_ptr, HAS_BANNED)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp > 0, temp, 1.0)
    chunk_max, chunk_arg = tl.max(masked, 0, return_indices=True)
    scaled_max = tl.math.div_rn(chunk_max, divisor)
    scaled_max = tl.where(scaled_max == float("-inf"), 0.0, scaled_max)
    mass = tl.exp(tl.math.div_rn(masked, divisor) - scaled_max)
    raw_max = chunk_max
    if HAS_BANNED:
        raw_max = tl.max(raw, 0)
    raw_mass = tl.exp(raw - tl.where(raw_max == float("-inf"), 0.0, raw_max))
    part = part_ptr + row * (_NUM_FIELDS * num_chunks) + chunk
    tl.store(part + _MAX * num_chunks, chunk_max.to(tl.float64))
    tl.store(part + _SUM * num_chunks, tl.sum(mass.to(tl.float64), 0))
    tl.store(part + _RAW_MAX * num_chunks, raw_max.to(tl.float64))
    tl.store(part + _RAW_SUM * num_chunks, tl.sum(raw_mass.to(tl.float64), 0))
    tl.store(arg_ptr + row * num_chunks + chunk, chunk * BLOCK + chunk_arg)


@triton.jit
def _kept_sum_kernel(part_ptr, logits_ptr, temp_ptr, min_p_ptr, ban_tok_ptr, ban_start_ptr,
                     vocab, num_chunks, stride,
                     HAS_BANNED: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    part_row = part_ptr + row * (_NUM_FIELDS * num_chunks)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp > 0, temp, 1.0)  # greedy rows divide by 1 like the torch path
    min_p = tl.where(temp == 0, 0.0, tl.load(min_p_ptr + row))  # greedy rows ignore min-p
    kept = tl.load(part_row + _SUM * num_chunks + chunk)
    if min_p > 0:
        scaled_max, row_max, scale = _chunk_scales(part_row, num_chunks, divisor, CHUNKS_PAD)
        log_z = _row_log_z(part_row, num_chunks, scale, CHUNKS_PAD)
        offs = tl.arange(0, CHUNKS_PAD)
        this_max = tl.sum(tl.where(offs == chunk, scaled_max, 0.0), 0)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        unused_raw, masked = _load_chunk(logits_ptr, stride, row, cols, vocab, ban_tok_ptr,
                                         ban_start_ptr, HAS_BANNED)
        scaled = tl.math.div_rn(masked, divisor)
        drop = _min_p_drop(scaled, row_max, log_z, min_p)
        mass = tl.where(drop, 0.0, tl.exp(scaled - this_max))
        kept = tl.sum(mass.to(tl.float64), 0)
    tl.store(part_row + _KEPT * num_chunks + chunk, kept)


@triton.jit
def landing_chunk(mass, valid, offs, uniform):
    """(chunk, cdf before it, target, total): the chunk where target = uniform * total
    lands on the fp64 CDF of the chunk masses (valid: the lanes that are chunks)."""
    cdf = tl.cumsum(mass, 0)
    total = tl.max(cdf, 0)
    target = uniform * total
    below = valid & (cdf <= target)
    # A target rounded up to the total (uniform within 2^-53 of 1) lands in the last
    # chunk holding mass, and only the chunks before it count as below.
    last_chunk = tl.max(tl.where(valid & (mass > 0), offs, 0), 0)
    chunk = tl.minimum(tl.sum(below.to(tl.int32), 0), last_chunk)
    before = tl.max(tl.where(below & (offs < chunk), cdf, 0.0), 0)  # cdf[chunk - 1]
    return chunk, before, target, total


@triton.jit
def _token_in_chunk(logits_ptr, ban_tok_ptr, ban_start_ptr, min_p_ptr, part_row, row, chunk,
                    chunk_max, local_target, divisor, row_max, scale, greedy, vocab,
                    num_chunks, stride, HAS_BANNED: tl.constexpr, HAS_MIN_P: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    """(index in the chunk or -1 when it holds no mass, the chunk's raw logits, their
    indices): the token inside the landing chunk, from the same per-token masses as the
    chunk sums."""
    idx = tl.arange(0, BLOCK)
    chunk_raw, masked = _load_chunk(logits_ptr, stride, row, chunk * BLOCK + idx, vocab,
                                    ban_tok_ptr, ban_start_ptr, HAS_BANNED)
    scaled = tl.math.div_rn(masked, divisor)
    token_mass = tl.exp(scaled - chunk_max)
    if HAS_MIN_P:
        min_p = tl.where(greedy, 0.0, tl.load(min_p_ptr + row))
        log_z = _row_log_z(part_row, num_chunks, scale, CHUNKS_PAD)
        token_mass = tl.where(_min_p_drop(scaled, row_max, log_z, min_p), 0.0, token_mass)
    token_cdf = tl.cumsum(token_mass.to(tl.float64), 0)
    first = tl.sum((token_cdf <= local_target).to(tl.int32), 0)
    # fp64 rounding can leave the target just past this chunk's last token
    last = tl.max(tl.where(token_mass > 0, idx, -1), 0)
    return tl.where(first < BLOCK, first, last), chunk_raw, idx


@triton.jit
def _raw_logprob(part_row, logit, top, chunk_maxes, offs, valid, num_chunks,
                 HAS_BANNED: tl.constexpr):
    """log softmax of the raw logits at ``logit`` (``top``: the masked row max, the raw
    one too unless tokens are banned)."""
    if HAS_BANNED:
        raw_maxes = tl.load(part_row + _RAW_MAX * num_chunks + offs, mask=valid,
                            other=float("-inf"))
        top = tl.max(raw_maxes, 0)
    else:
        raw_maxes = chunk_maxes
    top = tl.where(top == float("-inf"), 0.0, top)
    raw_sums = tl.load(part_row + _RAW_SUM * num_chunks + offs, mask=valid, other=0.0)
    raw_z = tl.sum(raw_sums * tl.exp(raw_maxes - top), 0)
    return (logit.to(tl.float64) - top - tl.log(raw_z)).to(tl.float32)


@triton.jit
def _pick_kernel(token_ptr, token_f64_ptr, logprob_ptr, raw_ptr, part_ptr, arg_ptr, logits_ptr,
                 temp_ptr, min_p_ptr, uniform_ptr, ban_tok_ptr, ban_start_ptr, vocab,
                 num_chunks, stride,
                 HAS_BANNED: tl.constexpr, HAS_MIN_P: tl.constexpr, NEED_RAW: tl.constexpr,
                 PACKED: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part_row = part_ptr + row * (_NUM_FIELDS * num_chunks)
    offs = tl.arange(0, CHUNKS_PAD)
    valid = offs < num_chunks
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0
    divisor = tl.where(temp > 0, temp, 1.0)  # greedy rows divide by 1 like the torch path
    scaled_max, row_max, scale = _chunk_scales(part_row, num_chunks, divisor, CHUNKS_PAD)

    field = _KEPT if HAS_MIN_P else _SUM
    mass = tl.load(part_row + field * num_chunks + offs, mask=valid, other=0.0) * scale
    chunk, before, target, total = landing_chunk(mass, valid, offs,
                                                 tl.load(uniform_ptr + row))
    # Recomputed from the same inputs with the same ops as the vectors above.
    chunk_max = tl.math.div_rn(tl.load(part_row + _MAX * num_chunks + chunk).to(tl.float32),
                               divisor)
    chunk_scale = tl.exp(chunk_max.to(tl.float64) - row_max.to(tl.float64))
    chunk_max = tl.where(chunk_max == float("-inf"), 0.0, chunk_max)
    local_target = tl.maximum(tl.where(chunk_scale > 0, (target - before) / chunk_scale, 0.0),
                              0.0)
    in_chunk, chunk_raw, idx = _token_in_chunk(
        logits_ptr, ban_tok_ptr, ban_start_ptr, min_p_ptr, part_row, row, chunk, chunk_max,
        local_target, divisor, row_max, scale, greedy, vocab, num_chunks, stride, HAS_BANNED,
        HAS_MIN_P, BLOCK, CHUNKS_PAD)

    # The masked argmax: the first chunk reaching the row max, then its own argmax.
    chunk_maxes = tl.load(part_row + _MAX * num_chunks + offs, mask=valid, other=float("-inf"))
    top, best_chunk = tl.max(chunk_maxes, 0, return_indices=True)
    argmax = tl.load(arg_ptr + row * num_chunks + best_chunk)
    use_argmax = greedy | (in_chunk < 0)
    token = tl.where(use_argmax, argmax, chunk * BLOCK + in_chunk).to(tl.int64)
    # the token's logit without another dependent load: the argmax's is the row max
    logit = tl.where(use_argmax, top.to(tl.float32),
                     tl.sum(tl.where(idx == in_chunk, chunk_raw, 0.0), 0))

    raw_logprob = _raw_logprob(part_row, logit, top, chunk_maxes, offs, valid, num_chunks,
                               HAS_BANNED)
    scaled_logit = tl.math.div_rn(logit, divisor).to(tl.float64)
    processed = (scaled_logit - row_max.to(tl.float64) - tl.log(total)).to(tl.float32)
    tl.store(token_ptr + row, token)
    if PACKED:  # exact: token ids are far below 2^53
        tl.store(token_f64_ptr + row, token.to(tl.float64))
    # stores cast to the buffers' dtype: fp32, or fp64 rows of a packed output
    tl.store(logprob_ptr + row, tl.where(greedy, raw_logprob, processed))
    if NEED_RAW:
        tl.store(raw_ptr + row, raw_logprob)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor,
                 uniforms: torch.Tensor, banned: torch.Tensor | None, need_raw: bool, *,
                 use_min_p: bool = True, block: int | None = None,
                 out: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tokens [R] int64, their processed logprobs [R] fp32 (raw for greedy rows)
    and raw logprobs [R] fp32 when ``need_raw``; same draw as ``sampler.sample``
    for rows with top_k = 0 and top_p = 1.

    ``use_min_p=False`` skips the min-p launch (the caller's host flag that no
    sampled row has min_p > 0); ``block`` overrides the chunk size (a power of 2).
    ``out``: a contiguous [2 or 3 (need_raw), R] float64 tensor that also receives the
    token ids and holds the logprobs (and raw logprobs), which are returned as its rows.
    """
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    if out is None:
        logprobs = torch.empty(rows, dtype=torch.float32, device=device)
        raw = torch.empty(rows, dtype=torch.float32, device=device) if need_raw else None
    else:
        _check_out(out, rows, need_raw, device)
        logprobs, raw = out[1], (out[2] if need_raw else None)
    if rows == 0:
        return tokens, logprobs, raw
    block = block or choose_block(rows, vocab, device)
    num_chunks = triton.cdiv(vocab, block)
    chunks_pad = max(16, triton.next_power_of_2(num_chunks))
    part = torch.empty((rows, NUM_FIELDS, num_chunks), dtype=torch.float64, device=device)
    arg = torch.empty((rows, num_chunks), dtype=torch.int32, device=device)
    ban_tokens, ban_starts = _banned_by_row(banned, rows, vocab, tokens)
    temperature = temperature.float().contiguous()
    min_p = min_p.float().contiguous()
    uniforms = uniforms.double().contiguous()
    common = dict(HAS_BANNED=banned is not None, BLOCK=block, num_warps=_warps(block))
    _chunk_stats_kernel[(rows, num_chunks)](
        part, arg, logits, temperature, ban_tokens, ban_starts, vocab, num_chunks,
        logits.stride(0), **common)
    if use_min_p:
        _kept_sum_kernel[(rows, num_chunks)](
            part, logits, temperature, min_p, ban_tokens, ban_starts, vocab, num_chunks,
            logits.stride(0), CHUNKS_PAD=chunks_pad, **common)
    _pick_kernel[(rows,)](
        tokens, tokens if out is None else out[0], logprobs,
        raw if raw is not None else logprobs, part, arg, logits, temperature, min_p, uniforms,
        ban_tokens, ban_starts, vocab, num_chunks, logits.stride(0), HAS_MIN_P=use_min_p,
        NEED_RAW=need_raw, PACKED=out is not None, CHUNKS_PAD=chunks_pad, **common)
    return tokens, logprobs, raw


def choose_block(rows: int, vocab: int, device: torch.device) -> int:
    """Chunk size: enough programs to cover the GPU a few times over, chunks
    of 1k-4k tokens, at most MAX_CHUNKS chunks per row."""
    if device.type == "cuda":
        programs_per_row = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), rows)
        widest = triton.cdiv(vocab, programs_per_row)  # round down: at least that many programs
        block = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(widest + 1) // 2))
    else:  # the interpreter: fewer, wider programs run faster
        block = MAX_BLOCK
    block = min(block, max(16, triton.next_power_of_2(vocab)))
    while triton.cdiv(vocab, block) > MAX_CHUNKS:
        block *= 2
    return block


def _check_out(out: torch.Tensor, rows: int, need_raw: bool, device: torch.device) -> None:
    shape = (3 if need_raw else 2, rows)
    if out.shape != shape or out.dtype != torch.float64 or out.device != device \
            or not out.is_contiguous():
        raise ValueError(f"fused_sample: out must be a contiguous float64 {shape} tensor "
                         f"on {device}, not {out.dtype} {tuple(out.shape)} on {out.device}")


def _banned_by_row(banned: torch.Tensor | None, rows: int, vocab: int,
                   placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Banned tokens sorted by row and each row's [start, end) into them,
    as start offsets [R + 1]; when nothing is banned, the placeholder (a tensor on the
    device, which the kernels then never read) twice."""
    if banned is None:
        return placeholder, placeholder
    device = placeholder.device
    keys = (banned[0].to(torch.int64) * vocab + banned[1].to(torch.int64)).sort().values
    starts = torch.searchsorted(keys, torch.arange(rows + 1, device=device) * vocab)
    return (keys % vocab).contiguous(), starts


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8
