"""The image grids of an evaluation, assembled from the cells `grid_cells.render_cells` drew:

    grids/strengths_pNN.png    one per prompt: rows = networks (in the given order), columns = strengths (0 is the
                               base model, the same image on every row)
    grids/prompts_at_<s>.png   rows = prompts, columns = the base (when strength 0 was drawn) then the networks,
                               at strength 1 (or the highest strength drawn; none when that is 0)

Every grid PNG carries a `parameters` JSON text chunk (`read_png_parameters`) with all it depends on: its kind,
the prompts (text, negative, seed, size, steps, CFG, shift), sampler and scheduler, model files, networks (label →
file), strengths, the cell files and whether cells were downscaled, so any grid can be drawn again.  Cells larger
than `max_cell_side` (512 px) are downscaled (Lanczos) in the grid; the cell files keep full size.

    for each checkpoint:  render_cells(dit, te, vae, network, label, file_name, prompts, strengths,
                                       results_dir / CELLS_FOLDER, models=models)     (grid_cells.py)
    at the end:           grids = assemble_grids(results_dir, {label: file_name, ...}, prompts, strengths,
                                                 models=models)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from anima_trainer.evaluation.eval_results import GridImage
from anima_trainer.evaluation.grid_cells import cell_params, cell_path, check_strengths, render_cells, strength_tag
from anima_trainer.evaluation.grid_layout import draw_grid
from anima_trainer.evaluation.prompt_bank import BankPrompt
from anima_trainer.sample.generate import SampleParams, save_png

__all__ = ["CELLS_FOLDER", "GRIDS_FOLDER", "MAX_CELL_SIDE", "assemble_grids", "grid_strength", "render_cells"]

GRIDS_FOLDER = "grids"
CELLS_FOLDER = "cells"
MAX_CELL_SIDE = 512  # px: larger cells are downscaled in the grids (not in their own files)


def grid_strength(strengths: Sequence[float]) -> float:
    """The strength of the prompts grid: 1.0 when drawn, else the highest strength drawn."""
    values = check_strengths(strengths)
    return 1.0 if 1.0 in values else max(values)


def _strength_label(strength: float) -> str:
    return "0 (base)" if strength == 0.0 else strength_tag(strength)


def _prompt_name(text: str) -> str:
    return text if text.strip() else "(empty prompt)"


def _settings(p: SampleParams) -> str:
    return (f"seed {p.seed} · {p.width}x{p.height} · {p.steps} steps · CFG {p.cfg:g} · shift {p.shift:g} · "
            f"{p.sampler} / {p.scheduler}")


def _prompt_record(index: int, prompt: BankPrompt, params: SampleParams) -> dict:
    return {"index": index, "prompt": params.prompt, "negative_prompt": params.negative_prompt, "seed": params.seed,
            "width": params.width, "height": params.height, "steps": params.steps, "cfg": params.cfg,
            "shift": params.shift, "source": prompt.source}


def _relative(path: Path, folder: Path) -> str:
    """`path` relative to the results folder (with `/`), or absolute when the cells live elsewhere."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def _load_cell(path: Path, max_side: int) -> tuple[Image.Image, bool]:
    """A cell as RGB, downscaled (Lanczos) to fit `max_side`; whether it was downscaled."""
    if not path.is_file():
        raise FileNotFoundError(f"grid cell {path} is missing: render_cells draws the cells of every network "
                                "before assemble_grids puts them together")
    with Image.open(path) as im:
        image = im.convert("RGB")
    if max(image.size) <= max_side:
        return image, False
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS), True


