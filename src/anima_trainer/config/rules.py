"""Torch-free rules that config validation shares with the layers above it: accepted names (attention kernels,
compile modes), the boolean words of network_args, and what the diffusers layout cannot carry.

Why here: config is the lowest layer (it imports no torch and nothing above it), yet it must refuse these values
at start-up, before minutes of model loading; models/ and networks/ import the same rules from here, so a name
list or a message exists once."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

# --- attention kernels (models/attention_backend.py maps them onto torch's SDPBackend) -------------------------
ATTENTION_CHOICES = ("auto", "cudnn", "flash", "efficient", "math")
UNSUPPORTED_ATTENTION = {
    "xformers": "xformers is not supported: attention always runs on torch SDPA, whose flash / memory-efficient "
                "kernels cover what xformers offered; choose one with attention_backend",
    "sageattn": "SageAttention is inference-only (no backward) and not supported for training",
}


def check_backend_name(name: str) -> str:
    """The validated backend name (lower case); ValueError naming the choices (and why xformers is not one)."""
    key = str(name).strip().lower()
    if key in UNSUPPORTED_ATTENTION:
        raise ValueError(f"attention_backend: {UNSUPPORTED_ATTENTION[key]}")
    if key not in ATTENTION_CHOICES:
        raise ValueError(f"attention_backend: expected one of {', '.join(ATTENTION_CHOICES)}, got {name!r}")
    return key


# --- torch.compile modes of the per-block compile (models/compile.py) -------------------------------------------
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# CUDA-graph modes: each block and bucket would pin its own graph memory, and training mutates the inputs
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(mode: str | None) -> str:
    """The validated compile mode ("" and None: "default"); ValueError explaining the CUDA-graph modes."""
    mode = "default" if mode in (None, "") else str(mode)
    if mode in CUDAGRAPH_MODES:
        raise ValueError(f"compile_mode: '{mode}' uses CUDA graphs, which per-block training compile does not "
                         "support (each block and bucket would pin its own graph memory); use "
                         "'max-autotune-no-cudagraphs' (or 'default')")
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


# --- network_args booleans (networks/inject.py raises its NetworkError with the same words) ---------------------
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def bool_problem(name: str, value: Any) -> str | None:
    """The error message for a network_args value that is not a boolean word, or None when it is one."""
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS):
        return None
    return f"network_args {name} must be true or false (also 1/0, yes/no, on/off), got {value!r}"


def parse_bool(name: str, value: Any) -> bool:
    """true/false/1/0/yes/no/on/off in any case (or a bool); anything else is a ValueError."""
    if (problem := bool_problem(name, value)) is not None:
        raise ValueError(problem)
    return value if isinstance(value, bool) else value.strip().lower() in TRUE_WORDS


# --- key=value lists (kohya's network_args, optimizer_args, lr_scheduler_args) ---------------------------------
def kv_pairs(v: Any, key: str, literal: bool) -> Any:
    """["a=1", "b=x"] → {"a": "1", "b": "x"} (split at the first '='); with `literal`, values go through
    `ast.literal_eval` when they are Python literals (kohya's optimizer_args), else stay strings."""
    if isinstance(v, dict) or v is None:
        return {} if v is None else v
    if isinstance(v, str):
        v = v.split()
    if not isinstance(v, list | tuple):
        raise ValueError(f"expected a list of 'key=value' strings, got {v!r}")  # noqa: TRY004 (pydantic)
    out: dict[str, Any] = {}
    for item in v:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"item {item!r} is not of the form key=value")
        k, val = (s.strip() for s in item.split("=", 1))
        if k in out:
            raise ValueError(f"key {k!r} is given twice")
        if literal:
            try:
                val = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                pass
        out[k] = val
    return out


# --- what diffusers' Anima LoRA layout cannot carry (networks/diffusers_format.py writes the layout) -------------
DIFFUSERS_LOADER = "diffusers' Anima loader (AnimaLoraLoaderMixin)"
DIFFUSERS_ALTERNATIVE = 'save_format = "comfy" (ComfyUI; convert-network --to kohya for kohya) carries it'


def diffusers_refusal(algo: str, network_args: Mapping[str, Any] | None = None, *, text_encoder: bool = False,
                      option: str = 'save_format = "diffusers"') -> str | None:
    """The refusal message when a network of this kind cannot be written in diffusers' layout (LoKr/LoHa, DoRA,
    norm gains, text-encoder modules), else None; ValueError for a network_args boolean that is not one."""
    args = network_args or {}
    what = []
    if algo in ("lokr", "loha"):
        what.append(f"network_module {algo} ({DIFFUSERS_LOADER} reads only LoRA lora_A/lora_B keys)")
    elif algo != "lora":
        what.append(f"network_module {algo}")
    if parse_bool("dora_wd", args.get("dora_wd", False)):
        what.append("network_args dora_wd (DoRA: diffusers drops dora_scale, which changes the result)")
    if parse_bool("train_norm", args.get("train_norm", False)):
        what.append("train_norm (norm-gain diffs have no LoRA key in diffusers' layout; sd-scripts-anima turns it "
                    "on by default: set train_norm = false)")
    if text_encoder:
        what.append(f"text-encoder modules ({DIFFUSERS_LOADER} has no Qwen3 text encoder; train with "
                    "network_train_unet_only = true)")
    return f"{option}: cannot carry {'; '.join(what)}; {DIFFUSERS_ALTERNATIVE}" if what else None
