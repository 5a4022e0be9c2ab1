"""A whole DiT written as a checkpoint ComfyUI loads as a diffusion model: the base file's own key layout.

Two writers need it: `anima-trainer merge` (tools/merge.py: networks baked into the base) and the fine-tune mode
(networks/full_finetune.py: the trained DiT).  Both take the live DiT's state and the base file it came from and
write every key of that file, in its layout (`net.` prefix of the published single files, an all-in-one bundle's
other parts copied as they are), with each DiT tensor replaced by the live one; nothing else is added.  A base given
as a diffusers-layout folder has no single file to follow: the published layout (`net.<name>`) is written.

A scaled-fp8 base is written dequantised: its scales and quantisation bookkeeping would make ComfyUI scale the
(already dequantised) weights a second time, so they are left out.  Writing goes through the one atomic path
(tensor_files.atomic_save: NaN/Inf refused, e.g. an fp16 overflow), and `check_dit_checkpoint_keys` refuses a file
whose keys are not exactly the expected ones before it takes its name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from anima_trainer.dtypes import FLOAT_FILE_DTYPES
from anima_trainer.models.model_files import QUANT_METADATA, expect_kind, quant_plan, read_header
from anima_trainer.tensor_files import atomic_save

PUBLISHED_PREFIX = "net."  # the key prefix of the published single-file Anima DiT
COMFY_FORMAT_METADATA = {"format": "pt"}  # what kohya's save_anima_model writes for ComfyUI


@dataclass(frozen=True)
class DitLayout:
    """How a DiT's tensors are laid out in its base file: the file (None: a diffusers folder, written in the
    published layout), the key prefix of the DiT's own tensors, the keys left out (fp8 scales), the file's
    metadata and its per-key dtype names."""

    file: Path | None
    prefix: str
    dropped: frozenset[str]
    metadata: dict[str, str]
    dtypes: dict[str, str]

    def expected_keys(self, state_names: set[str]) -> set[str]:
        """The keys the written checkpoint must hold, exactly."""
        if self.file is None:
            return {self.prefix + n for n in state_names}
        return set(self.dtypes) - self.dropped


def dit_layout(base: str | Path, flag: str = "--dit") -> DitLayout:
    """The layout of the DiT file (or diffusers folder) `base`; a file that is not a DiT is named with `flag`."""
    base = Path(base)
    if base.is_dir():
        return DitLayout(None, PUBLISHED_PREFIX, frozenset(), {}, {})
    info = expect_kind(base, flag, ("anima_dit", "anima_bundle"))
    prefix = info.components.get("dit", info.prefix)
    header, meta = read_header(base)
    plan = quant_plan(base, header, meta, prefix)
    dropped = frozenset(set(plan.scales.values()) | plan.skipped)
    return DitLayout(base, prefix, dropped, {k: v for k, v in meta.items() if k != QUANT_METADATA},
                     {k: dt for k, (dt, _) in header.items()})


def checkpoint_tensors(layout: DitLayout, state: Mapping[str, torch.Tensor],
                       save_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint: each key of the base layout, the DiT's from `state` (the live DiT's
    state_dict) in `save_dtype` (None: the base file's dtype of that key), the rest copied from the base file."""
    if layout.file is None:
        return {layout.prefix + n: t.detach().to("cpu", save_dtype or t.dtype).contiguous() for n, t in state.items()}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(layout.file), "pt") as fh:
        for key, dt in layout.dtypes.items():
            if key in layout.dropped:
                continue
            name = key[len(layout.prefix):] if key.startswith(layout.prefix) else None
            if name is not None and name in state:
                t = state[name]
                tensors[key] = t.detach().to("cpu", save_dtype or FLOAT_FILE_DTYPES.get(dt, t.dtype)).contiguous()
            else:
                tensors[key] = fh.get_tensor(key)
    return tensors


def check_dit_checkpoint_keys(path: str | Path, expected: set[str]) -> None:
    """The DiT-file equivalent of the LoRA save's ComfyUI key check: the written file holds every key of the
    base layout and no other (ComfyUI reads a DiT checkpoint by these names; a missing key fails its load, an
    extra one is silently ignored there)."""
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing or extra:
        raise ValueError(f"{path}: the DiT checkpoint's keys differ from its base layout (missing {missing[:3]}, "
                         f"extra {extra[:3]}); nothing written")


def save_dit_checkpoint(layout: DitLayout, state: Mapping[str, torch.Tensor], out: str | Path, *,
                        save_dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None,
                        what: str = "DiT checkpoint ", check: Callable[[Path], None] | None = None) -> Path:
    """Write `state` as a checkpoint in `layout` (see the module doc) with the base file's metadata updated by
    `metadata` (a fine-tune adds kohya's COMFY_FORMAT_METADATA); the key check and `check(tmp)` run before the
    file takes `out`'s name."""
    tensors = checkpoint_tensors(layout, state, save_dtype)
    expected = layout.expected_keys(set(state))

    def checks(tmp: Path) -> None:
        check_dit_checkpoint_keys(tmp, expected)
        if check is not None:
            check(tmp)

    meta = {**layout.metadata, **(metadata or {})}
    return atomic_save(tensors, out, meta, what=what, check=checks)
