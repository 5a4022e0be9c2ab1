"""Per-block `torch.compile` of the DiT: each `Block.forward` is compiled, not the whole model.

Why per block: the 28 blocks share one code object, so dynamo compiles a block once per input shape and the
other blocks reuse that graph (their weights are graph inputs); gradient checkpointing, block swap and
the embedding/final layer stay eager.  What gets fused is the elementwise work between the GEMMs (adaLN
modulation + LayerNorm, RMSNorm + RoPE, gates and residual adds, GELU); no hand-written kernels.

Shapes are static (`dynamic=False`): one graph per distinct (batch, token count) pair, i.e. per bucket
resolution, and a second one for the first block, whose input needs no gradient with the default targets.
Eval/no-grad calls (previews, validation) and blocks whose q/k/v are not packed (swapped blocks) add their
own graphs.  The dynamo cache limit is raised to fit
`max_shapes` such pairs for all those variants, so changing buckets never hits the limit (which would fall
back to eager silently).  A network must be injected BEFORE the first compiled call (the forward
patches of the Linears are traced into the graph; injecting or removing one later recompiles); changing a network's
multiplier also recompiles.  Non-reentrant checkpointing around a compiled block works as in eager.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from anima_trainer.config.rules import check_compile_mode
from anima_trainer.models.layers import QKNormAttentionBase

_log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")
# graphs per (batch, tokens) shape: block input with / without grad × training / eval-no-grad × q/k/v packed or
# not (block swap points swapped blocks' weights at separate copies, which runs the separate projections)
VARIANTS_PER_SHAPE = 8
MARGIN = 8


def image_tokens(width: int, height: int) -> int:
    """DiT tokens of a width×height pixel image: VAE /8, then 2×2 patches (16 px per token side)."""
    return (width // 16) * (height // 16)


def cache_limit_for(max_shapes: int) -> int:
    """Dynamo cache entries per block code object needed for `max_shapes` distinct input shapes."""
    return max_shapes * VARIANTS_PER_SHAPE + MARGIN


def _refresh_qkv_packing(attentions: list[QKNormAttentionBase]) -> Any:
    """Forward pre-hook (eager, before the compiled forward): the compiled graph reads `qkv_packed` instead of
    checking storage pointers itself (dynamo cannot trace them); a change recompiles once."""

    def hook(module: nn.Module, args: Any) -> None:
        for m in attentions:
            if m.fuse_qkv:
                m.check_qkv_packed()

    return hook


def compile_dit_blocks(dit: nn.Module, *, mode: str | None = "default", max_shapes: int = 8,
                       backend: str = "inductor", fullgraph: bool = False,
                       cache_size_limit: int | None = None) -> int:
    """Compile every `dit.blocks[i].forward` (static shapes); returns the number of blocks compiled.

    max_shapes: distinct (batch size, image token count) pairs the run will feed: `image_tokens(w, h)` per bucket
    of `dataset.bucket_table()`, ×2 where a bucket's last batch is smaller, plus preview/validation sizes.
    The dynamo cache limit becomes `cache_limit_for(max_shapes)` unless
    `cache_size_limit` is given (never lowered).  Call after the network is injected and the DiT is on
    its device; calling again recompiles from scratch.
    """
    mode = check_compile_mode(mode)
    if backend not in BACKENDS:
        raise ValueError(f"compile_backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "inductor" and mode != "default":
        raise ValueError(f"compile_mode: '{mode}' needs compile_backend = 'inductor' (got '{backend}')")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    blocks = getattr(dit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError("compile_dit_blocks: the model has no `blocks` ModuleList")
    uncompile_dit_blocks(dit)
    limit = max(cache_size_limit or cache_limit_for(max_shapes), 1)
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, limit)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, limit)
    options = {"backend": backend, "dynamic": False, "fullgraph": fullgraph}
    if mode != "default":
        options["mode"] = mode
    for block in blocks:
        attentions = [m for m in block.modules() if isinstance(m, QKNormAttentionBase)]
        block._anima_compile_hook = block.register_forward_pre_hook(_refresh_qkv_packing(attentions))
        block.forward = torch.compile(block.forward, **options)
    _log.info("torch.compile: %d DiT blocks (backend %s, mode %s, static shapes, dynamo cache limit %d for up to "
              "%d input shapes)", len(blocks), backend, mode, config.cache_size_limit, max_shapes)
    return len(blocks)


def uncompile_dit_blocks(dit: nn.Module) -> None:
    """Back to the eager `Block.forward` (compiled graphs are dropped with the wrappers)."""
    for block in getattr(dit, "blocks", ()):
        handle = block.__dict__.pop("_anima_compile_hook", None)
        if handle is not None:
            handle.remove()
            block.__dict__.pop("forward", None)


def is_compiled(dit: nn.Module) -> bool:
    return any("_anima_compile_hook" in block.__dict__ for block in getattr(dit, "blocks", ()))
