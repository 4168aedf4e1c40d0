"""TritonOps: the KernelOps interface on Triton kernels (CUDA and ROCm)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..interface import unfused_linear_add_rms_norm, unfused_prepare_qkv
from ..metadata import AttentionMetadata

INTERPRETER_TARGET_PROGRAMS = 4  # keeps split-KV exercised under TRITON_INTERPRET
INTERPRETER_MULTIPROCESSORS = 8  # splits K of the tiny test models' projections


class TritonOps:
    name = "triton"

    def __init__(self) -> None:
        # Imported here, not at module import, so that @triton.jit runs when the
        # first TritonOps is built: TRITON_INTERPRET set by then still applies.
        from . import (attention, kv_cache, l2_prefetch, pdl, pointwise, prepare_qkv,
                       split_k_linear)
        self._pdl_supported = pdl.supported
        self._split_k = split_k_linear
        self._attention = attention
        self._kv_cache = kv_cache
        self._pointwise = pointwise
        self._prepare_qkv = prepare_qkv
        self._l2_prefetch = l2_prefetch
        self.fused_qkv = True  # False: q/k norm, rotary and the KV write as separate kernels
        # At one row (the measured case) prepare_qkv forks a side stream that asks L2 for
        # the first prefetch_max_bytes (None: all) of o_proj's weight through the attention
        # block when that weight streams (over STREAMING_BYTES; Hopper or newer,
        # l2_prefetch.py); o_proj's call joins it. H100, Qwen3-8B batch-1 graph
        # (scripts/ab_latency.py): 5,405-5,409 us at 4 MiB, 5,430 at 2, 5,413 at 6, 5,426
        # at 8, 5,463 at 16, 5,519 all 33.5 MB, 5,507-5,511 without; Qwen3-0.6B's 4 MB
        # o_proj: 978 with, 946 without.
        self.prefetch_next_weight = True
        self.prefetch_max_bytes: int | None = 4 << 20
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending_prefetches: dict[int, torch.cuda.Event] = {}
        # Rows up to which linear_add_rms_norm splits K in a Triton kernel (0: always
        # cuBLAS + rms_norm), and up to which it applies SiLU-and-mul as it reads
        # (more rows: the silu_and_mul kernel first); H100 sweep, scripts/bench_split_k.py.
        self.split_k_max_rows = split_k_linear.MAX_ROWS
        self.split_k_max_gated_rows = 1
        self.one_row_linear = True  # False: every linear() is cuBLAS
        # Both apply to weights up to this size (None: any size; with the streaming
        # config for large weights ours beat cuBLAS on Qwen3-8B too, scripts/bench_gemv_8b.py).
        self.few_rows_max_weight_bytes: int | None = None
        # Launch the decode chain's kernels as programmatic dependents (kernels/triton/
        # pdl.py) on GPUs that have it; False: ordinary launches.
        self.pdl = True
        self.max_attention_splits = attention.MAX_SPLITS
        self._multiprocessors: dict[torch.device, int] = {}
        self._hopper_devices: dict[torch.device, bool] = {}

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self._kv_cache.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def attention(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        config = self._attention.tile_config(
            meta.max_query_len, _next_pow2(query.shape[1] // max(1, k_cache.shape[2])))
        splits = self._attention.choose_num_splits(
            meta, config, k_cache.shape[2], self._programs_to_fill(query.device),
            self.max_attention_splits)
        return self._attention.paged_attention(query, k_cache, v_cache, meta, scale, splits,
                                               pdl=self._use_pdl(query.device))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
        return self._pointwise.rms_norm(x, weight, eps, residual, pdl=self._use_pdl(x.device))

    def rotary(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pointwise.rotary(query, key, positions, cos_sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._pointwise.silu_and_mul(x)

    def prepare_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                    positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    prefetch: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        args = (query, key, value, q_weight, k_weight, eps, positions, cos_sin, k_cache,
                v_cache, slot_mapping)
        self._start_prefetch(prefetch, query)
        if self.fused_qkv:
            try:
                return self._prepare_qkv.prepare_qkv(*args, pdl=self._use_pdl(query.device))
            except ValueError:
                raise
            except Exception as error:  # a Triton build the fused kernel does not compile on
                warnings.warn(f"fused prepare_qkv kernel unavailable, using rms_norm + rotary "
                              f"+ write_kv: {type(error).__name__}: {str(error)[:200]}")
                self.fused_qkv = False
        return unfused_prepare_qkv(self, *args)

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """One row whose output fills two programs per SM unsplit: our one-row kernel
        (faster than cuBLAS's GEMV there); anything else: F.linear."""
        unsplit = self._split_k.ONE_ROW_UNSPLIT
        if x.dim() != 2 or x.shape[0] != 1 or not self.one_row_linear \
                or weight.shape[0] < 2 * unsplit.block_n * self._multiprocessor_count(x.device) \
                or not self._few_rows_weight(weight, x) \
                or (bias is not None and bias.dtype != x.dtype):
            return F.linear(x, weight, bias)
        return self._split_k.one_row_linear(x, weight, bias, pdl=self._use_pdl(x.device))

    def _start_prefetch(self, weight: torch.Tensor | None, query: torch.Tensor) -> None:
        """Ask L2 for weight on a side stream forked here, right after qkv_proj, so that
        nothing on the main stream waits for the prefetches to drain; the call that reads
        weight joins it (_join_prefetch)."""
        device = query.device
        if weight is None or not self.prefetch_next_weight \
                or query.shape[0] != 1 or not self._hopper(device) \
                or weight.numel() * weight.element_size() <= self._split_k.STREAMING_BYTES:
            return
        self._join_prefetch(weight)  # one pending per weight, whatever came in between
        n_bytes = self._l2_prefetch.extent(weight, self.prefetch_max_bytes)
        if not n_bytes:
            return
        if device not in self._side_streams:  # one per device, made once
            self._side_streams[device] = torch.cuda.Stream(device)
        side = self._side_streams[device]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._l2_prefetch.prefetch(weight, n_bytes)
            done = torch.cuda.Event()
            done.record(side)
        self._pending_prefetches[weight.data_ptr()] = done

    def _join_prefetch(self, weight: torch.Tensor) -> None:
        done = self._pending_prefetches.pop(weight.data_ptr(), None)
        if done is not None:
            torch.cuda.current_stream(weight.device).wait_event(done)

    def linear_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor,
                            residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        self._join_prefetch(weight)
        if x.shape[0] > self.split_k_max_rows or x.dim() != 2 \
                or not self._few_rows_weight(weight, x) or residual.dtype != x.dtype:
            return unfused_linear_add_rms_norm(self, x, weight, residual, norm_weight, eps,
                                               gated)
        if gated and x.shape[0] > self.split_k_max_gated_rows:
            x, gated = self.silu_and_mul(x), False
        pdl = self._use_pdl(x.device)
        partials = self._split_k.split_k_partials(
            x, weight, gated=gated, multiprocessors=self._multiprocessor_count(x.device),
            pdl=pdl)
        return self._pointwise.rms_norm_of_partials(partials, x.dtype, norm_weight, eps,
                                                    residual, pdl=pdl)

    def _few_rows_weight(self, weight: torch.Tensor, x: torch.Tensor) -> bool:
        """A weight our few-row kernels take: contiguous rows, x's dtype, small enough."""
        limit = self.few_rows_max_weight_bytes
        return weight.stride(-1) == 1 and weight.dtype == x.dtype \
            and (limit is None or weight.numel() * weight.element_size() <= limit)

    def _use_pdl(self, device: torch.device) -> bool:
        return self.pdl and self._hopper(device)

    def _hopper(self, device: torch.device) -> bool:
        """A GPU with PDL and bulk L2 prefetch (Hopper or newer)."""
        if device not in self._hopper_devices:
            self._hopper_devices[device] = self._pdl_supported(device)
        return self._hopper_devices[device]

    def _multiprocessor_count(self, device: torch.device) -> int:
        if device not in self._multiprocessors:
            self._multiprocessors[device] = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else INTERPRETER_MULTIPROCESSORS)
        return self._multiprocessors[device]

    def _programs_to_fill(self, device: torch.device) -> int:
        """About four programs per multiprocessor: with decode contexts of uneven
        length, fewer leave SMs idle behind the longest sequences (H100 sweep,
        scripts/bench_decode_attention.py: batch 16 at 100-2048 keys 46.6 -> 33.8 us)."""
        if device.type != "cuda":
            return INTERPRETER_TARGET_PROGRAMS
        return 4 * self._multiprocessor_count(device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
