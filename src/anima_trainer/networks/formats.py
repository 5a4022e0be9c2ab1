"""Adapter file names and math exactly as ComfyUI reads them for Anima (docs: comfyui_formats.md).

* `comfy_key_map(dit, text_encoder=None)`: every accepted adapter-name prefix → DiT parameter name (§2), and
  with the Qwen3 text encoder ComfyUI's CLIP names `text_encoders.qwen3_06b.transformer.model.<module>` →
  `text_encoder.<Qwen3 parameter>`.
* `check_comfy_keys(keys, dit, text_encoder=None)`: the save-time check that ComfyUI would load every key of a
  file (kohya's `lora_te_*` text-encoder names are checked against the Qwen3 module tree instead: ComfyUI
  skips them, `comfy_skipped_keys` lists them).
* `apply_network_file(dit, path, multiplier)`: merge a LoRA / LoHa / LoKr / diff / set_weight file into the
  DiT weights for inference, computed in fp32 and cast back to each weight's dtype (§3, §4);
  `apply_text_encoder_file(qwen3, path, multiplier)` does the same for the file's text-encoder keys.

Text encoder (Qwen3-0.6B): ComfyUI's `model_lora_keys_clip` maps, for every `.weight` of the CLIP model's state
dict (Anima: `qwen3_06b.transformer.model.<HF Qwen3Model path>`), the generic name `text_encoders.<key without
.weight>`; it has no `lora_te_*` names for this encoder (only CLIP-L/G/H, T5, HunyuanDiT's BERT), so kohya's
`lora_te_<path with _>` text-encoder keys are skipped by ComfyUI ("lora key not loaded").

The rules are re-implemented from the notes, not borrowed: ComfyUI walks its key map in insertion order and a
later name for the same weight replaces an earlier patch (so `diffusion_model.M` beats `lora_unet_M`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from anima_trainer.models.model_files import ModelFileError, read_header

COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
TE_COMFY_PREFIX = "text_encoders.qwen3_06b.transformer.model."  # ComfyUI's generic CLIP name for Anima's Qwen3
KOHYA_TE_PREFIX = "lora_te_"  # kohya's lora_anima text-encoder names (not mapped by ComfyUI for Qwen3)
TE_NAME_PREFIX = "text_encoder."  # network-level names of text-encoder modules (and PEFT/diffusers-style keys)
TE_KEY_PREFIXES = (TE_COMFY_PREFIX, KOHYA_TE_PREFIX, TE_NAME_PREFIX, "text_encoders.")

# (up suffix, down suffix, mid suffix or None) in ComfyUI's order: the first present up key wins.
LORA_SPELLINGS = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)
LOHA_SUFFIXES = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")
LOKR_SUFFIXES = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
OTHER_SUFFIXES = (".alpha", ".dora_scale", ".reshape_weight", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight")
ALL_SUFFIXES = tuple(sorted({s for spelling in LORA_SPELLINGS for s in spelling if s}
                            | set(LOHA_SUFFIXES) | set(LOKR_SUFFIXES) | set(OTHER_SUFFIXES), key=len, reverse=True))


class NetworkError(ValueError):
    """A network file or network setup that cannot work; the message names the key/module and the fix."""


def alpha_value(t: torch.Tensor, key: str) -> float:
    """The number stored as a module's `.alpha` (a scalar or a one-element tensor).  Anything bigger (a matrix)
    is a NetworkError naming the key, not torch's "cannot be converted to Scalar" traceback."""
    if t.numel() != 1:
        raise NetworkError(f"{key}: alpha must be one number, but it is a tensor of shape {list(t.shape)} (a "
                           "damaged or hand-edited file; re-export it from the trainer that made it)")
    return float(t)


def check_network_file(path: str | Path) -> None:
    """NetworkError saying why an existing `path` is not a readable safetensors file (a folder, a pipe, no read
    permission, truncated, a bad header), from its header alone; a missing file is left to the reader."""

    if Path(path).exists():
        try:
            read_header(path)
        except ModelFileError as e:
            raise NetworkError(f"network file {e}") from None


