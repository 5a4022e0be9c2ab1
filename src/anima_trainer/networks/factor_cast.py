"""Speed lever: the fp32 LoRA factors cast to the compute dtype once per forward pass, a few kernels per block.

Without it every LoRA branch casts its two factors itself (`weight.to(x.dtype)`, and the grads back in the
backward): two small kernels per branch each way, 432 per compiled step on the 28-block DiT (bench/README.md
"Why the gap").  With it a forward pre-hook of the DiT (and of a trained text encoder) casts all factors before
the model runs: per block one `cat` into a half-precision buffer, whose slices the branches read
(`AdapterModule.cast_factor`).  The backward is one `cat` of the block's factor grads and one cast back to fp32.

Why per block and not one cast for the whole network: the fp32 grads of a block's factors become ready when
that block's backward is done (not all at the end of the backward), which is what an all-reduce overlapped with
the backward needs (docs/multi_gpu.md).

Exactness: the values are the same casts the branches did (bit-identical forward), the fp32 grads the same
bf16→fp32 casts of the same bf16 grads.  Grads of factors no branch used in this forward (module_dropout, a
block that did not run) stay None, as before.  The casts live until the next forward pass, so a checkpointed
block's recompute in the backward reads the very tensors its forward read.  Stale casts (an optimizer step, a
`load_file`, max-norm, `p.data = ...`) are refreshed by the next model forward; an eager branch also compares
the factor's `_version` and dtype and casts itself when they differ.  Under torch.compile the branch trusts the
pre-hook (dynamo cannot read `_version`); the casts are plain tensor attributes, so a new one each step does
not recompile (tests/networks/test_speed_levers.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)
_GROUP = re.compile(r"^(.*?\.\d+)(\.|$)")  # "blocks.3.self_attn.q_proj" → "blocks.3"


def group_key(module: Any) -> str:
    """The block a module belongs to: its path up to the first numeric component (its model's name first)."""
    found = _GROUP.match(module.path)
    return f"{module.model}:{found.group(1) if found else module.path.split('.')[0]}"


class _CastEntries(torch.autograd.Function):
    """Cast a list of fp32 entries (each one tensor, or tensors of one width stacked along rows) to `dtype` with
    one `cat`; backward: one `cat` of the present grads, cast back, split to each parameter."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, layout: tuple[int, ...],
                *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.shapes = layout, [p.shape for p in params]
        ctx.param_dtypes = [p.dtype for p in params]
        flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        torch.cat([p.reshape(-1) for p in params], out=flat)
        outs, offset, first = [], 0, 0
        for count in layout:
            members = params[first:first + count]
            rows, cols = sum(p.shape[0] for p in members), members[0].shape[1]
            outs.append(flat[offset:offset + rows * cols].view(rows, cols))
            offset, first = offset + rows * cols, first + count
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        present = [g for g in grads if g is not None]
        result: list[torch.Tensor | None] = [None] * len(ctx.shapes)
        if not present:
            return (None, None, *result)
        flat = torch.cat([g.reshape(-1) for g in present]).to(ctx.param_dtypes[0])
        offset, first = 0, 0
        for count, g in zip(ctx.layout, grads, strict=True):
            if g is not None:
                for i in range(first, first + count):
                    n = ctx.shapes[i].numel()
                    result[i] = flat[offset:offset + n].view(ctx.shapes[i])
                    offset += n
            first += count
        return (None, None, *result)


def compute_dtype(module: Any) -> torch.dtype | None:
    """The dtype the module's branch input will have: its Linear's (or an fp8 Linear's compute) dtype when that
    is half precision; None (nothing to cast) otherwise."""
    org = module._org[0]
    dtype = getattr(org, "compute_dtype", None) if org.weight.dtype not in (*HALF_DTYPES, torch.float32) \
        else org.weight.dtype
    return dtype if dtype in HALF_DTYPES else None


def _qkv_triples(modules: Sequence[Any]) -> list[tuple[Any, Any, Any]]:
    """(q, k, v) modules of one attention that all stack their down factors (same input width)."""
    by_path = {m.path: m for m in modules}
    triples = []
    for m in modules:
        if not m.path.endswith(".q_proj"):
            continue
        stem = m.path[: -len("q_proj")]
        k, v = by_path.get(stem + "k_proj"), by_path.get(stem + "v_proj")
        if k is not None and v is not None and all(x.stackable_down() is not None for x in (m, k, v)) \
                and m.in_features == k.in_features == v.in_features:
            triples.append((m, k, v))
    return triples


def cast_modules(modules: Sequence[Any], stack_qkv: bool) -> None:
    """Cast the factors of `modules` (one block), one `cat` per compute dtype; sets each module's casts."""
    by_dtype: dict[torch.dtype, list[Any]] = {}
    for m in modules:
        m.clear_cast()
        dtype = compute_dtype(m)
        if dtype is not None and m.cast_factors_once and m.cast_factors():
            by_dtype.setdefault(dtype, []).append(m)
    for dtype, members in by_dtype.items():
        if any(p.dtype != torch.float32 for m in members for p in m.cast_factors()):
            continue  # full_bf16: the factors already are half precision (nothing to cast)
        triples = _qkv_triples(members) if stack_qkv else []
        stacked = {id(m) for t in triples for m in t}
        entries: list[list[torch.Tensor]] = []
        for q, k, v in triples:
            entries.append([q.stackable_down(), k.stackable_down(), v.stackable_down()])
        owners: list[tuple[Any, int]] = []  # (module, index of its factor) per single entry
        for m in members:
            for i, p in enumerate(m.cast_factors()):
                if id(m) in stacked and i == 0:
                    continue
                entries.append([p])
                owners.append((m, i))
        params = [p for e in entries for p in e]
        outs = _CastEntries.apply(dtype, tuple(len(e) for e in entries), *params)
        casts: dict[int, list[torch.Tensor | None]] = {id(m): [None] * len(m.cast_factors()) for m in members}
        for (q, k, v), out in zip(triples, outs[: len(triples)], strict=True):
            parts = out.split([q.dim, k.dim, v.dim])
            for m, part in zip((q, k, v), parts, strict=True):
                casts[id(m)][0] = part
            q.set_stacked_down(out, (q, k, v))
        for (m, i), out in zip(owners, outs[len(triples):], strict=True):
            casts[id(m)][i] = out
        for m in members:
            m.set_cast(tuple(casts[id(m)]))


class FactorCaster:
    """The pre-hooks that cast a network's factors once per forward of each model it adapts."""

    def __init__(self, groups: dict[str, list[Any]], stack_qkv: bool) -> None:
        self.groups, self.stack_qkv = groups, stack_qkv
        self.handles: list[Any] = []

    def hook(self, model: nn.Module, keys: list[str]) -> None:
        def pre_hook(module: nn.Module, args: Any, kwargs: Any = None) -> None:
            for key in keys:
                cast_modules(self.groups[key], self.stack_qkv)

        self.handles.append(model.register_forward_pre_hook(pre_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for members in self.groups.values():
            for m in members:
                m.clear_cast()
