"""kohya's masked_loss with conditioning_data_dir mask folders: the mask image with the image's stem (red
channel / 255, resized, cropped and flipped like the image) is the loss mask; errors list every bad mask."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anima_trainer.cache.build import cache_latents, latent_mask
from anima_trainer.config import ConfigError
from anima_trainer.data import DatasetConfigError, build_dataset, parse_dataset_config
from anima_trainer.train.flow import flow_loss
from anima_trainer.train.inputs import check_masked_loss


def _mask_array() -> np.ndarray:
    """64x64 red channel: 0 left of column 24, 255 from it; rows 0-7 of columns 24-27 are 0 (half a block)."""
    r = np.zeros((64, 64), np.uint8)
    r[:, 24:] = 255
    r[:8, 24:28] = 0
    return r


def _setup(tmp_path: Path, masks: dict[str, np.ndarray | tuple[int, int]] | None = None) -> tuple[str, str]:
    images, cond = tmp_path / "img", tmp_path / "masks"
    images.mkdir()
    cond.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (90, 90, 90)).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text("a photo")
    for stem, spec in (masks if masks is not None else {"a": _mask_array(), "b": _mask_array()}).items():
        if isinstance(spec, tuple):  # a wrong size
            Image.new("RGB", spec, (255, 255, 255)).save(cond / f"{stem}.png")
        else:  # green = 255 - red and blue = 77: only the red channel may be read
            rgb = np.stack([spec, 255 - spec, np.full_like(spec, 77)], -1)
            Image.fromarray(rgb, "RGB").save(cond / f"{stem}.png")
    return str(images), str(cond)


def _build(images: str, cond: str, **subset):
    cfg = parse_dataset_config({"general": {"resolution": 64, "caption_extension": ".txt"},
                                "datasets": [{"subsets": [{"image_dir": images, "conditioning_data_dir": cond,
                                                           **subset}]}]})
    return build_dataset(cfg)


def test_mask_image_gives_the_loss_mask_and_the_masked_mean(tmp_path: Path) -> None:
    ds = _build(*_setup(tmp_path), flip_aug=True)
    assert ds.uses_mask_folders and [i.mask_path.name for i in ds.items] == ["a.png", "b.png"]
    batch = ds.load_batch([0, 1], flips=[False, True])
    red = torch.from_numpy(_mask_array()).float() / 255
    assert torch.equal(batch.masks[0, 0], red)
    assert torch.equal(batch.masks[1, 0], red.flip(-1))  # flipped with its image
    # the loss: kohya's area-resized mask times the element loss, mean over everything (by hand)
    mask = latent_mask(batch.masks[:1], (8, 8))
    by_hand = torch.zeros(8, 8)
    by_hand[:, 3:] = 1.0
    by_hand[0, 3] = 0.5  # 4 of the 8 columns of that 8x8 block are 0
    assert torch.equal(mask[0, 0, 0], by_hand)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 1, 8, 8, generator=g)
    expected = ((pred - target) ** 2 * by_hand).sum() / (16 * 64)
    assert flow_loss(pred, target, torch.tensor([0.5]), mask=mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_latent_cache_keeps_the_mask_and_keys_its_bytes(tmp_path: Path) -> None:
    from anima_trainer.cache.build import latent_key

    ds = _build(*_setup(tmp_path))
    encode = SimpleNamespace(encode=lambda images: torch.zeros(images.shape[0], 16, 1, 8, 8))
    cache, summary = cache_latents(ds, encode, vae_fingerprint="v", dtype=torch.float32, to_disk=False,
                                   progress=False)
    assert summary.built == 2
    assert torch.equal(cache[(0, False)]["mask"], latent_mask(ds.load_batch([0]).masks, (8, 8))[0])
    item = ds.items[0]
    assert latent_key(item, "x", "v", torch.float32, mask_sha="m1") != latent_key(item, "x", "v", torch.float32,
                                                                                  mask_sha="m2")


def test_missing_and_wrongly_sized_masks_are_reported_together(tmp_path: Path) -> None:
    images, cond = _setup(tmp_path, {"b": (32, 64), "zzz": _mask_array()})
    with pytest.raises(DatasetConfigError) as e:
        _build(images, cond)
    msg = str(e.value)
    assert "2 image(s) without a usable loss mask" in msg
    assert "a.png: no mask a.*" in msg and "b.png is 32x64 but b.png is 64x64" in msg


def test_extra_masks_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, cond = _setup(tmp_path, {"a": _mask_array(), "b": _mask_array(), "zzz": _mask_array()})
    with caplog.at_level(logging.WARNING):
        _build(images, cond)
    assert "1 mask(s) in" in caplog.text and "match no image and are not used: zzz" in caplog.text


def test_conditioning_data_dir_conflicts(tmp_path: Path) -> None:
    images, cond = _setup(tmp_path)
    with pytest.raises(DatasetConfigError, match="alpha_mask and conditioning_data_dir both give this subset's "
                                                 "loss mask; keep one of them"):
        _build(images, cond, alpha_mask=True)
    with pytest.raises(DatasetConfigError, match="conditioning_data_dir .*missing_dir is not a folder"):
        _build(images, str(tmp_path / "missing_dir"))


def test_masked_loss_against_the_dataset(tmp_path: Path) -> None:
    ds = _build(*_setup(tmp_path))
    with pytest.raises(ConfigError, match="^masked_loss: the dataset_config has conditioning_data_dir mask folders"):
        check_masked_loss(SimpleNamespace(masked_loss=False), ds)
    assert check_masked_loss(SimpleNamespace(masked_loss=True), ds) is None
    plain = build_dataset(parse_dataset_config({"general": {"resolution": 64, "caption_extension": ".txt"},
                                                "datasets": [{"subsets": [{"image_dir": str(tmp_path / "img")}]}]}))
    note = check_masked_loss(SimpleNamespace(masked_loss=True), plain)
    assert note.startswith("masked_loss = true: no subset has conditioning_data_dir or alpha_mask")
    assert check_masked_loss(SimpleNamespace(masked_loss=False), plain) is None
