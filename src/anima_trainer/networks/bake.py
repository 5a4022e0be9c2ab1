"""Bake the text-encoder part of adapter files into a Qwen3 checkpoint (the `merge` command's `--qwen3`).

ComfyUI's math (formats.apply_text_encoder_file: fp32, cast back to each weight's dtype) on the Qwen3 loaded
from a single file or an Anima bundle; the output keeps the input's key layout, other tensors and per-tensor
dtypes (as merge_networks does for the DiT).  Text-encoder keys in ComfyUI (`text_encoders.qwen3_06b.
transformer.model.*`), kohya (`lora_te_*`) or PEFT (`text_encoder.*`) naming are all read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from anima_trainer.dtypes import FLOAT_FILE_DTYPES, dominant_float_dtype
from anima_trainer.fileio import atomic_save, check_writable
from anima_trainer.networks.formats import NetworkError, apply_patches, te_comfy_key_map


def text_encoder_state(path: str | Path, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's text-encoder tensors renamed to ComfyUI's CLIP names (any naming read)."""
    from anima_trainer.networks.convert import ModuleTable, convert_state_dict, read_network
    from anima_trainer.networks.formats import is_text_encoder_key

    sd, meta = read_network(path)
    te = {k: v for k, v in sd.items() if is_text_encoder_key(k)}
    try:
        return convert_state_dict(te, meta, "comfy", ModuleTable.from_dit(torch.nn.Module(), text_encoder))[0]
    except NetworkError as e:
        raise NetworkError(f"{path}: {e}") from None


def merge_text_encoder(qwen3: str | Path, networks: list[tuple[str, float]], out: str | Path, *,
                       save_dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Bake every network's text-encoder modules into the Qwen3 file `qwen3`, written to `out`.

    Returns {"written": out, "networks": {file: Qwen3 weights patched}}.  A network without text-encoder keys
    patches nothing (reported as 0); a patch that does not fit (another text encoder) is an error, nothing
    written."""
    from anima_trainer.models.checkpoint import read_header
    from anima_trainer.models.text import QWEN_FLAG, _weight_sources, load_qwen3
    from anima_trainer.networks.convert import check_finite_network, read_network

    out = Path(out)
    if out.suffix != ".safetensors":
        raise NetworkError(f"{out}: the merged text encoder is written as .safetensors")
    check_writable(out, overwrite)
    if Path(qwen3).resolve() == out.resolve():
        raise NetworkError(f"{out}: output and input are the same file; choose another output name")
    sources, _ = _weight_sources(Path(qwen3))
    if len(sources) != 1 or Path(qwen3).is_dir():
        raise NetworkError(f"{QWEN_FLAG} {qwen3}: merging writes one file; give the single-file Qwen3 (or an "
                           "Anima bundle), not a Hugging Face folder")
    file, prefix = sources[0]
    header, meta = read_header(file)
    load_dtype = dominant_float_dtype(dt for key, (dt, _) in header.items() if key.startswith(prefix))
    model = load_qwen3(file, dtype=load_dtype)
    key_map = te_comfy_key_map(model)
    done = {}
    for f, mul in networks:
        if not math.isfinite(mul):
            raise NetworkError(f"--network {f}: the multiplier {mul} is not a finite number")
        check_finite_network(read_network(f)[0], f)
        sd = text_encoder_state(f, model)
        report = apply_patches(model, sd, key_map, mul, source=f)
        if report["errors"] or report["not_in_model"]:
            bad = {**report["errors"], **dict.fromkeys(report["not_in_model"], "not in this Qwen3")}
            raise NetworkError(f"{f}: {len(bad)} text-encoder patch(es) cannot be applied to {qwen3}, nothing "
                               f"written: {dict(list(bad.items())[:3])}")
        done[str(f)] = len(report["patched"])
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(file), "pt") as fh:
        for key, (dt, _) in header.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and name in state and dt in FLOAT_FILE_DTYPES:
                tensors[key] = state[name].to(save_dtype or FLOAT_FILE_DTYPES[dt]).contiguous()
            else:
                tensors[key] = fh.get_tensor(key)
    meta = dict(meta)
    meta["anima_trainer_merged_networks"] = json.dumps([[Path(f).name, m] for f, m in networks])
    check_writable(out, overwrite)
    atomic_save(tensors, out, meta, what="merged text encoder ")
    return {"written": str(out), "networks": done}