def _write_grid(results_dir: Path, grid: GridImage, row_labels: list[str], cells: list[list[Path]],
                max_side: int, title: list[tuple[str, bool]], corner: str, record: dict) -> GridImage:
    """Draw `grid` from its cell files and save it with `record` + its labels, cells and layout as parameters."""
    loaded = [[_load_cell(path, max_side) for path in row] for row in cells]
    canvas, layout = draw_grid([[im for im, _ in row] for row in loaded], row_labels, grid.columns, title,
                               corner=corner)
    record = {**record, "title": grid.title, "rows": grid.rows, "columns": grid.columns,
              "cells": [[_relative(path, results_dir) for path in row] for row in cells],
              "downscaled": any(small for row in loaded for _, small in row), "layout": layout.as_dict()}
    save_png(canvas, record, results_dir / grid.path, overwrite=True)
    return grid


def assemble_grids(results_dir: str | Path, networks: Mapping[str, str], prompts: Sequence[BankPrompt],
                   strengths: Sequence[float], *, models: Mapping[str, str], cells_dir: str | Path | None = None,
                   max_cell_side: int = MAX_CELL_SIDE) -> list[GridImage]:
    """Write `grids/strengths_pNN.png` for every prompt and `grids/prompts_at_<s>.png` under `results_dir` from
    the cells in `cells_dir` (default `results_dir/cells`); `networks` maps each label (a row, in order) to its
    file name, as given to `render_cells`.  Returns the grids, paths relative to `results_dir`."""
    if not networks:
        raise ValueError("the grids need at least one network")
    if not prompts:
        raise ValueError("the grids need at least one prompt")
    if max_cell_side < 16:
        raise ValueError(f"max_cell_side must be at least 16 px, got {max_cell_side}")
    results_dir = Path(results_dir)
    cells_dir = results_dir / CELLS_FOLDER if cells_dir is None else Path(cells_dir)
    values = check_strengths(strengths)
    labels = list(networks)
    params = [cell_params(p, i, None, 0.0, models) for i, p in enumerate(prompts)]
    common = {"sampler": params[0].sampler, "scheduler": params[0].scheduler, "models": dict(models),
              "networks": dict(networks), "strengths": values, "cell_max_side": max_cell_side}

    out = []
    for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        grid = GridImage(f"{GRIDS_FOLDER}/strengths_p{index:02d}.png", "strengths",
                         f"p{index:02d}: {_prompt_name(p.prompt)}", list(labels),
                         [_strength_label(s) for s in values], p.prompt)
        cells = [[cell_path(cells_dir, label, s, index) for s in values] for label in labels]
        title = [(grid.title, True), (f"negative: {p.negative_prompt or '(none)'}", False), (_settings(p), False)]
        out.append(_write_grid(results_dir, grid, labels, cells, max_cell_side, title, "network \\ strength",
                               {"kind": "strengths", "prompts": [_prompt_record(index, prompt, p)], **common}))

    strength = grid_strength(values)
    if strength == 0.0:
        return out  # only the base was drawn: the strengths grids show all there is
    base = 0.0 in values
    grid = GridImage(f"{GRIDS_FOLDER}/prompts_at_{strength_tag(strength)}.png", "prompts",
                     f"All prompts at strength {strength_tag(strength)}", [p.prompt for p in params],
                     (["base"] if base else []) + labels)
    cells = [[*([cell_path(cells_dir, None, 0.0, i)] if base else []),
              *(cell_path(cells_dir, label, strength, i) for label in labels)] for i in range(len(prompts))]
    row_labels = [f"p{i:02d} · seed {p.seed} · {p.width}x{p.height}\n{_prompt_name(p.prompt)}"
                  for i, p in enumerate(params)]
    title = [(grid.title, True), (f"each prompt with its own seed, size, steps, CFG, shift and negative (in this "
                                  f"PNG's parameters) · {params[0].sampler} / {params[0].scheduler}", False)]
    records = [_prompt_record(i, b, p) for i, (b, p) in enumerate(zip(prompts, params, strict=True))]
    out.append(_write_grid(results_dir, grid, row_labels, cells, max_cell_side, title, "prompt \\ network",
                           {"kind": "prompts", "strength": strength, "prompts": records, **common}))
    return out
