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

import importlib.util
import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
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


# --- compile_blocks = "auto": where compiling is the default ---------------------------------------------------------
AUTO_MIN_CAPABILITY = (8, 0)  # the cards the compiled step was measured on (bench/README.md: H100/H200, sm90)


@dataclass(frozen=True)
class CompileDecision:
    """Whether the DiT blocks are compiled, and why (the reason is logged when "auto" picks eager on a CUDA card)."""

    compiled: bool
    reason: str


def resolve_compile_blocks(setting: bool | str, *, device_type: str, capability: tuple[int, int] | None = None,
                           triton_available: bool = False, backend: str = "inductor",
                           checkpoint_mode: str = "full", blocks_to_swap: int = 0,
                           fp8_base: bool = False) -> CompileDecision:
    """compile_blocks → compiled or eager.  true/false are honoured as given; "auto" compiles only where the
    compiled step is measured to be faster and to work: CUDA with compute capability >= 8.0, triton importable
    (inductor generates Triton kernels on CUDA; Windows installs often lack it) and none of the levers that fail
    under compile (selective checkpointing: torch errors in the backward) or were not measured with it (block swap,
    fp8_base).  A pure function of its arguments: `compile_decision` reads them from the machine."""
    if setting is True or setting is False:
        return CompileDecision(setting, f"compile_blocks = {str(setting).lower()}")
    if setting != "auto":
        raise ValueError(f"compile_blocks: expected true, false or 'auto', got {setting!r}")
    if device_type != "cuda":
        return CompileDecision(False, f"compile_blocks = auto compiles on CUDA only; {device_type} runs eager")
    if capability is None or tuple(capability) < AUTO_MIN_CAPABILITY:
        shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return CompileDecision(False, f"compile_blocks = auto: eager on this card (compute capability {shown} < 8.0, "
                                      "where compile is not measured); compile_blocks = true compiles anyway")
    if backend == "inductor" and not triton_available:
        return CompileDecision(False, "compile_blocks = auto: eager because triton is not installed (inductor needs "
                                      "it on CUDA; on Windows: pip install triton-windows); compile_blocks = true "
                                      "with compile_backend = \"aot_eager\" compiles without it, but is not faster")
    if checkpoint_mode == "selective":
        return CompileDecision(False, "compile_blocks = auto: eager because checkpoint_mode = \"selective\" fails "
                                      "inside compiled blocks (torch errors in the backward); checkpoint_mode = "
                                      "\"full\" compiles and is faster (bench/README.md)")
    unmeasured = [name for name, on in (("blocks_to_swap", blocks_to_swap > 0), ("fp8_base", fp8_base)) if on]
    if unmeasured:
        return CompileDecision(False, f"compile_blocks = auto: eager because {' and '.join(unmeasured)} with "
                                      "compiled blocks is not measured yet; compile_blocks = true compiles anyway")
    return CompileDecision(True, f"compile_blocks = auto: compiled (CUDA compute capability "
                                 f"{capability[0]}.{capability[1]}, triton available)")


def triton_available() -> bool:
    """Whether triton can be imported (without importing it: it is slow and only inductor needs it)."""
    return importlib.util.find_spec("triton") is not None


def compile_decision(setting: bool | str, device: torch.device, **levers: Any) -> CompileDecision:
    """`resolve_compile_blocks` for this machine: the device's compute capability and whether triton is there;
    `levers`: backend, checkpoint_mode, blocks_to_swap, fp8_base."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return resolve_compile_blocks(setting, device_type=device.type, capability=capability,
                                  triton_available=triton_available(), **levers)


# --- the persistent compile cache ------------------------------------------------------------------------------------
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
CACHE_SWITCHES = ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


def default_compile_cache_dir(env: Mapping[str, str] | None = None, *, windows: bool | None = None) -> Path:
    """<user cache home>/anima-trainer/torch-compile: %LOCALAPPDATA% on Windows, else $XDG_CACHE_HOME or ~/.cache.
    Why not torch's default (a folder under the temp dir): it is emptied on reboot, so every run compiled again."""
    env = os.environ if env is None else env
    windows = os.name == "nt" if windows is None else windows
    if windows:
        base = Path(env["LOCALAPPDATA"]) if env.get("LOCALAPPDATA") else Path.home() / "AppData" / "Local"
    else:
        base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "anima-trainer" / "torch-compile"


def user_set_cache_dir(env: Mapping[str, str]) -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR names a folder of the user's.  Importing torch._dynamo writes torch's
    default (a folder in the temp dir) into the variable, so that value counts as unset, and so does "" (it would
    put the cache in the working directory)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = env.get(CACHE_ENV, "")
    return bool(value) and os.path.abspath(value) != os.path.abspath(default_cache_dir())


def configure_compile_cache(setting: str = "auto", env: MutableMapping[str, str] | None = None) -> str | None:
    """Turn on inductor's FX graph cache and the AOTAutograd cache in a persistent folder, so the second run loads
    the compiled blocks instead of compiling them again.  `setting` is compile_cache_dir: "auto" (the default
    folder), a path, or "" (leave torch's own settings alone).  Variables the user set win: TORCHINDUCTOR_CACHE_DIR
    when it names a folder of the user's (`user_set_cache_dir`), TORCHINDUCTOR_FX_GRAPH_CACHE and
    TORCHINDUCTOR_AUTOGRAD_CACHE (e.g. "0").  Call it only when compiling, before the first compiled call.  Returns
    the cache folder in use (None: torch's choice, not known yet)."""
    env = os.environ if env is None else env
    if not setting.strip():
        return env.get(CACHE_ENV) or None
    if not user_set_cache_dir(env):
        folder = default_compile_cache_dir(env) if setting.strip() == "auto" else Path(setting).expanduser()
        env[CACHE_ENV] = str(folder.absolute())
    for name in CACHE_SWITCHES:
        env.setdefault(name, "1")
    if env is os.environ:  # the config modules read these variables at import time, so set the values too
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = env[CACHE_SWITCHES[0]] == "1"
        functorch_config.enable_autograd_cache = env[CACHE_SWITCHES[1]] == "1"
    return env[CACHE_ENV]
