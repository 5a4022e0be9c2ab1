"""flip_aug / random_crop / color_aug / alpha_mask / is_reg: pixels, determinism, balancing, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anima_trainer.data import DatasetConfigError, build_dataset, parse_dataset_config
from anima_trainer.data.augment import ColorJitter, apply_color_jitter, rotate_hue


def _ramp(path: Path, width: int = 96, height: int = 64, alpha: bool = False) -> Path:
    """R = 2x, G = 3y, B = 40 (+ A = 255 - 2x): every column and row is recognisable after a crop/flip."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    chans = [2 * x, 3 * y, np.full_like(x, 40)] + ([255 - 2 * x] if alpha else [])
    Image.fromarray(np.stack(chans, -1).astype(np.uint8), "RGBA" if alpha else "RGB").save(path)
    return path


def _build(tmp_path: Path, subsets: list[dict], seed: int = 0, **general):
    general = {"resolution": 64, "class_tokens": "sks", **general}
    cfg = parse_dataset_config({"general": general, "datasets": [{"subsets": subsets}]})
    return build_dataset(cfg, seed=seed)


def _folder(tmp_path: Path, name: str, n: int = 1, **kw) -> str:
    d = tmp_path / name
    d.mkdir()
    for k in range(n):
        _ramp(d / f"{name}{k}.png", **kw)
    return str(d)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return (t * 255).round().to(torch.int64)


# --- flip_aug --------------------------------------------------------------------------------------------

def test_flip_mirrors_exactly_and_override(tmp_path):
    ds = _build(tmp_path, [{"image_dir": _folder(tmp_path, "a", width=64), "flip_aug": True}])
    plain = ds.load_batch([0])
    assert plain.flipped == [False] and plain.is_reg == [False] and plain.masks is None
    flipped = ds.load_batch([0], flips=[True])
    assert flipped.flipped == [True]
    assert torch.equal(flipped.images, plain.images.flip(-1))
    assert _u8(flipped.images)[0, 0, 0, 0] == 2 * 63  # column 0 shows the last source column
    assert ds.uses_flip and not ds.uses_random_pixels
    with pytest.raises(ValueError, match="one entry per index"):
        ds.load_batch([0], flips=[True, False])


def test_flip_draws_per_epoch_deterministic(tmp_path):
    folder = _folder(tmp_path, "a", n=6, width=64)
    ds = _build(tmp_path, [{"image_dir": folder, "flip_aug": True, "num_repeats": 3}], batch_size=4)
    reference = ds.load_batch([0]).images[0]
    again = _build(tmp_path, [{"image_dir": folder, "flip_aug": True, "num_repeats": 3}], batch_size=4)
    other_seed = _build(tmp_path, [{"image_dir": folder, "flip_aug": True, "num_repeats": 3}], seed=1, batch_size=4)
    all_flips = []
    for epoch in range(3):
        plan = ds.batch_plan(epoch)
        flips = ds.epoch_flips(epoch, plan)
        assert flips == ds.epoch_flips(epoch) == again.epoch_flips(epoch)
        batches = list(ds.epoch(epoch, prefetch=2 if epoch else 0))
        assert [b.flipped for b in batches] == flips
        for b, indices in zip(batches, plan, strict=True):
            for k, i in enumerate(indices):
                if i == 0:  # all images are the same ramp: compare against the unflipped one
                    want = reference.flip(-1) if b.flipped[k] else reference
                    assert torch.equal(b.images[k], want)
        all_flips.append(flips)
    flat = [f for flips in all_flips for row in flips for f in row]
    assert 0.2 < sum(flat) / len(flat) < 0.8  # p = 0.5 over 54 draws
    assert all_flips[0] != all_flips[1]
    assert any(other_seed.epoch_flips(e) != all_flips[e] for e in range(3))


def test_no_flip_without_flip_aug(tmp_path):
    ds = _build(tmp_path, [{"image_dir": _folder(tmp_path, "a", n=3, width=64), "num_repeats": 4}])
    assert not ds.uses_flip
    assert all(not f for row in ds.epoch_flips(0) for f in row)
    assert all(b.flipped == [False] for b in ds.epoch(0))


