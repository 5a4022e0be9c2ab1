"""The cells of the image grids: one image per (network, strength, prompt), drawn exactly as `generate_image`
draws it (ComfyUI's shift-3 `simple` schedule, Euler, CFG, the prompt's own seed, size, steps, CFG and shift),
but with the prompts that share a size and sampler settings run through the sampler as one batch.

Why batching keeps the image: each image's noise comes from its own seed (`initial_noise`, drawn on the CPU as
for one image), its prompt and negative are encoded one at a time as `generate_image` encodes them, cond and
uncond are padded to the same rows as `cfg_velocity` pads them for one image (prompts whose padded row counts
differ never share a batch), and every image is decoded on its own.  What a batch can change is the float
rounding of the DiT's matrix products (kernels blocked by batch size); tests/evaluation/test_grids.py measures it.

Strength 0 is the base model for every network (an adapter at multiplier 0 returns the frozen layer's output
exactly), so its cells are rendered once per cells folder, recorded without a network, and reused by every
later network: `cells/base/pNN.png`.  A network's cells are `cells/<label>/s<strength>_pNN.png` (label made
safe for any file system).  Every cell PNG carries its `SampleParams` (`read_png_parameters`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from anima_trainer.evaluation.prompt_bank import BankPrompt
from anima_trainer.evaluation.strength import at_strength
from anima_trainer.sample.generate import SampleParams, encode_prompts, read_png_parameters, save_png, to_pil
from anima_trainer.sample.sampler import cfg_velocity, initial_noise, sample_euler, simple_schedule

BASE_FOLDER = "base"
DEFAULT_CELL_BATCH = 4  # images per sampler batch (×2 rows in the DiT with CFG)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def strength_tag(strength: float) -> str:
    """A strength as file names and labels write it: 1, 0.5, 0.8, -1 (up to 10 significant digits)."""
    return f"{float(strength):.10g}"


def safe_label(label: str) -> str:
    """`label` as a folder name on any file system: runs of characters other than letters, digits, `.`, `_`,
    `-` become `_`, leading dots and spaces go, at most 80 characters.  When that changed anything (or the name is
    reserved: `base`, Windows' `CON`, ...), 8 hex digits of the label's SHA-256 are appended, so two labels
    never share a folder."""
    safe = _UNSAFE.sub("_", label).lstrip("._ ")[:80].rstrip(". ") or "network"
    if safe != label or safe.lower() in _RESERVED or safe.lower() == BASE_FOLDER:
        safe = f"{safe}-{hashlib.sha256(label.encode('utf-8')).hexdigest()[:8]}"
    return safe


def cell_path(cells_dir: str | Path, label: str | None, strength: float, prompt_index: int) -> Path:
    """Where a cell lives: `base/pNN.png` for strength 0 or no network (shared by all networks), else
    `<safe label>/s<strength>_pNN.png`."""
    if label is None or float(strength) == 0.0:
        return Path(cells_dir) / BASE_FOLDER / f"p{prompt_index:02d}.png"
    return Path(cells_dir) / safe_label(label) / f"s{strength_tag(strength)}_p{prompt_index:02d}.png"


def cell_params(prompt: BankPrompt, index: int, network_file_name: str | None, strength: float,
                models: Mapping[str, str]) -> SampleParams:
    """The `SampleParams` of one cell: the prompt's own settings (its seed, or its index when it has none),
    ComfyUI's Euler + `simple` schedule, the model files, and `{network file: strength}` (none for the base)."""
    s = prompt.sample
    base = network_file_name is None or float(strength) == 0.0
    return SampleParams(prompt=s.prompt, negative_prompt=s.negative_prompt, steps=int(s.steps), cfg=float(s.cfg),
                        width=int(s.width), height=int(s.height), seed=index if s.seed is None else int(s.seed),
                        shift=float(s.shift), models=dict(models),
                        networks={} if base else {network_file_name: float(strength)})


def check_strengths(strengths: Sequence[float]) -> list[float]:
    """Strengths as floats; refuses none, non-finite values and repeats (two columns of one strength)."""
    values = [float(s) for s in strengths]
    if not values:
        raise ValueError("the grids need at least one strength")
    bad = [s for s in values if not math.isfinite(s)]
    if bad:
        raise ValueError(f"strengths must be finite numbers, got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"strengths must not repeat, got {values}")
    return values


def _batch_key(params: SampleParams, rows: int) -> tuple:
    return (params.width, params.height, params.steps, params.cfg, params.shift, rows)


def _pad_rows(context: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to `rows`, as `cfg_velocity` pads cond and uncond for one image."""
    return torch.nn.functional.pad(context, (0, 0, 0, rows - context.shape[1]))


@torch.no_grad()
def _render(dit: nn.Module, text_encoder, vae, jobs: list[tuple[SampleParams, Path]], batch_size: int,
            progress: bool) -> None:
    """Sample and save `jobs` (params, path), batching the ones that share size, steps, CFG, shift and context
    rows; the network (if any) is already at the jobs' strength."""
    device = next(dit.parameters()).device
    encoded: dict[str, torch.Tensor] = {}

    def context(text: str) -> torch.Tensor:  # one prompt at a time, exactly as generate_image encodes it
        if text not in encoded:
            encoded[text] = encode_prompts(dit, text_encoder, [text])
        return encoded[text]

    groups: dict[tuple, list[tuple[SampleParams, Path, torch.Tensor, torch.Tensor | None]]] = {}
    for params, path in jobs:
        params.validate()
        cond = context(params.prompt)
        uncond = None if params.cfg == 1.0 else context(params.negative_prompt)
        rows = cond.shape[1] if uncond is None else max(cond.shape[1], uncond.shape[1])
        groups.setdefault(_batch_key(params, rows), []).append((params, path, cond, uncond))
    for (width, height, steps, cfg, shift, rows), members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            noise = torch.cat([initial_noise((1, 16, 1, height // 8, width // 8), p.seed) for p, *_ in chunk])
            cond = torch.cat([_pad_rows(c, rows) for _, _, c, _ in chunk]).to(device)
            uncond = None if cfg == 1.0 else torch.cat([_pad_rows(u, rows) for *_, u in chunk]).to(device)
            latents = sample_euler(cfg_velocity(dit, cond, uncond, cfg), noise.to(device),
                                   simple_schedule(steps, shift), progress=progress)
            images = vae.decode(latents, batch_size=1)  # one image at a time, as generate_image decodes it
            for (params, path, _, _), image in zip(chunk, images, strict=True):
                save_png(to_pil(image), params, path, overwrite=True)


def render_cells(dit: nn.Module, text_encoder, vae, network: nn.Module | None, label: str | None,
                 network_file_name: str | None, prompts: Sequence[BankPrompt], strengths: Sequence[float],
                 cells_dir: str | Path, *, models: Mapping[str, str], batch_size: int = DEFAULT_CELL_BATCH,
                 progress: bool = False) -> list[Path]:
    """Every (strength, prompt) cell of the network injected into `dit` (`network`, named `label`, saved as
    `network_file_name`), strength-major in the given orders; the paths (`cell_path`).

    Strength 0 (and `network` None) is the base: its cell is reused when `cells_dir` already holds it with the
    same parameters (rendered for an earlier network), otherwise rendered with the network at multiplier 0.
    The network's multipliers and training mode are restored afterwards (`at_strength`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if network is not None and (label is None or network_file_name is None):
        raise ValueError("a network's cells need its label and file name")
    values = [0.0] if network is None else check_strengths(strengths)
    paths: list[Path] = []
    for strength in values:
        jobs = []
        for index, prompt in enumerate(prompts):
            params = cell_params(prompt, index, network_file_name, strength, models)
            path = cell_path(cells_dir, label, strength, index)
            paths.append(path)
            if not (strength == 0.0 and _same_cell(path, params)):
                jobs.append((params, path))
        if jobs:
            with at_strength(network, strength):
                _render(dit, text_encoder, vae, jobs, batch_size, progress)
    return paths


def _same_cell(path: Path, params: SampleParams) -> bool:
    """Whether `path` is a cell already drawn with exactly `params` (the base cell an earlier network drew)."""
    try:
        return read_png_parameters(path) == asdict(params)
    except (OSError, KeyError, ValueError, SyntaxError):  # missing, not a PNG (Pillow: SyntaxError), no JSON
        return False
