"""Image grids (evaluation/grid_cells.py, grid_layout.py, grids.py): a batched cell is the image `generate_image`
draws for the same parameters, strength 0 is one base image for every network, the grids hold the cells at the
places their layout says, and every PNG names all it was drawn with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anima_trainer.demo import write_demo_models
from anima_trainer.evaluation import grid_cells
from anima_trainer.evaluation.grid_cells import cell_params, cell_path, render_cells, safe_label, strength_tag
from anima_trainer.evaluation.grid_layout import wrap_text
from anima_trainer.evaluation.grids import assemble_grids, grid_strength
from anima_trainer.evaluation.prompt_bank import BankPrompt
from anima_trainer.models import load_dit, load_text_encoder, load_vae
from anima_trainer.networks import create_network
from anima_trainer.sample.generate import generate_image, read_png_parameters
from anima_trainer.sample.prompts import SamplePrompt

NEGATIVE = "worst quality, blurry"
# three prompts share 64×64 / 4 steps / CFG 4 (one sampler batch), one is 64×48 with CFG 1 (no uncond: its own batch)
PROMPTS = [BankPrompt(SamplePrompt("1girl, red hair, smile", NEGATIVE, 64, 64, 11, 4, 4.0, 3.0), "builtin"),
           BankPrompt(SamplePrompt("", NEGATIVE, 64, 64, 12, 4, 4.0, 3.0), "builtin"),
           BankPrompt(SamplePrompt("no humans, scenery, a blue square", "", 64, 64, 13, 4, 4.0, 3.0), "prompt_file"),
           BankPrompt(SamplePrompt("sks, a red circle", NEGATIVE, 64, 48, 14, 3, 1.0, 2.0), "sample_prompts")]
STRENGTHS = [0.0, 0.5, 1.0]
LABELS = {"run-step10": "run-step10.safetensors", "run step20/ema": "run-step20-ema.safetensors"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    models = write_demo_models(tmp_path_factory.mktemp("grid_models"), seed=5)
    dit = load_dit(models["dit"], dtype=torch.float32)
    te = load_text_encoder(models["qwen3"], qwen3_tokenizer_path=models["tokenizers"], dtype=torch.float32)
    vae = load_vae(models["vae"], dtype=torch.float32)
    return {"dit": dit, "te": te, "vae": vae,
            "models": {name: models[name].name for name in ("dit", "qwen3", "vae")}}


@contextmanager
def injected(dit, seed: int) -> Iterator:
    """A LoRA with random (non-zero) weights injected into `dit` for the block, removed afterwards."""
    network = create_network(dit, algo="lora", dim=4, alpha=4.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    try:
        yield network
    finally:
        network.remove()


def _render_all(env, cells_dir: Path, batch_size: int = 4) -> dict[str, list[Path]]:
    """Both test networks' cells, one network at a time (as the orchestrator renders checkpoints)."""
    out = {}
    for seed, (label, file_name) in enumerate(LABELS.items()):
        with injected(env["dit"], seed) as network:
            out[label] = render_cells(env["dit"], env["te"], env["vae"], network, label, file_name, PROMPTS,
                                      STRENGTHS, cells_dir, models=env["models"], batch_size=batch_size)
    return out


@pytest.fixture(scope="module")
def rendered(env, tmp_path_factory) -> dict:
    results = tmp_path_factory.mktemp("results")
    paths = _render_all(env, results / "cells")
    grids = assemble_grids(results, LABELS, PROMPTS, STRENGTHS, models=env["models"])
    return {"results": results, "paths": paths, "grids": grids}


