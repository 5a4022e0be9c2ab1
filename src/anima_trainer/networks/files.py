"""An adapter network's files: the tensors it writes, its metadata, the checked atomic save, the strict load.

Names (docs/formats.md):
* DiT modules: ComfyUI `diffusion_model.<path>.<suffix>` ("comfy", default) or kohya `lora_unet_<path_>`;
* text-encoder modules: ComfyUI's CLIP name `text_encoders.qwen3_06b.transformer.model.<path>.<suffix>`
  ("comfy") or kohya's `lora_te_<path_>` ("kohya": ComfyUI skips these, kohya's converter renames them);
* `.alpha` fp32 scalars, norm gains as `.w_norm` differences.
`load_weights` reads every naming (ComfyUI, kohya, PEFT/diffusers: networks/convert.py renames first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import anima_trainer
from anima_trainer.fileio import check_writable
from anima_trainer.tensor_files import NonFiniteError, atomic_save, nonfinite_tensors
from anima_trainer.networks.convert import read_comfy_named
from anima_trainer.networks.diffusers_format import diffusers_tensors, save_diffusers
from anima_trainer.networks.formats import (
    COMFY_PREFIX,
    KOHYA_PREFIX,
    KOHYA_TE_PREFIX,
    TE_COMFY_PREFIX,
    NetworkError,
    check_comfy_keys,
    check_network_file,
)
from anima_trainer.networks.hashes import with_hashes  # kohya's sshs_* hashes on every saved network

if TYPE_CHECKING:
    from anima_trainer.networks.base import AdapterNetwork

SAVE_FORMATS = ("comfy", "kohya", "diffusers")


def file_prefix(model: str, save_format: str) -> str:
    """The key prefix of a module of `model` ("dit" | "text_encoder") in `save_format`."""
    if model == "text_encoder":
        return TE_COMFY_PREFIX if save_format == "comfy" else KOHYA_TE_PREFIX
    return COMFY_PREFIX if save_format == "comfy" else KOHYA_PREFIX


def module_key(model: str, path: str, save_format: str = "comfy") -> str:
    """A module's key stem in a file: the prefix + the path (kohya: with `.` → `_`)."""
    prefix = file_prefix(model, save_format)
    return prefix + (path if save_format == "comfy" else path.replace(".", "_"))


def save_format_notice(network: AdapterNetwork, save_format: str) -> str | None:
    """The start-up notice for a save format some loader reads only partly (None when every part loads):
    kohya names with text-encoder modules — ComfyUI skips `lora_te_*` (formats.comfy_skipped_keys)."""
    if save_format == "kohya" and network.trains_text_encoder:
        return ("save_format=kohya with text-encoder modules: ComfyUI loads only the DiT part of these files (it has "
                "no lora_te_* names for Anima's Qwen3); use save_format=comfy or `anima-trainer convert-network "
                "FILE OUT --to comfy` for ComfyUI")
    return None


