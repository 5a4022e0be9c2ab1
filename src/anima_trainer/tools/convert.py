"""`anima-trainer convert-network`: an adapter file renamed to ComfyUI, kohya or diffusers names, losslessly.

`convert_network(src, dst, to="comfy"|"kohya"|"diffusers")` copies every tensor and metadata entry bit for bit
under the new names (the renaming rules: networks/convert.py), checks that the result still loads where it is
meant to, and writes it atomically.  `parse_network_arg` reads the `FILE[:multiplier]` arguments of `merge`.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from anima_trainer.fileio import check_writable

from anima_trainer.tensor_files import atomic_save
from anima_trainer.networks.convert import (
    ModuleTable,
    build_meta_dit,
    build_meta_qwen3,
    check_finite_network,
    convert_state_dict,
    read_network,
)
from anima_trainer.networks.diffusers_format import check_diffusers_keys
from anima_trainer.networks.formats import NetworkError, check_comfy_keys, comfy_skipped_keys, is_text_encoder_key
from anima_trainer.networks.hashes import with_hashes


def convert_network(src: str | Path, dst: str | Path, to: str, *, dit: nn.Module | None = None,
                    text_encoder: nn.Module | None = None, overwrite: bool = False) -> dict:
    """Convert one file; returns {"keys": n, "written": path, "comfy_skips": [keys]}.  ComfyUI/kohya output is
    checked with check_comfy_keys (`comfy_skips`: kohya `lora_te_*` keys ComfyUI does not load, --to kohya),
    diffusers output with diffusers_format.check_diffusers_keys (ComfyUI does not read it).  Text-encoder keys
    are resolved against `text_encoder` (default: Qwen3-0.6B built on meta)."""
    dst = Path(dst)
    check_writable(dst, overwrite)
    if Path(src).resolve() == dst.resolve():
        raise NetworkError(f"{dst}: output and input are the same file; choose another output name")
    dit = dit if dit is not None else build_meta_dit()
    sd, meta = read_network(src)
    check_finite_network(sd, src)
    if text_encoder is None and any(is_text_encoder_key(k) for k in sd):
        text_encoder = build_meta_qwen3()
    try:
        out, meta = convert_state_dict(sd, meta, to, ModuleTable.from_dit(dit, text_encoder))
    except NetworkError as e:
        raise NetworkError(f"{e}; nothing written") from e
    if to == "diffusers":
        def key_check(keys, dit_, te_):
            check_diffusers_keys(keys, dit_)
    else:
        key_check = check_comfy_keys
    # both spellings must still load in ComfyUI (kohya TE names: name a Qwen3 module); before anything is written
    key_check(list(out), dit, text_encoder)

    def check(tmp: Path) -> None:  # the written file, before it takes dst's name
        key_check(tmp, dit, text_encoder)
        check_writable(dst, overwrite)

    check_writable(dst, overwrite)
    if meta and "sshs_model_hash" in meta:  # kohya's hashes of the source describe its tensors: recomputed
        meta = with_hashes(out, meta)
    atomic_save({k: v.contiguous() for k, v in out.items()}, dst, meta, what="converted network ", check=check)
    return {"keys": len(out), "written": str(dst), "comfy_skips": comfy_skipped_keys(out)}


def parse_network_arg(text: str) -> tuple[str, float]:
    """`FILE[:mul]` → (file, multiplier); a tail that is not a number belongs to the file name."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            mul = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(mul):
            raise NetworkError(f"--network {text}: the multiplier {tail!r} is not a finite number; give one like "
                               f"{head}:0.8 (a file whose name ends in ':{tail}': add ':1')")
        return head, mul
    return text, 1.0
