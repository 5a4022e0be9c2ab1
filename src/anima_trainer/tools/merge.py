"""`anima-trainer merge`: adapter files baked into a DiT checkpoint and, with `--qwen3`, into a Qwen3 file.

* `merge_networks(base, networks, out)`: ComfyUI's application math (`apply_network_file`) baked into the DiT
  checkpoint, written with the input's key layout and dtypes.
* `merge_text_encoder(qwen3, networks, out)`: the text-encoder part — ComfyUI's math
  (formats.apply_text_encoder_file: fp32, cast back to each weight's dtype) on the Qwen3 loaded from a single
  file or an Anima bundle; the output keeps the input's key layout, other tensors and per-tensor dtypes (as
  merge_networks does for the DiT).  Text-encoder keys in ComfyUI (`text_encoders.qwen3_06b.
  transformer.model.*`), kohya (`lora_te_*`) or PEFT (`text_encoder.*`) naming are all read.

Training's own merge (kohya's `base_weights`, into the loaded DiT before the network is injected) is
networks/merge.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from anima_trainer.dtypes import FLOAT_FILE_DTYPES, dominant_float_dtype
from anima_trainer.fileio import check_writable
from anima_trainer.tensor_files import atomic_save
from anima_trainer.models.model_files import QUANT_METADATA, expect_kind, quant_plan, read_header
from anima_trainer.models.dit import load_dit
from anima_trainer.models.text import QWEN_FLAG, weight_sources, load_qwen3
from anima_trainer.networks.convert import (
    ModuleTable,
    check_finite_network,
    comfy_named_file,
    convert_state_dict,
    read_network,
)
from anima_trainer.networks.formats import (
    NetworkError,
    apply_network_file,
    apply_patches,
    is_text_encoder_key,
    te_comfy_key_map,
)



def merge_networks(base: str | Path, networks: list[tuple[str, float]], out: str | Path, *,
                   save_dtype: torch.dtype | None = None, overwrite: bool = False,
                   text_encoder_merged: bool = False) -> dict:
    """Bake networks into a DiT checkpoint with ComfyUI's math; same key layout, per-tensor dtype kept.

    The DiT is loaded once, in the checkpoint's dominant floating dtype (ComfyUI patches in fp32 and rounds to
    the weight dtype); tensors that are not DiT weights (other bundle parts, ignored buffers) are copied as is.
    A network with text-encoder keys is an error unless `text_encoder_merged` (the caller bakes them into a
    Qwen3 file too: merge_text_encoder); a DiT checkpoint cannot hold them.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise NetworkError(f"{out}: the merged checkpoint is written as .safetensors")
    check_writable(out, overwrite)
    if not networks:
        raise NetworkError("merge needs at least one --network")
    for f, mul in networks:
        expect_kind(f, "--network", ("network",))
        if not math.isfinite(mul):
            raise NetworkError(f"--network {f}: the multiplier {mul} is not a finite number")
        sd = read_network(f)[0]
        check_finite_network(sd, f)
        te_keys = sorted(k for k in sd if is_text_encoder_key(k))
        if te_keys and not text_encoder_merged:
            raise NetworkError(f"--network {f}: {len(te_keys)} text-encoder key(s) (e.g. {te_keys[0]}) cannot be "
                               "baked into a DiT checkpoint; add --qwen3 QWEN3_FILE --qwen3-out OUT to bake them "
                               "into the text encoder too, nothing written")
    if Path(base).is_dir():
        raise NetworkError(f"--dit {base}: merge writes the merged DiT in the base file's own layout and needs a "
                           "single .safetensors DiT file (a diffusers-layout folder is read for training, not "
                           "rewritten); pass the single-file DiT")
    info = expect_kind(base, "--dit", ("anima_dit", "anima_bundle"))
    prefix = info.components.get("dit", info.prefix)
    header, meta = read_header(base)
    # a scaled-fp8 base is merged dequantised: its scales and quantisation bookkeeping would make ComfyUI scale
    # the merged (already dequantised) weights a second time, so they are not copied
    plan = quant_plan(Path(base), header, meta, prefix)
    dropped = set(plan.scales.values()) | plan.skipped
    load_dtype = dominant_float_dtype(dt for dt, _ in header.values())
    dit = load_dit(base, dtype=load_dtype, flag="--dit")
    reports = {}
    for f, mul in networks:
        with comfy_named_file(f, dit) as comfy:  # diffusers' layout: read under ComfyUI names
            report = apply_network_file(dit, comfy, multiplier=mul)
        if report["errors"]:
            raise NetworkError(f"{f}: {len(report['errors'])} patch(es) cannot be applied, nothing written: "
                               f"{dict(list(report['errors'].items())[:3])}")
        reports[f] = report
    state = dit.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(base), "pt") as fh:
        for key, (dt, _) in header.items():
            if key in dropped:
                continue
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and name in state:
                t = state[name]
                target = save_dtype or FLOAT_FILE_DTYPES.get(dt, t.dtype)
                tensors[key] = t.to(target).contiguous()
            else:
                tensors[key] = fh.get_tensor(key)
    meta = {k: v for k, v in meta.items() if k != QUANT_METADATA}
    meta["anima_trainer_merged_networks"] = json.dumps([[Path(f).name, m] for f, m in networks])
    check_writable(out, overwrite)
    atomic_save(tensors, out, meta, what="merged checkpoint ")  # refuses NaN/Inf (e.g. fp16 overflow)
    not_loaded = {f: [k for k in r["not_loaded"] if not (text_encoder_merged and is_text_encoder_key(k))]
                  for f, r in reports.items()}
    return {"written": str(out), "networks": {f: len(r["patched"]) for f, r in reports.items()},
            "not_loaded": {f: keys for f, keys in not_loaded.items() if keys}}


def text_encoder_state(path: str | Path, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's text-encoder tensors renamed to ComfyUI's CLIP names (any naming read)."""
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
    out = Path(out)
    if out.suffix != ".safetensors":
        raise NetworkError(f"{out}: the merged text encoder is written as .safetensors")
    check_writable(out, overwrite)
    if Path(qwen3).resolve() == out.resolve():
        raise NetworkError(f"{out}: output and input are the same file; choose another output name")
    sources, _ = weight_sources(Path(qwen3))
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
