"""HF tensor names -> our (possibly fused) parameters, for loading and updates.

One mapping serves both: ``WeightMap.plan`` validates a whole set of named
tensors before anything is written, ``apply`` then copies the plan in.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.",
                    "module.")
IGNORED = re.compile(r"(rotary_emb\.inv_freq"
                     r"|^mtp\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight)$")
_MAIN_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def canonical_name(name: str) -> str:
    """Strip the wrappers trainers add (DDP, FSDP, torch.compile, checkpointing)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass(frozen=True)
class Target:
    """Where one HF tensor lives: rows [offset, offset + rows) of ``param``."""

    param: nn.Parameter
    offset: int
    rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.param.shape[1:])

    def view(self) -> torch.Tensor:
        return self.param.data.narrow(0, self.offset, self.rows)


class WeightMap:
    def __init__(self, model: nn.Module):
        self.targets: dict[str, Target] = {}
        primary_of: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if primary_of.setdefault(id(param), name) == name:
                self._add(name, param)
        self.aliases = dict(_aliases(model, primary_of))  # tied names -> their primary
        self.required = frozenset(self.targets)
        self.num_main_layers = model.spec.num_layers

    def _add(self, name: str, param: nn.Parameter) -> None:
        shards = getattr(param, "shards", None)
        if shards is None:
            self.targets[name] = Target(param, 0, param.shape[0])
            return
        fused = name.split(".")[-2]
        for shard, (offset, rows) in shards.items():
            self.targets[name.replace(fused, shard)] = Target(param, offset, rows)

    def canonical(self, name: str) -> str:
        """Wrappers stripped; DeepSeek-V3's MTP layout (main-layer indices past the
        last layer) renamed to ours, see models/mtp.py."""
        name = canonical_name(name)
        main = _MAIN_LAYER.match(name)
        if main and int(main.group(1)) >= self.num_main_layers:
            name = f"mtp.layers.{int(main.group(1)) - self.num_main_layers}.{main.group(2)}"
        return self.aliases.get(name, name)

    def resolve(self, name: str) -> str | None:
        name = self.canonical(name)
        return name if name in self.targets else None

    def plan(self, named_tensors: Iterable[tuple[str, torch.Tensor]], partial: bool = True,
             check_finite: bool = True) -> list[tuple[Target, torch.Tensor]]:
        """Validate every tensor (name, shape, finiteness, completeness) first;
        raise one ValueError listing all problems, having written nothing."""
        named = list(named_tensors)
        matched, problems = self._match([(name, tuple(t.shape)) for name, t in named], partial)
        plan = [(target, named[i][1]) for i, target in matched]
        if check_finite:
            problems["non_finite"] = _non_finite(plan, [named[i][0] for i, _ in matched])
        _raise_if_any(**problems)
        return plan

    def match(self, entries: Iterable[tuple[str, tuple[int, ...]]],
              partial: bool = True) -> list[tuple[int, Target]]:
        """(index into entries, target) for every (name, shape) that is not ignored.
        Unknown names, wrong shapes and (with partial=False) missing tensors raise one
        ValueError naming them."""
        matched, problems = self._match(entries, partial)
        _raise_if_any(**problems)
        return matched

    def _match(self, entries, partial: bool) -> tuple[list[tuple[int, Target]], dict]:
        matched, seen, unknown, bad_shape = [], set(), [], []
        for i, (raw_name, shape) in enumerate(entries):
            if IGNORED.search(self.canonical(raw_name)):
                continue
            name = self.resolve(raw_name)
            if name is None:
                unknown.append(raw_name)
            elif tuple(shape) != self.targets[name].shape:
                bad_shape.append(f"{raw_name}: got {tuple(shape)}, "
                                 f"expected {self.targets[name].shape}")
            else:
                matched.append((i, self.targets[name]))
                seen.add(name)
        missing = [] if partial else sorted(self.required - seen)
        return matched, dict(unknown=unknown, wrong_shape=bad_shape, missing=missing)

    @staticmethod
    def apply(plan: list[tuple[Target, torch.Tensor]]) -> None:
        """Copy in, batched into multi-tensor copies per (device, device) pair."""
        groups: dict[tuple, tuple[list, list]] = {}
        for target, tensor in plan:
            dst, src = groups.setdefault((target.param.device, tensor.device), ([], []))
            dst.append(target.view())
            src.append(tensor)
        with torch.no_grad():
            for dst, src in groups.values():
                torch._foreach_copy_(dst, src)


def _aliases(model: nn.Module, primary_of: dict[int, str]) -> Iterator[tuple[str, str]]:
    for name, param in model.named_parameters(remove_duplicate=False):
        if primary_of[id(param)] != name:
            yield name, primary_of[id(param)]


def _non_finite(plan: list[tuple[Target, torch.Tensor]], names: list[str]) -> list[str]:
    """Names of tensors holding NaN/inf: one multi-tensor max-abs pass per (device,
    dtype) (NaN and inf survive a max), read back together."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, (_, tensor) in zip(names, plan):
        if tensor.is_floating_point() and tensor.numel() > 0:
            groups.setdefault((tensor.device, tensor.dtype), []).append((name, tensor))
    flags = []
    for pairs in groups.values():
        peaks = torch._foreach_norm([t for _, t in pairs], ord=float("inf"))
        flags.append(torch.isfinite(torch.stack(peaks)))
    if not flags:
        return []
    finite = torch.cat([f.cpu() for f in flags]).tolist()
    named = [name for pairs in groups.values() for name, _ in pairs]
    return [name for name, ok in zip(named, finite) if not ok]


def _raise_if_any(**problems: list[str]) -> None:
    found = {kind: names for kind, names in problems.items() if names}
    if not found:
        return
    parts = []
    for kind, names in found.items():
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        parts.append(f"{kind} tensors: {shown}")
    raise ValueError("named_tensors: " + "; ".join(parts))


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: from its index when sharded."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model_dir: no .safetensors files in {model_dir}")
    return [os.path.join(model_dir, f) for f in files]


def iter_checkpoint(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_checkpoint(weight_map: WeightMap, model_dir: str) -> None:
    """Stream a checkpoint in tensor by tensor (no full copy held in memory)."""
    loaded = set()
    for name, tensor in iter_checkpoint(model_dir):
        for target, value in weight_map.plan([(name, tensor)], check_finite=False):
            WeightMap.apply([(target, value)])
            loaded.add(weight_map.resolve(name))
    missing = sorted(weight_map.required - loaded)
    if missing:
        raise ValueError(f"model_dir: checkpoint lacks tensors: {', '.join(missing[:20])}")


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of realistic scale, for benchmarks of real shapes without
    a checkpoint: N(0, 0.02) matrices, unit norms, zero biases."""
    gen = None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if gen is None or gen.device != param.device:
                gen = torch.Generator(param.device).manual_seed(seed)
            if param.dim() > 1:
                param.normal_(0, 0.02, generator=gen)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()