# --- random_crop -----------------------------------------------------------------------------------------

def test_random_crop_offsets_vary_and_stay_in_range(tmp_path):
    # 96x64 into the fixed 64x64 bucket: no resampling, 32 columns to crop
    ds = _build(tmp_path, [{"image_dir": _folder(tmp_path, "a"), "random_crop": True}])
    item = ds.items[0]
    assert item.resized == (96, 64) and item.bucket == (64, 64)
    assert ds.crop_for(0) == (16, 0)  # no epoch: centre
    assert _u8(ds.load_batch([0]).images)[0, 0, 0, 0] == 2 * 16
    offsets = [ds.crop_for(0, e) for e in range(30)]
    assert all(0 <= left <= 32 and top == 0 for left, top in offsets)
    assert len({left for left, _ in offsets}) > 5
    assert ds.uses_random_pixels
    for e in range(4):
        (batch,) = list(ds.epoch(e))
        left = ds.crop_for(0, e)[0]
        px = _u8(batch.images)[0]
        assert torch.equal(px[0, 0], 2 * torch.arange(left, left + 64))  # exactly columns left..left+63
        assert torch.equal(px[1, :, 0], 3 * torch.arange(64))
    again = _build(tmp_path, [{"image_dir": str(tmp_path / "a"), "random_crop": True}])
    assert [again.crop_for(0, e) for e in range(30)] == offsets


def test_centre_crop_without_random_crop(tmp_path):
    ds = _build(tmp_path, [{"image_dir": _folder(tmp_path, "a")}])
    assert {ds.crop_for(0, e) for e in range(10)} == {(16, 0)}
    assert not ds.uses_random_pixels


# --- color_aug -------------------------------------------------------------------------------------------

def test_rotate_hue_keeps_value_and_saturation():
    rgb = np.random.default_rng(0).random((16, 16, 3))
    out = rotate_hue(rgb, 12.0)
    np.testing.assert_allclose(out.max(-1), rgb.max(-1), atol=1e-12)
    np.testing.assert_allclose(out.min(-1), rgb.min(-1), atol=1e-12)
    np.testing.assert_allclose(rotate_hue(out, -12.0), rgb, atol=1e-12)
    np.testing.assert_allclose(rotate_hue(np.array([[1.0, 0.0, 0.0]]), 120.0), [[0.0, 1.0, 0.0]], atol=1e-12)


def test_color_aug_changes_hue_deterministically(tmp_path):
    colourful = tmp_path / "c"
    colourful.mkdir()
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(colourful / "c.png")
    ds = _build(tmp_path, [{"image_dir": str(colourful), "color_aug": True}])
    assert ds.uses_random_pixels
    jitters = [ds.color_for(0, e) for e in range(60)]
    assert 0.15 < sum(j is not None for j in jitters) / 60 < 0.55  # kohya: p = 0.33
    hue_epoch = next(e for e, j in enumerate(jitters) if j is not None and j.hue_degrees)
    gamma_epoch = next(e for e, j in enumerate(jitters) if j is not None and j.gamma != 1.0)
    none_epoch = next(e for e, j in enumerate(jitters) if j is None)
    assert all(abs(j.hue_degrees) <= 16 and 0.95 <= j.gamma <= 1.05 for j in jitters if j is not None)

    original = _u8(ds.load_batch([0]).images)[0]
    (hue,) = list(ds.epoch(hue_epoch))
    px = _u8(hue.images)[0]
    assert not torch.equal(px, original)
    assert (px.max(0).values - original.max(0).values).abs().max() <= 1  # V kept
    assert (px.min(0).values - original.min(0).values).abs().max() <= 1  # and min channel (S)
    expected = apply_color_jitter(Image.fromarray(arr), jitters[hue_epoch])
    assert torch.equal(px, torch.from_numpy(np.array(expected)).permute(2, 0, 1).to(torch.int64))
    (gamma,) = list(ds.epoch(gamma_epoch))
    g = jitters[gamma_epoch].gamma
    want = np.clip(np.rint(255 * (arr / 255.0) ** g), 0, 255)
    assert torch.equal(_u8(gamma.images)[0], torch.from_numpy(want).permute(2, 0, 1).to(torch.int64))
    (same,) = list(ds.epoch(none_epoch))
    assert torch.equal(_u8(same.images)[0], original)
    again = _build(tmp_path, [{"image_dir": str(colourful), "color_aug": True}])
    assert torch.equal(next(iter(again.epoch(hue_epoch))).images, hue.images)