def comfy_key_map(dit: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, str]:
    """Accepted adapter-name prefix → DiT parameter name, in ComfyUI's insertion order.

    For `M.weight` (any rank, norm gains included): `lora_unet_<M with _>` then `diffusion_model.M`;
    for any other tensor `P` (biases): `diffusion_model.P`.  With `text_encoder` (a transformers Qwen3Model),
    also ComfyUI's CLIP map: `text_encoders.qwen3_06b.transformer.model.M` → `text_encoder.M.weight` (the
    network-level name of the Qwen3 parameter; `te_comfy_key_map` gives the bare Qwen3 names).
    """
    out: dict[str, str] = {}
    for name in dit.state_dict(keep_vars=True):
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            out[KOHYA_PREFIX + module.replace(".", "_")] = name
            out[COMFY_PREFIX + module] = name
        else:
            out[COMFY_PREFIX + name] = name
    if text_encoder is not None:
        out.update({k: TE_NAME_PREFIX + v for k, v in te_comfy_key_map(text_encoder).items()})
    return out


def te_comfy_key_map(text_encoder: nn.Module) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_clip` for Anima's Qwen3: `text_encoders.qwen3_06b.transformer.model.M` →
    the Qwen3Model parameter `M.weight`, for every `.weight` (only weights: ComfyUI's CLIP map has no bias
    names)."""
    return {TE_COMFY_PREFIX + name[: -len(".weight")]: name for name in text_encoder.state_dict(keep_vars=True)
            if name.endswith(".weight")}


def kohya_te_key_map(text_encoder: nn.Module) -> dict[str, str]:
    """kohya's text-encoder names `lora_te_<M with _>` → the Qwen3Model parameter `M.weight` (every weight)."""
    return {KOHYA_TE_PREFIX + name[: -len(".weight")].replace(".", "_"): name
            for name in text_encoder.state_dict(keep_vars=True) if name.endswith(".weight")}


def is_text_encoder_key(key: str) -> bool:
    """Whether an adapter key names a text-encoder module in any naming we know (ComfyUI, kohya, PEFT)."""
    return key.startswith(TE_KEY_PREFIXES)


def comfy_skipped_keys(keys: Iterable[str] | str | Path) -> list[str]:
    """The keys ComfyUI (commit 41444b5) does not load for Anima although they are valid kohya names: kohya's
    `lora_te_*` text-encoder keys (its CLIP map has no `lora_te_` names for Qwen3).  A file with them loads its
    DiT part only; `convert-network --to comfy` (or save_format="comfy") gives ComfyUI-loadable TE names."""
    if isinstance(keys, (str, Path)):
        with safe_open(str(keys), "pt") as f:
            keys = list(f.keys())
    return sorted(k for k in keys if k.startswith(KOHYA_TE_PREFIX))


def split_key(key: str, key_map: dict[str, str]) -> tuple[str, str] | None:
    """(accepted prefix, suffix) of an adapter key, or None when ComfyUI would not map it."""
    for suffix in ALL_SUFFIXES:
        if key.endswith(suffix) and key[: -len(suffix)] in key_map:
            return key[: -len(suffix)], suffix
    return None


def unmatched_keys(keys: Iterable[str], dit: nn.Module, text_encoder: nn.Module | None = None) -> list[str]:
    """Keys whose name does not map onto a model parameter under ComfyUI's rules; kohya's `lora_te_*` keys are
    matched against kohya's names for `text_encoder` instead (ComfyUI skips them: `comfy_skipped_keys`)."""
    key_map = comfy_key_map(dit, text_encoder)
    te_kohya = kohya_te_key_map(text_encoder) if text_encoder is not None else {}
    return sorted(k for k in keys if split_key(k, key_map) is None and split_key(k, te_kohya) is None)


def check_comfy_keys(keys: Iterable[str] | str | Path, dit: nn.Module, text_encoder: nn.Module | None = None) -> None:
    """Raise NetworkError listing every key (of a list or a .safetensors file) that ComfyUI would not load.

    Text-encoder keys need `text_encoder` (the Qwen3Model, or one built on meta: convert.build_meta_qwen3):
    ComfyUI names (`text_encoders.qwen3_06b.transformer.model.<module>.<suffix>`) must map under ComfyUI's CLIP
    map; kohya's `lora_te_<module_>` names must name a Qwen3 weight (ComfyUI skips them; not an error here)."""
    if isinstance(keys, (str, Path)):
        with safe_open(str(keys), "pt") as f:
            keys = list(f.keys())
    keys = list(keys)
    bad = unmatched_keys(keys, dit, text_encoder)
    if bad:
        te = [k for k in bad if is_text_encoder_key(k)]
        hint = ""
        if te and text_encoder is None:
            hint = (f"; {len(te)} of them are text-encoder keys, checked only against a Qwen3 text encoder "
                    "(none was given)")
        elif te:
            hint = (f"; text-encoder keys are '{TE_COMFY_PREFIX}<module path>.<suffix>' (or kohya's "
                    f"'{KOHYA_TE_PREFIX}<module_path>.<suffix>') for a module of this Qwen3")
        raise NetworkError(f"{len(bad)} key(s) would not be loaded by ComfyUI (expected "
                           f"'{COMFY_PREFIX}<module path>.<suffix>' or '{KOHYA_PREFIX}<module_path>.<suffix>' for a "
                           f"module of this DiT{hint}): {bad[:10]}{' ...' if len(bad) > 10 else ''}")


# ---------------------------------------------------------------------------------------------- loading --

def parse_patches(sd: dict[str, torch.Tensor], key_map: dict[str, str],
                  source: str | Path | None = None) -> tuple[dict[str, tuple], set[str]]:
    """ComfyUI's `load_lora`: {DiT tensor name: patch} and the set of keys it counts as loaded.  `source` (the
    file) is named in errors."""
    patches: dict[str, tuple] = {}
    loaded: set[str] = set()

    def get(name: str) -> torch.Tensor | None:
        if name in sd:
            loaded.add(name)
            return sd[name]
        return None

    for x, target in key_map.items():
        alpha = get(x + ".alpha")
        alpha = alpha_value(alpha, f"{source}: {x}.alpha" if source else f"{x}.alpha") if alpha is not None else None
        dora = get(x + ".dora_scale")
        for up_s, down_s, mid_s in LORA_SPELLINGS:  # LoRA: the up key decides
            if x + up_s in sd and x + down_s in sd:
                mid = get(x + mid_s) if mid_s else None
                reshape = get(x + ".reshape_weight")
                patches[target] = ("lora", get(x + up_s), get(x + down_s), alpha, mid, dora, reshape)
                break
        if x + ".hada_w1_a" in sd:
            w = [get(x + s) for s in LOHA_SUFFIXES]
            patches[target] = ("loha", *w, alpha, dora)
        if any(x + s in sd for s in (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a")):
            w = [get(x + s) for s in LOKR_SUFFIXES]
            patches[target] = ("lokr", *w, alpha, dora)
        bias = target[: -len(".weight")] + ".bias"  # ComfyUI strips 7 characters whatever the name
        w_norm = get(x + ".w_norm")
        if w_norm is not None:
            patches[target] = ("diff", w_norm)
            b_norm = get(x + ".b_norm")
            if b_norm is not None:
                patches[bias] = ("diff", b_norm)
        diff = get(x + ".diff")
        if diff is not None:
            patches[target] = ("diff", diff)
        diff_b = get(x + ".diff_b")
        if diff_b is not None:
            patches[bias] = ("diff", diff_b)
        set_weight = get(x + ".set_weight")
        if set_weight is not None:
            patches[target] = ("set", set_weight)
    return patches, loaded


def _f32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.float32)


def _decompose(w0: torch.Tensor, merged: torch.Tensor, dora: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI's DoRA weight_decompose on fp32 tensors; `merged` = W + scale·ΔW."""
    eps = torch.finfo(torch.float32).eps
    if dora.shape[0] == w0.shape[0]:  # output axis: norm of the original W's rows
        norm = w0.reshape(w0.shape[0], -1).norm(dim=1, keepdim=True).reshape(w0.shape[0], *[1] * (w0.dim() - 1))
    else:  # input axis: norm of the merged weight's columns
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    new = merged * (dora / (norm + eps))
    return new if strength == 1.0 else w0 + strength * (new - w0)


def delta_weight(patch: tuple, w: torch.Tensor, strength: float) -> torch.Tensor:
    """New fp32 weight for one patch on the fp32 weight `w` (ComfyUI's calculate_weight)."""
    kind, dev = patch[0], w.device
    if kind == "set":
        return patch[1].to(device=dev, dtype=torch.float32).clone()
    if kind == "diff":
        d = patch[1]
        if tuple(d.shape) != tuple(w.shape):
            raise NetworkError(f"shape mismatch: diff {tuple(d.shape)} vs weight {tuple(w.shape)}")
        return w + strength * d.to(device=dev, dtype=torch.float32)
    if kind == "lora":
        up, down, alpha, mid, dora, reshape = (_f32(t, dev) if isinstance(t, torch.Tensor) else t for t in patch[1:])
        if reshape is not None:
            raise NetworkError("reshape_weight is not supported for Anima")
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        if mid is not None:  # Tucker / LoCon conv: fold the mid core into down
            final_shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(start_dim=1), mid.transpose(0, 1).flatten(start_dim=1))
            down = down.reshape(final_shape).transpose(0, 1)
        diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(w.shape)
    elif kind == "loha":
        w1a, w1b, w2a, w2b, t1, t2, alpha, dora = (_f32(t, dev) if isinstance(t, torch.Tensor) else t
                                                   for t in patch[1:])
        if t1 is not None:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        else:
            m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        diff = (m1 * m2).reshape(w.shape)
    elif kind == "lokr":
        w1, w2, w1a, w1b, w2a, w2b, t2, alpha, dora = (_f32(t, dev) if isinstance(t, torch.Tensor) else t
                                                       for t in patch[1:])
        dim = None
        if w1 is None:
            dim, w1 = w1b.shape[0], torch.mm(w1a, w1b)
        if w2 is None:
            dim = w2b.shape[0]
            w2 = (torch.mm(w2a, w2b) if t2 is None else
                  torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a))
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0  # both full: alpha ignored
        diff = torch.kron(w1, w2).reshape(w.shape)
    else:
        raise NetworkError(f"unknown patch kind {kind!r}")
    if dora is not None:
        return _decompose(w, w + scale * diff, dora, strength)
    return w + (strength * scale) * diff


def _read_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise NetworkError(f"network file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as e:  # any parse failure means a bad file
        raise NetworkError(f"{path} is not a readable .safetensors file: {e}") from e


@torch.no_grad()
def apply_patches(model: nn.Module, sd: dict[str, torch.Tensor], key_map: dict[str, str], multiplier: float,
                  source: str | Path | None = None) -> dict:
    """ComfyUI's load_lora + calculate_weight of `sd` on `model` under `key_map` (see apply_network_file)."""
    patches, loaded = parse_patches(sd, key_map, source=source)
    params = model.state_dict(keep_vars=True)
    report: dict = {"patched": [], "not_loaded": sorted(set(sd) - loaded), "not_in_model": [], "errors": {}}
    for name, patch in patches.items():
        if name not in params:
            report["not_in_model"].append(name)
            continue
        p = params[name]
        try:
            new = delta_weight(patch, p.detach().float(), float(multiplier))
        except (NetworkError, RuntimeError) as e:
            report["errors"][name] = str(e)
            continue
        p.data.copy_(new.to(p.dtype))
        report["patched"].append(name)
    report["patched"].sort()
    return report


def apply_network_file(dit: nn.Module, path: str | Path, multiplier: float = 1.0) -> dict:
    """Merge an adapter file into the DiT's weights for inference, as ComfyUI's LoraLoaderModelOnly does.

    Returns {"patched": [DiT tensor names], "not_loaded": [file keys ComfyUI ignores for the DiT, text-encoder
    keys included], "not_in_model": [patch targets the DiT lacks, e.g. norm biases], "errors": {tensor: message}}.
    A patch that cannot be applied (wrong shape) leaves its weight unchanged and is listed in "errors".
    """
    return apply_patches(dit, _read_file(path), comfy_key_map(dit), multiplier, source=Path(path))


def apply_text_encoder_file(text_encoder: nn.Module, path: str | Path, multiplier: float = 1.0,
                            kohya_names: bool = True) -> dict:
    """Merge the text-encoder part of an adapter file into a Qwen3Model's weights with ComfyUI's math (the CLIP
    side of LoraLoader): ComfyUI's names `text_encoders.qwen3_06b.transformer.model.*`, and with `kohya_names`
    (default) kohya's `lora_te_*` too — ComfyUI itself skips those, kohya's converter renames them first.
    The report is as apply_network_file's, with Qwen3 parameter names; DiT keys are in "not_loaded"."""
    key_map = {**(kohya_te_key_map(text_encoder) if kohya_names else {}), **te_comfy_key_map(text_encoder)}
    return apply_patches(text_encoder, _read_file(path), key_map, multiplier, source=Path(path))
