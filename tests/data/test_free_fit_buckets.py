"""bucket_free_fit (beautifulrem/sd-scripts fork key, issue 14): one bucket per image at the target area, aspect
ratio kept, sides rounded down to bucket_reso_steps within min/max_bucket_reso.  Expectations hand-computed:
A = 1024 * 1024, r = w / h, ideal sides sqrt(A * r) x sqrt(A / r), then the bounds, then floor to the step."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from anima_trainer.data import BucketSelector, DatasetConfigError, build_dataset, parse_dataset_config, resolve_datasets
from anima_trainer.data.buckets import crop_offsets, free_fit_bucket

A = 1024 * 1024


@pytest.mark.parametrize(("image", "step", "lo", "hi", "bucket"), [
    # 3:2: sqrt(A*1.5) = 1254.1 -> 1216 (64) / 1248 (16); sqrt(A/1.5) = 836.1 -> 832
    ((1536, 1024), 64, 256, 2048, (1216, 832)),
    ((1536, 1024), 16, 256, 2048, (1248, 832)),
    # 1:1: exactly 1024 (no float noise dropping a step)
    ((1000, 1000), 64, 256, 2048, (1024, 1024)),
    ((1000, 1000), 16, 256, 2048, (1024, 1024)),
    # 9:16: sqrt(A*0.5625) = 768, sqrt(A/0.5625) = 1365.3 -> 1344 (64) / 1360 (16)
    ((900, 1600), 64, 256, 2048, (768, 1344)),
    ((900, 1600), 16, 256, 2048, (768, 1360)),
    # a tiny 2:3 image is upscaled to the target area: 836.1 x 1254.1 -> 832 x 1216
    ((100, 150), 64, 256, 2048, (832, 1216)),
    # 4:1 with max 1536: ideal 2048 x 512 is above max, both scale by 0.75 (aspect kept) -> 1536 x 384
    ((2048, 512), 64, 256, 1536, (1536, 384)),
    # 1:8 with min 512: ideal 362 x 2896 -> max scales to 256 x 2048 -> min raises the width to 512, height
    # min(2048, 512*8, A/512 = 2048) = 2048
    ((256, 2048), 64, 512, 2048, (512, 2048)),
    # 1:4 with min 768: ideal 512 x 2048 -> width 768, height min(2048, 3072, A/768 = 1365.3) -> 1344 (area <= A)
    ((500, 2000), 64, 768, 2048, (768, 1344)),
])
def test_free_fit_bucket_hand_computed(image, step, lo, hi, bucket):
    assert free_fit_bucket(image, A, lo, hi, step) == bucket
    assert BucketSelector((1024, 1024), lo, hi, step, free_fit=True).select(image).bucket == bucket


def test_tiny_image_is_covered_and_centre_cropped_as_usual():
    choice = BucketSelector((1024, 1024), 256, 2048, 64, free_fit=True).select((100, 150))
    # 100/150 < 832/1216: widths match, scale 8.32 -> 832 x 1248, 32 px of height cropped (16 top)
    assert (choice.bucket, choice.resized) == ((832, 1216), (832, 1248))
    assert crop_offsets(choice.resized, choice.bucket) == (0, 16)


@pytest.mark.parametrize(("step", "lo", "hi"), [(16, 256, 2048), (64, 256, 1536), (64, 512, 2048), (16, 1024, 1024)])
def test_free_fit_area_never_exceeds_target_and_bounds_hold(step, lo, hi):
    sides = [1, 7, 64, 100, 333, 512, 777, 1000, 1024, 1500, 2047, 3000, 8000]
    for iw in sides:
        for ih in sides:
            bw, bh = free_fit_bucket((iw, ih), A, lo, hi, step)
            assert bw * bh <= A, (iw, ih, bw, bh)
            assert bw % step == 0 and bh % step == 0, (iw, ih, bw, bh)
            assert lo <= bw <= hi and lo <= bh <= hi, (iw, ih, bw, bh)


def test_free_fit_differs_from_the_predefined_list():
    """4:3: the predefined list's nearest ratio is 1152 x 896 (kohya); free fit floors sqrt(A*4/3) = 1182.4 and
    sqrt(A*3/4) = 886.8 to 1152 x 832, and the image is covered at 1152 x 864."""
    assert BucketSelector((1024, 1024), 256, 2048, 64).select((1024, 768)).bucket == (1152, 896)
    choice = BucketSelector((1024, 1024), 256, 2048, 64, free_fit=True).select((1024, 768))
    assert (choice.bucket, choice.resized) == ((1152, 832), (1152, 864))


# --- dataset.toml ---------------------------------------------------------------------------------------------

def _raw(general: dict | None = None, dataset: dict | None = None, subset: dict | None = None) -> dict:
    return {"general": {"resolution": 1024, "enable_bucket": True, "max_bucket_reso": 2048, **(general or {})},
            "datasets": [{**(dataset or {}), "subsets": [{"image_dir": "imgs", **(subset or {})}]}]}


def test_key_accepted_in_general_and_datasets_dataset_wins():
    assert resolve_datasets(parse_dataset_config(_raw()))[0].bucket_free_fit is False  # default off
    assert resolve_datasets(parse_dataset_config(_raw(general={"bucket_free_fit": True})))[0].bucket_free_fit is True
    assert resolve_datasets(parse_dataset_config(_raw(dataset={"bucket_free_fit": True})))[0].bucket_free_fit is True
    both = _raw(general={"bucket_free_fit": True}, dataset={"bucket_free_fit": False})
    assert resolve_datasets(parse_dataset_config(both))[0].bucket_free_fit is False


def test_key_refused_in_a_subset_like_bucket_no_upscale():
    for key in ("bucket_free_fit", "bucket_no_upscale"):
        with pytest.raises(DatasetConfigError) as e:
            parse_dataset_config(_raw(subset={key: True}))
        assert str(e.value) == (f"'{key}' in [[datasets]] #1 > [[datasets.subsets]] #1 is a dataset-level option; "
                                "set it in [[datasets]] or [general] instead")


def test_free_fit_with_no_upscale_is_an_error_naming_both():
    raw = _raw(general={"bucket_no_upscale": True}, dataset={"bucket_free_fit": True})
    with pytest.raises(DatasetConfigError) as e:
        resolve_datasets(parse_dataset_config(raw))
    assert str(e.value) == (
        "[[datasets]] #1: bucket_free_fit = true and bucket_no_upscale = true are mutually exclusive (free fit "
        "upscales every image to the target area; no_upscale keeps small images at their size); set one of them "
        "to false")
    with pytest.raises(ValueError, match="mutually exclusive"):
        BucketSelector((1024, 1024), 256, 2048, 64, no_upscale=True, free_fit=True)


def test_without_enable_bucket_free_fit_warns_and_has_no_effect(caplog):
    raw = _raw(general={"enable_bucket": False, "bucket_free_fit": True})
    with caplog.at_level(logging.WARNING, logger="anima_trainer.data.params"):
        params = resolve_datasets(parse_dataset_config(raw))
    assert params[0].bucket_free_fit is False
    assert "bucket_free_fit = true has no effect without enable_bucket = true" in caplog.text


def test_build_dataset_uses_free_fit_buckets_and_prints_a_notice(tmp_path: Path, caplog):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name, size in {"wide": (96, 64), "tiny": (20, 20)}.items():
        Image.new("RGB", size, (120, 30, 200)).save(imgs / f"{name}.png")
        (imgs / f"{name}.txt").write_text(name, encoding="utf-8")
    raw = {"general": {"resolution": 64, "enable_bucket": True, "bucket_free_fit": True, "bucket_reso_steps": 16,
                       "min_bucket_reso": 32, "max_bucket_reso": 128, "caption_extension": ".txt"},
           "datasets": [{"subsets": [{"image_dir": str(imgs)}]}]}
    with caplog.at_level(logging.INFO, logger="anima_trainer.data.params"):
        ds = build_dataset(parse_dataset_config(raw))
    got = {item.path.stem: (item.bucket, item.resized) for item in ds.items}
    # A = 4096; 3:2 -> 78.4 x 52.3 -> 64 x 48 (covered at 72 x 48); 20x20 -> 64 x 64 (upscaled)
    assert got == {"wide": ((64, 48), (72, 48)), "tiny": ((64, 64), (64, 64))}
    assert "bucket_free_fit = true: each image gets its own bucket of area <= 64x64" in caplog.text
    notices = {path.name: msg for path, msg in ds.notices}
    assert notices == {"tiny.png": "upscaled: 20x20 -> 64x64 (3.2x) for bucket 64x64 (bucket_free_fit upscales to "
                                   "the target area)"}