def _pixels(image_or_path) -> np.ndarray:
    image = Image.open(image_or_path) if isinstance(image_or_path, Path) else image_or_path
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_names_are_safe_and_distinct(tmp_path):
    assert safe_label("run-step10") == "run-step10"
    odd = safe_label("run step20/ema")
    assert odd.startswith("run_step20_ema-") and len(odd) == len("run_step20_ema-") + 8
    assert safe_label("run_step20_ema") != odd  # the hash keeps labels apart that sanitise alike
    for label in ("base", "BASE", "CON", "..", "../../etc", "", "a\\b:c*?"):
        name = safe_label(label)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name.lower() != "base"
    assert [strength_tag(s) for s in (0, 0.5, 1.0, -1, 0.8)] == ["0", "0.5", "1", "-1", "0.8"]
    assert cell_path(tmp_path, "x", 0.0, 3) == cell_path(tmp_path, None, 1.0, 3) == tmp_path / "base" / "p03.png"
    assert cell_path(tmp_path, "x", 0.5, 12) == tmp_path / "x" / "s0.5_p12.png"


def test_a_batched_cell_is_the_image_generate_image_draws(env, rendered, tmp_path):
    """Each cell against `generate_image` with the cell's parameters.  One image per batch (batch_size 1): the
    same bytes.  Three 64×64 prompts in one batch: the DiT's fp32 matrix products on the CPU are blocked by
    batch size, so the latents differ by ~2e-6 (a few ulp of values ~4) and an 8-bit value that sits on a rounding
    edge moves by one level: measured 0–2 of the 12,288 values of an image, never more than 1 level."""
    dit, te, vae = env["dit"], env["te"], env["vae"]
    label, file_name = next(iter(LABELS.items()))
    single = render_cells(dit, te, vae, None, None, None, PROMPTS, STRENGTHS, tmp_path,
                          models=env["models"], batch_size=1)
    assert single == [cell_path(tmp_path, None, 0.0, i) for i in range(len(PROMPTS))]
    with injected(dit, 0) as network:
        one_by_one = render_cells(dit, te, vae, network, label, file_name, PROMPTS, [1.0],
                                  tmp_path, models=env["models"], batch_size=1)
        for strength, paths in ((0.0, single), (1.0, one_by_one)):
            network.set_multiplier(strength)
            for index, path in enumerate(paths):
                params = cell_params(PROMPTS[index], index, file_name, strength, env["models"])
                assert read_png_parameters(path) == asdict(params)
                expected = _pixels(generate_image(dit, te, vae, params, progress=False))
                assert np.array_equal(_pixels(path), expected), (strength, index)
                batched = _pixels(rendered["paths"][label][STRENGTHS.index(strength) * len(PROMPTS) + index])
                assert np.abs(batched - expected).max() <= 1
                assert np.count_nonzero(batched != expected) <= expected.size // 1000
        network.set_multiplier(1.0)
    params = read_png_parameters(rendered["paths"][label][-1])
    assert params == {"prompt": "sks, a red circle", "negative_prompt": NEGATIVE, "steps": 3, "cfg": 1.0,
                      "width": 64, "height": 48, "seed": 14, "shift": 2.0, "sampler": "euler", "scheduler": "simple",
                      "models": env["models"], "networks": {file_name: 1.0}}
    assert Image.open(rendered["paths"][label][-1]).size == (64, 48)


