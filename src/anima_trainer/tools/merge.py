"""`anima-trainer merge`: adapter files baked into a DiT checkpoint and, with `--qwen3`, into a Qwen3 file.

* `merge_networks(base, networks, out)`: ComfyUI's application math (`apply_network_file`) baked into the DiT
  checkpoint, written with the input's key layout and dtypes.
* `merge_text_encoder(qwen3, networks, out)`: the text-encoder part — ComfyUI's math
  (formats.apply_text_encoder_file: fp32, cast back to each weight's dtype) on the Qwen3 loaded from a single
  file or an Anima bundle; the output keeps the input's key layout, other tensors and per-tensor dtypes (as
  merge_networks does for the DiT).  Text-encoder keys in ComfyUI (`text_encoders.qwen3_06b.
  transformer.model.*`), kohya (`lora_te_*`) or PEFT (`text_encoder.*`) naming are all read.

* `average_networks(files, out, weights=None)`: `merge --average`, the checkpoint soup — the tensor-wise
  (weighted) mean of networks of one structure, written as a network file (not baked into a model).

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
from anima_trainer.models.dit_checkpoint import dit_layout, save_dit_checkpoint
from anima_trainer.models.model_files import expect_kind, read_header
from anima_trainer.models.dit import load_dit
from anima_trainer.models.text import QWEN_FLAG, weight_sources, load_qwen3
from anima_trainer.networks.convert import (
    LORA_AB_META,
    ModuleTable,
    check_finite_network,
    comfy_named_file,
    convert_state_dict,
    read_network,
)
from anima_trainer.networks.diffusers_format import ALPHAS_META
from anima_trainer.networks.formats import (
    NetworkError,
    apply_network_file,
    apply_patches,
    is_text_encoder_key,
    te_comfy_key_map,
)
from anima_trainer.networks.hashes import addnet_hash_safetensors, with_hashes



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
    layout = dit_layout(base, "--dit")
    load_dtype = dominant_float_dtype(layout.dtypes.values())
    dit = load_dit(base, dtype=load_dtype, flag="--dit")
    reports = {}
    for f, mul in networks:
        with comfy_named_file(f, dit) as comfy:  # diffusers' layout: read under ComfyUI names
            report = apply_network_file(dit, comfy, multiplier=mul)
        if report["errors"]:
            raise NetworkError(f"{f}: {len(report['errors'])} patch(es) cannot be applied, nothing written: "
                               f"{dict(list(report['errors'].items())[:3])}")
        reports[f] = report
    check_writable(out, overwrite)
    # the base file's layout with the merged DiT tensors (models/dit_checkpoint.py, shared with fine-tune saves);
    # refuses NaN/Inf (e.g. fp16 overflow)
    save_dit_checkpoint(layout, dit.state_dict(), out, save_dtype=save_dtype, what="merged checkpoint ",
                        metadata={"anima_trainer_merged_networks": json.dumps([[Path(f).name, m]
                                                                                for f, m in networks])})
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


# ------------------------------------------------------------------------------------- checkpoint soup --

SOUP_META = "anima_trainer_soup"
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora_A", ".lora_A.default.weight", ".hada_w1_b",
                  ".hada_w2_b", ".lokr_w1_b", ".lokr_w2_b")
_UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight", ".lora_B", ".lora_B.default.weight", ".hada_w1_a",
                ".hada_w2_a", ".lokr_w1_a", ".lokr_w2_a")
# metadata that changes what the same tensors mean: the algorithm, diffusers' folded alphas, kohya/PEFT spellings
_STRUCTURE_META = ("ss_network_module", ALPHAS_META, LORA_AB_META)


def _first_difference(a: dict[str, torch.Tensor], ma: dict[str, str], b: dict[str, torch.Tensor],
                      mb: dict[str, str]) -> str | None:
    """What first makes network b a different structure from network a (keys, shapes/ranks, alphas, algorithm),
    or None when the two can be averaged tensor by tensor."""
    for key in _STRUCTURE_META:
        if ma.get(key) != mb.get(key):
            what = "algorithm (ss_network_module)" if key == "ss_network_module" else f"metadata {key}"
            return f"{what}: {ma.get(key)!r} vs {mb.get(key)!r}"
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        first = min(only_a + only_b)
        side = "the first file only" if first in a else "this file only"
        return f"key {first} is in {side} ({len(only_a)} key(s) only in the first, {len(only_b)} only in this one)"
    for key in sorted(a):
        ta, tb = a[key], b[key]
        if ta.shape != tb.shape:
            axis = 0 if key.endswith(_DOWN_SUFFIXES) else 1 if key.endswith(_UP_SUFFIXES) else None
            if axis is not None and ta.dim() > axis and tb.dim() > axis and ta.shape[axis] != tb.shape[axis]:
                return f"{key}: rank {ta.shape[axis]} vs {tb.shape[axis]} (shape {list(ta.shape)} vs {list(tb.shape)})"
            return f"{key}: shape {list(ta.shape)} vs {list(tb.shape)}"
        if key.endswith(".alpha") and not torch.equal(ta.float(), tb.float()):
            return f"{key}: alpha {ta.flatten().tolist()} vs {tb.flatten().tolist()}"
        if not ta.is_floating_point() and not torch.equal(ta, tb):
            return f"{key}: integer tensors differ"
    return None


def average_networks(files: list[str | Path], out: str | Path, *, weights: list[float] | None = None,
                     save_dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Checkpoint soup: the tensor-wise (weighted) mean of network files of one structure, written to `out`.

    Every factor (lora_up/down, LoKr/LoHa factors, dora_scale, w_norm diffs) is averaged in float64 and written in
    the first file's dtype (or `save_dtype`); alphas are copied (they must be equal).  Files whose keys, shapes,
    ranks, alphas or algorithm differ are refused naming the first difference.  A mean of LoRA factors is not the
    mean of the updates ΔW (mean(B)·mean(A) ≠ mean(B·A)); docs/evaluation.md ("Checkpoint soup") says when it is
    close.  The metadata is the first file's plus `anima_trainer_soup` (each file's name, weight and sshs model
    hash), with the sshs hashes recomputed for the result.
    """
    out = Path(out)
    if len(files) < 2:
        raise NetworkError("merge --average needs at least two network files")
    if out.suffix != ".safetensors":
        raise NetworkError(f"{out}: the averaged network is written as .safetensors")
    check_writable(out, overwrite)
    if any(Path(f).resolve() == out.resolve() for f in files):
        raise NetworkError(f"{out}: the output is one of the inputs; choose another output name")
    weights = [1.0] * len(files) if weights is None else [float(w) for w in weights]
    if len(weights) != len(files):
        raise NetworkError(f"merge --average: {len(weights)} weight(s) for {len(files)} file(s); give one per file")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise NetworkError(f"merge --average: weights {weights} must be finite, not negative, and not all zero")
    total = sum(weights)
    first, first_meta = None, {}
    sums: dict[str, torch.Tensor] = {}
    soup = []
    for f, w in zip(files, weights, strict=True):
        expect_kind(f, "--average", ("network",))
        sd, meta = read_network(f)
        check_finite_network(sd, f)
        if first is None:
            first, first_meta = sd, meta
        else:
            diff = _first_difference(first, first_meta, sd, meta)
            if diff is not None:
                raise NetworkError(f"merge --average: {f} has not the structure of {files[0]}: {diff}; only networks "
                                   "of one structure (same keys, ranks, alphas, algorithm) can be averaged, nothing "
                                   "written")
        for key, t in sd.items():
            if t.is_floating_point() and not key.endswith(".alpha"):
                sums[key] = sums.get(key, 0) + t.double() * (w / total)
        with Path(f).open("rb") as fh:
            soup.append({"file": Path(f).name, "weight": w / total, "sshs_model_hash": addnet_hash_safetensors(fh)})
    assert first is not None
    tensors = {k: (sums[k].to(save_dtype or t.dtype) if k in sums else t).contiguous() for k, t in first.items()}
    meta = {k: v for k, v in first_meta.items()
            if k not in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")}
    meta[SOUP_META] = json.dumps(soup)
    meta = with_hashes(tensors, meta)
    check_writable(out, overwrite)
    atomic_save(tensors, out, meta, what="averaged network ", check=lambda _tmp: check_writable(out, overwrite))
    return {"written": str(out), "files": [str(f) for f in files], "weights": [w / total for w in weights],
            "tensors": len(tensors)}
