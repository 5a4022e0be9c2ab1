"""ComfyUI's scaled-fp8 file layout, written from a state dict, and the error bound float8 rounding allows.

Shared by the hardening tests (tests/badinput) and the base-model layout tests (tests/models)."""

from __future__ import annotations

import json

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn


def quantise(state: dict[str, torch.Tensor], style: str) -> tuple[dict[str, torch.Tensor], dict | None, list[str]]:
    """ComfyUI's scaled-fp8 form of `state`: every matrix (or conv kernel) weight becomes float8_e4m3fn with one
    per-tensor scale = amax / 448; `style` picks which of ComfyUI's spellings carries the scale."""
    out, layers, quantised = dict(state), {}, []
    for key, w in state.items():
        if not key.endswith(".weight") or w.dim() < 2 or not w.is_floating_point():
            continue
        layer = key[:-len(".weight")]
        scale = (w.abs().max().float() / FP8_MAX).reshape(())
        out[key] = (w.float() / scale).to(torch.float8_e4m3fn)
        quantised.append(key)
        if style == "old":  # scale_weight + scale_input + the top-level scaled_fp8 marker
            out[f"{layer}.scale_weight"] = scale
            out[f"{layer}.scale_input"] = torch.ones(())
        else:
            out[f"{layer}.weight_scale"] = scale
            out[f"{layer}.input_scale"] = torch.full((), 0.25)
            if style == "comfy_quant":
                out[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            layers[layer] = {"format": "float8_e4m3fn"}
    if style == "old":
        prefix = quantised[0].split(".", 1)[0] + "." if quantised[0].startswith("net.") else ""
        out[prefix + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    meta = {"_quantization_metadata": json.dumps({"layers": layers})} if style == "metadata" else None
    return out, meta, quantised


def within_fp8(loaded: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """How far each element is from the original, in units of the worst error e4m3 rounding can make (3 mantissa
    bits: half a step is |v|/16 for normal numbers, scale * 2^-10 in the subnormal range); <= 1 means correct."""
    scale = original.abs().max().float() / FP8_MAX
    bound = original.float().abs() / 16 + scale * 2.0 ** -10 + 1e-12
    return ((loaded.float() - original.float()).abs() / bound).max()