def test_strength_zero_is_one_base_image_for_every_network(env, rendered, tmp_path, monkeypatch):
    paths = rendered["paths"]
    (a, b) = LABELS
    assert paths[a][:len(PROMPTS)] == paths[b][:len(PROMPTS)]  # one base file per prompt, shared
    assert all(read_png_parameters(p)["networks"] == {} for p in paths[a][:len(PROMPTS)])
    # the base drawn through network b (in a fresh folder) is byte for byte the base drawn through network a
    with injected(env["dit"], 1) as network:
        alone = render_cells(env["dit"], env["te"], env["vae"], network, b, LABELS[b], PROMPTS, [0.0, 1.0],
                             tmp_path / "cells", models=env["models"])
    for first, second in zip(paths[a][:len(PROMPTS)], alone[:len(PROMPTS)], strict=True):
        assert first.read_bytes() == second.read_bytes()
    for index in range(len(PROMPTS)):  # at strength 1 the two networks draw different images
        at_one = [paths[label][2 * len(PROMPTS) + index] for label in LABELS]
        assert not np.array_equal(_pixels(at_one[0]), _pixels(at_one[1]))
        assert not np.array_equal(_pixels(at_one[0]), _pixels(paths[a][index]))
    # a later network finds the base already drawn and renders only its own cells; a stale base is redrawn
    drawn: list[Path] = []
    real = grid_cells._render
    monkeypatch.setattr(grid_cells, "_render", lambda d, t, v, jobs, *rest: (drawn.extend(p for _, p in jobs),
                                                                              real(d, t, v, jobs, *rest)))
    stale, broken = alone[1], alone[2]
    stale.write_bytes(paths[a][0].read_bytes())  # another prompt's base image: its parameters do not match
    broken.write_bytes(b"not a png")
    with injected(env["dit"], 2) as network:
        render_cells(env["dit"], env["te"], env["vae"], network, "third", "third.safetensors", PROMPTS, [0.0, 1.0],
                     tmp_path / "cells", models=env["models"])
    assert drawn == [stale, broken] + [cell_path(tmp_path / "cells", "third", 1.0, i) for i in range(len(PROMPTS))]
    assert stale.read_bytes() == paths[a][1].read_bytes() and broken.read_bytes() == paths[a][2].read_bytes()


def test_strengths_grid_layout_and_metadata(env, rendered):
    results, grids = rendered["results"], rendered["grids"]
    assert [g.path for g in grids] == [f"grids/strengths_p{i:02d}.png" for i in range(len(PROMPTS))] + [
        "grids/prompts_at_1.png"]
    grid = grids[0]
    assert (grid.kind, grid.rows, grid.columns, grid.prompt) == ("strengths", list(LABELS), ["0 (base)", "0.5", "1"],
                                                                  PROMPTS[0].text)
    assert grid.title == "p00: 1girl, red hair, smile" and grids[1].title == "p01: (empty prompt)"
    image = Image.open(results / grid.path)
    params = read_png_parameters(results / grid.path)
    layout = params["layout"]
    assert (layout["cell_width"], layout["cell_height"], layout["rows"], layout["columns"]) == (64, 64, 2, 3)
    assert image.size == (layout["label_width"] + 3 * (64 + layout["gap"]),
                          layout["title_height"] + layout["header_height"] + 2 * (64 + layout["gap"]))
    assert layout["header_height"] > 0 and layout["title_height"] > 0 and layout["label_width"] >= 64
    for row, label in enumerate(LABELS):
        for column, strength in enumerate(STRENGTHS):
            x = layout["label_width"] + column * (64 + layout["gap"])
            y = layout["title_height"] + layout["header_height"] + row * (64 + layout["gap"])
            cell = cell_path(results / "cells", label, strength, 0)
            assert np.array_equal(_pixels(image.crop((x, y, x + 64, y + 64))), _pixels(cell))
            assert params["cells"][row][column] == cell.relative_to(results).as_posix()
    assert params["kind"] == "strengths" and params["strengths"] == STRENGTHS
    assert params["networks"] == LABELS and list(params["networks"]) == list(LABELS)
    assert params["models"] == env["models"] and (params["sampler"], params["scheduler"]) == ("euler", "simple")
    assert params["prompts"] == [{"index": 0, "prompt": "1girl, red hair, smile", "negative_prompt": NEGATIVE,
                                  "seed": 11, "width": 64, "height": 64, "steps": 4, "cfg": 4.0, "shift": 3.0,
                                  "source": "builtin"}]
    assert params["downscaled"] is False and params["cell_max_side"] == 512
    assert (params["title"], params["rows"], params["columns"]) == (grid.title, grid.rows, grid.columns)