def test_color_jitter_neutral_is_identity():
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(apply_color_jitter(im, ColorJitter())), np.asarray(im))


# --- alpha_mask ------------------------------------------------------------------------------------------

def test_alpha_mask_values_and_pixels_on_white(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((255, 0, 0, 128), (32, 0, 64, 64))  # right half half-transparent red
    im.save(d / "a.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(d / "b.png")  # no alpha: all ones
    ds = _build(tmp_path, [{"image_dir": str(d), "alpha_mask": True}])
    assert ds.uses_alpha_mask
    batch = ds.load_batch([0, 1])
    assert batch.masks is not None and batch.masks.shape == (2, 1, 64, 64) and batch.masks.dtype == torch.float32
    assert torch.all(batch.masks[0, 0, :, :32] == 0)
    assert torch.allclose(batch.masks[0, 0, :, 32:], torch.tensor(128 / 255))
    assert torch.all(batch.masks[1] == 1)
    assert _u8(batch.images)[0, :, 0, 0].tolist() == [255, 255, 255]  # transparent: white, as without the mask


def test_no_masks_without_alpha_mask(tmp_path):
    ds = _build(tmp_path, [{"image_dir": _folder(tmp_path, "a", alpha=True)}])
    assert ds.load_batch([0]).masks is None and not ds.uses_alpha_mask


def test_alpha_mask_cropped_and_flipped_with_image(tmp_path):
    ds = _build(tmp_path, [{"image_dir": _folder(tmp_path, "a", alpha=True), "alpha_mask": True,
                            "random_crop": True, "flip_aug": True},
                           {"image_dir": _folder(tmp_path, "b")}], batch_size=2)
    seen = set()
    for e in range(12):
        for batch in ds.epoch(e):
            assert batch.masks is not None
            for k, item in enumerate(batch.items):
                red = _u8(batch.images)[k, 0]
                mask = _u8(batch.masks)[k, 0]
                if item.subset_index == 0:  # mask = 255 - 2x wherever the pixels show column x
                    # RGB = RGBA composited on white: R' = R * a + 255 * (1 - a), recover x from the mask
                    assert torch.equal(mask, 255 - 2 * ((255 - mask) // 2))
                    x = (255 - mask) // 2
                    a = mask.double() / 255.0
                    assert torch.allclose(red.double(), (2 * x * a + 255 * (1 - a)).round(), atol=1)
                    left = ds.crop_for(0, e)[0]
                    cols = x[0].tolist()
                    want = list(range(left, left + 64))
                    assert cols == (want[::-1] if batch.flipped[k] else want)
                    seen.add(batch.flipped[k])
                else:
                    assert torch.all(mask == 255)
    assert seen == {True, False}


# --- is_reg ----------------------------------------------------------------------------------------------

def _reg_counts(ds):
    return ([(it.path.name, it.num_repeats) for it in ds.items if it.is_reg],
            sum(it.num_repeats for it in ds.items if not it.is_reg))


@pytest.mark.parametrize(
    "n_train, train_repeats, n_reg, reg_repeats, expected",
    [
        (3, 2, 4, 1, [2, 2, 1, 1]),  # 6 train items: first pass 4, then +1, +1
        (3, 1, 5, 1, [1, 1, 1]),  # more reg images than train items: the last two unused
        (6, 1, 2, 5, [5, 5]),  # the first pass overshoots (10 >= 6): kept, as kohya
        (2, 5, 1, 1, [10]),  # one reg image cycled up to 10
    ],
)
def test_reg_balancing(tmp_path, caplog, n_train, train_repeats, n_reg, reg_repeats, expected):
    with caplog.at_level(logging.INFO):
        ds = _build(tmp_path, [
            {"image_dir": _folder(tmp_path, "t", n=n_train, width=64), "num_repeats": train_repeats},
            {"image_dir": _folder(tmp_path, "r", n=n_reg, width=64), "num_repeats": reg_repeats, "is_reg": True},
        ])
    reg, num_train = _reg_counts(ds)
    assert num_train == n_train * train_repeats
    assert [n for _, n in reg] == expected
    assert [name for name, _ in reg] == [f"r{k}.png" for k in range(len(expected))]
    assert ds.num_train_items == num_train + sum(expected)
    assert ds.uses_reg
    if len(expected) < n_reg:
        assert "not used" in caplog.text
    counts: dict[bool, int] = {True: 0, False: 0}
    for batch in ds.epoch(0):
        assert batch.is_reg == [it.is_reg for it in batch.items]
        for flag in batch.is_reg:
            counts[flag] += 1
    assert counts == {False: num_train, True: sum(expected)}


def test_reg_balanced_per_dataset(tmp_path):
    t, r = _folder(tmp_path, "t", n=2, width=64), _folder(tmp_path, "r", n=1, width=64)
    cfg = parse_dataset_config({"general": {"resolution": 64, "class_tokens": "sks"}, "datasets": [
        {"subsets": [{"image_dir": t, "num_repeats": 3}, {"image_dir": r, "is_reg": True}]},
        {"subsets": [{"image_dir": t}, {"image_dir": r, "is_reg": True}]},
    ]})
    ds = build_dataset(cfg)
    assert [(it.dataset_index, it.num_repeats) for it in ds.items if it.is_reg] == [(0, 6), (1, 2)]


def test_only_reg_subsets_is_an_error(tmp_path):
    cfg = parse_dataset_config({"general": {"resolution": 64, "class_tokens": "sks"}, "datasets": [
        {"subsets": [{"image_dir": _folder(tmp_path, "r", width=64), "is_reg": True}]}]})
    with pytest.raises(DatasetConfigError, match=r"\[\[datasets\]\] #1: every subset has is_reg"):
        build_dataset(cfg)


# --- determinism, errors ---------------------------------------------------------------------------------

def test_whole_epoch_deterministic_per_seed_and_epoch(tmp_path):
    subsets = [{"image_dir": _folder(tmp_path, "a", n=3, alpha=True), "flip_aug": True, "random_crop": True,
                "color_aug": True, "alpha_mask": True, "num_repeats": 2}]
    one, two = _build(tmp_path, subsets, seed=3, batch_size=2), _build(tmp_path, subsets, seed=3, batch_size=2)
    for e in range(2):
        first, second = list(one.epoch(e)), list(two.epoch(e, prefetch=2))
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
            assert a.flipped == b.flipped and a.captions == b.captions
    pixels = [torch.cat([b.images for b in one.epoch(e)]) for e in range(2)]
    assert not torch.equal(pixels[0], pixels[1])


@pytest.mark.parametrize(
    "general, subset, message",
    [
        ({"flip_aug": "yes"}, {}, r"'flip_aug' in \[general\]: .*boolean.*got str 'yes'"),
        ({}, {"random_crop": 1}, r"'random_crop' in \[\[datasets\]\] #1 > \[\[datasets.subsets\]\] #1: .*boolean"),
        ({"color_aug": 0.5}, {}, r"'color_aug' in \[general\]"),
        ({}, {"is_reg": "true"}, r"'is_reg' in \[\[datasets\]\] #1 > .*boolean"),
        ({"is_reg": True}, {}, r"'is_reg' in \[general\] can only be set inside \[\[datasets.subsets\]\]"),
        ({"alpha_mask": True}, {}, r"'alpha_mask' in \[general\] can only be set inside"),
        ({}, {"alpha_mask": 1}, r"'alpha_mask' in .*boolean"),
        ({}, {"face_crop_aug_range": [2.0, 4.0]},
         r"^dataset option 'face_crop_aug_range' is not supported \(found in \[\[datasets\]\] #1 > .*file name"),
    ],
)
def test_errors(general, subset, message):
    raw = {"general": {"resolution": 64, **general}, "datasets": [{"subsets": [{"image_dir": "x", **subset}]}]}
    with pytest.raises(DatasetConfigError, match=message):
        parse_dataset_config(raw)