def state_tensors(network: AdapterNetwork, dtype: torch.dtype | None = None,
                  save_format: str = "comfy") -> dict[str, torch.Tensor]:
    """The tensors `save` writes: weights in `dtype` (default fp32), alpha fp32 (names: the module doc)."""
    if save_format not in SAVE_FORMATS:
        raise NetworkError(f"save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
    if save_format == "diffusers":  # diffusers' layout (scale folded into lora_B): networks/diffusers_format.py
        return diffusers_tensors(network, dtype)[0]
    dtype = dtype or torch.float32
    out = {}
    for m in network.lora_modules:
        key = module_key(m.model, m.path, save_format)
        for suffix, p in m.tensors().items():
            out[key + suffix] = p.detach().to("cpu", dtype).contiguous()
        out[key + ".alpha"] = m.alpha.detach().to("cpu", torch.float32).clone()
    for m in network.norm_modules:
        out[module_key("dit", m.path, save_format) + ".w_norm"] = (m.weight.detach() - m.base).to(
            "cpu", dtype).contiguous()
    return out


def metadata(network: AdapterNetwork, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The file's metadata: the caller's `extra` (str → str), then what describes this network's tensors."""
    meta = {}
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise NetworkError(f"metadata {k!r}: keys and values must be str (got {type(v).__name__}); "
                               "stringify numbers, json.dumps structures")
        meta[k] = v
    # dim/alpha describe this file and always win; module name and args may come from the caller
    meta.setdefault("ss_network_module", network.module_cls.NETWORK_MODULE)
    if network.network_args:
        meta.setdefault("ss_network_args", json.dumps(network.network_args, sort_keys=True))
    # kohya's resize_lora convention: "Dynamic" when the modules' ranks (alphas) differ
    dims = {m.dim for m in network.lora_modules}
    alphas = {float(m.alpha) for m in network.lora_modules}
    meta.update({"ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
                 "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
                 "anima_trainer_version": anima_trainer.__version__})
    return meta


def save(network: AdapterNetwork, path: str | Path, *, metadata_extra: dict[str, str] | None = None,
         dtype: torch.dtype | None = None, overwrite: bool = False, save_format: str = "comfy") -> Path:
    """See AdapterNetwork.save."""
    if save_format == "diffusers":  # its own layout and key check: networks/diffusers_format.py
        return save_diffusers(network, path, metadata=metadata_extra, dtype=dtype, overwrite=overwrite)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise NetworkError(f"{path}: network files are .safetensors")
    check_writable(path, overwrite)

    def check(tmp: Path) -> None:
        check_comfy_keys(tmp, network.dit, network.text_encoder)
        check_writable(path, overwrite)  # a file that appeared meanwhile is still not replaced unasked

    tensors = network.state_tensors(dtype, save_format)  # through the network: tests and subclasses hook these
    try:
        return atomic_save(tensors, path, with_hashes(tensors, network.metadata(metadata_extra)),
                           what="network file ", check=check)
    except NonFiniteError as e:
        if dtype not in (None, torch.float32) and not nonfinite_tensors(network.state_tensors(None, save_format)):
            name = str(dtype).removeprefix("torch.")
            raise NonFiniteError(f"{e} (finite in fp32, beyond {name}'s range: set save_precision to "
                                 "fp32 or bf16)") from None
        raise


def load_weights(network: AdapterNetwork, path: str | Path, *, fresh_missing_side: bool = False) -> list[str]:
    """See AdapterNetwork.load_weights."""
    path = Path(path)
    check_network_file(path)
    sd = read_comfy_named(path, network.dit, network.text_encoder, network_has_te=network.trains_text_encoder,
                          network_has_dit=network.trains_dit)
    names = {module_key(m.model, m.path): m.name for m in network.lora_modules}
    names.update({module_key("dit", p): p for p in network.norms_by_name})
    suffixes: dict[str, str] = {".alpha": ".alpha"}
    suffixes.update({s: s for s in network.module_cls.SUFFIXES})
    suffixes.update(network.module_cls.LOAD_ALIASES)
    norm_suffixes = {".w_norm": ".w_norm"}
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, tensor in sd.items():
        hit = None
        for s, canonical in sorted([*suffixes.items(), *norm_suffixes.items()], key=lambda t: -len(t[0])):
            prefix = key[: -len(s)]
            if key.endswith(s) and prefix in names:
                is_norm = names[prefix] in network.norms_by_name
                if is_norm == (s in norm_suffixes):
                    hit = (prefix, canonical)
                break
        if hit is None:
            unknown.append(key)
            continue
        slot = found.setdefault(names[hit[0]], {})
        if hit[1] in slot:
            raise NetworkError(f"{path}: module {names[hit[0]]} appears twice ({slot[hit[1]][0]} and {key})")
        slot[hit[1]] = (key, tensor)
    if unknown:
        raise NetworkError(f"{path}: {len(unknown)} key(s) are not {network.algo} weights of this network's modules "
                           f"(different targets, algorithm or train_norm?): {sorted(unknown)[:8]}")
    missing = [n for n, m in network.modules_by_name.items() if not set(m.SUFFIXES) & set(found.get(n, {}))]
    fresh: list[str] = []
    if missing and fresh_missing_side:  # a whole side absent from the file: that side starts as initialised
        for side in (network.text_encoder_modules(), network.dit_modules()):
            names_of_side = {m.name for m in side}
            if names_of_side and names_of_side <= set(missing) and not names_of_side & set(found):
                fresh.extend(m.name for m in side)
        missing = [n for n in missing if n not in fresh]
    if missing:
        words = "/".join(s.lstrip(".") for s in network.lora_modules[0].tensors())  # this layout's names
        te_missing = [n for n in missing if network.modules_by_name[n].model == "text_encoder"]
        hint = ""
        if te_missing and len(te_missing) == len(network.text_encoder_modules()):
            hint = (" (the file has no text-encoder modules: it was trained for the DiT only; load it into a "
                    "network without text-encoder modules, e.g. kohya's network_train_unet_only = true)")
        elif len(missing) - len(te_missing) == len(network.dit_modules()) and not te_missing:
            hint = (" (the file has no DiT modules: it was trained for the text encoder only; load it into a "
                    "network without DiT modules, e.g. kohya's network_train_text_encoder_only = true)")
        raise NetworkError(f"{path}: no {words} weights for {len(missing)} module(s) of this network: "
                           f"{missing[:8]}{hint}")
    missing = [p for p in network.norms_by_name if ".w_norm" not in found.get(p, {})]
    if missing:
        raise NetworkError(f"{path}: train_norm is on but the file has no .w_norm for {len(missing)} norm(s): "
                           f"{missing[:8]} (train without train_norm to load a file without norms)")
    loaded = {n: m for n, m in network.modules_by_name.items() if n not in fresh}
    for n, m in loaded.items():
        m.check_file(found[n], path, float(m.alpha))
    for p, m in network.norms_by_name.items():
        w = found[p][".w_norm"][1]
        if tuple(w.shape) != tuple(m.weight.shape):
            raise NetworkError(f"{path}: norm {p}: w_norm has shape {tuple(w.shape)}, the gain "
                               f"{tuple(m.weight.shape)}")
    with torch.no_grad():
        for n, m in loaded.items():
            m.load_file(found[n])
        for p, m in network.norms_by_name.items():
            m.weight.copy_(m.base + found[p][".w_norm"][1].to(device=m.base.device, dtype=torch.float32))
    return fresh