def test_prompts_grid(env, rendered):
    results, grid = rendered["results"], rendered["grids"][-1]
    assert (grid.kind, grid.prompt) == ("prompts", None)
    assert grid.rows == [p.text for p in PROMPTS] and grid.columns == ["base", *LABELS]
    params = read_png_parameters(results / grid.path)
    assert params["kind"] == "prompts" and params["strength"] == 1.0
    assert [p["seed"] for p in params["prompts"]] == [11, 12, 13, 14]
    assert params["prompts"][3] == {"index": 3, "prompt": "sks, a red circle", "negative_prompt": NEGATIVE,
                                    "seed": 14, "width": 64, "height": 48, "steps": 3, "cfg": 1.0, "shift": 2.0,
                                    "source": "sample_prompts"}
    layout = params["layout"]
    assert (layout["rows"], layout["columns"], layout["cell_width"], layout["cell_height"]) == (4, 3, 64, 64)
    image = Image.open(results / grid.path)
    assert image.size == tuple(layout["size"])
    # the 64×48 cell is centred in its 64×64 box
    x = layout["label_width"] + 2 * (64 + layout["gap"])
    y = layout["title_height"] + layout["header_height"] + 3 * (64 + layout["gap"]) + 8
    cell = cell_path(results / "cells", list(LABELS)[1], 1.0, 3)
    assert np.array_equal(_pixels(image.crop((x, y, x + 64, y + 48))), _pixels(cell))
    assert params["cells"][3] == [cell_path(results / "cells", None, 0.0, 3).relative_to(results).as_posix(),
                                  *(cell_path(results / "cells", label, 1.0, 3).relative_to(results).as_posix()
                                    for label in LABELS)]
    assert grid_strength([0, 0.5, 0.8]) == 0.8 and grid_strength([1.0, 1.5]) == 1.0


def test_grids_downscale_large_cells_and_say_so(env, rendered, tmp_path):
    cells = rendered["results"] / "cells"
    grids = assemble_grids(tmp_path / "small", LABELS, PROMPTS[:1], [0.0, 1.0], models=env["models"],
                           cells_dir=cells, max_cell_side=32)
    params = read_png_parameters(tmp_path / "small" / grids[0].path)
    assert params["downscaled"] is True and params["cell_max_side"] == 32
    assert (params["layout"]["cell_width"], params["layout"]["cell_height"]) == (32, 32)
    assert params["cells"][0][0] == str(cell_path(cells, None, 0.0, 0))  # cells outside the results folder
    only_base = assemble_grids(tmp_path / "base", LABELS, PROMPTS[:1], [0.0], models=env["models"], cells_dir=cells)
    assert [g.kind for g in only_base] == ["strengths"]  # nothing but the base: no prompts grid


def test_everything_is_deterministic(env, rendered, tmp_path):
    _render_all(env, tmp_path / "cells")
    again = assemble_grids(tmp_path, LABELS, PROMPTS, STRENGTHS, models=env["models"])
    assert again == rendered["grids"]
    first = sorted(p.relative_to(rendered["results"]) for p in rendered["results"].rglob("*.png"))
    assert first == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    for relative in first:
        assert (tmp_path / relative).read_bytes() == (rendered["results"] / relative).read_bytes(), relative


def test_refusals(env, rendered, tmp_path):
    with pytest.raises(ValueError, match="must not repeat"):
        assemble_grids(tmp_path, LABELS, PROMPTS, [1.0, 1.0], models=env["models"])
    with pytest.raises(FileNotFoundError, match="render_cells draws the cells"):
        assemble_grids(tmp_path, LABELS, PROMPTS, STRENGTHS, models=env["models"])
    with pytest.raises(ValueError, match="at least one network"):
        assemble_grids(tmp_path, {}, PROMPTS, STRENGTHS, models=env["models"])
    with pytest.raises(ValueError, match="label and file name"):
        render_cells(env["dit"], env["te"], env["vae"], torch.nn.Linear(1, 1), None, None, PROMPTS, [1.0], tmp_path,
                     models={})


def test_wrap_text_breaks_long_words_and_truncates():
    from anima_trainer.evaluation.grid_layout import load_font

    font = load_font(12)
    lines = wrap_text("demo_lora-step00000010-ema " * 3, font, 60, 3)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(font.getlength(line) <= 60 for line in lines)
    assert wrap_text("a b", font, 200, 2) == ["a b"] and wrap_text("", font, 50, 1) == [""]
