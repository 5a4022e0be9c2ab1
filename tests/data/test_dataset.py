"""dataset.toml parsing / precedence / errors, and the dataset over generated images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from anima_trainer.data import (
    DatasetConfigError,
    build_dataset,
    load_dataset_config,
    parse_dataset_config,
    resolve_datasets,
)
from anima_trainer.data.images import image_size, load_image


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _cfg(**general):
    return {"general": general, "datasets": [{"subsets": [{"image_dir": "/nowhere"}]}]}


# --- config: precedence ------------------------------------------------------------------------------------

def test_precedence_subset_dataset_general_defaults(tmp_path):
    toml = _write(tmp_path / "d.toml", """
[general]
resolution = 1024
batch_size = 4
num_repeats = 2
class_tokens = "sks girl"
enable_bucket = true
max_bucket_reso = 2048

[[datasets]]
batch_size = 2
caption_extension = "txt"

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "b"
  caption_extension = ".tags"
  class_tokens = "sks boy"

[[datasets]]
resolution = [768, 512]
min_bucket_reso = 256

  [[datasets.subsets]]
  image_dir = "a"
""")
    cfg = load_dataset_config(toml)
    assert cfg.source_dir == tmp_path.resolve()
    d0, d1 = resolve_datasets(cfg, default_batch_size=8)
    assert d0.resolution == (1024, 1024) and d0.batch_size == 2 and d0.enable_bucket
    assert d0.max_bucket_reso == 2048 and d0.min_bucket_reso == 256 and d0.bucket_reso_steps == 64
    a, b = d0.subsets
    assert (a.num_repeats, a.caption_extension, a.class_tokens) == (10, ".txt", "sks girl")
    assert (b.num_repeats, b.caption_extension, b.class_tokens) == (2, ".tags", "sks boy")
    assert d1.resolution == (768, 512) and d1.batch_size == 4  # general beats the caller default
    assert d1.subsets[0].caption_extension == ".caption"  # kohya's DreamBooth default


def test_caller_default_batch_size_and_builtin_defaults():
    cfg = parse_dataset_config({"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x"}]}]})
    (d,) = resolve_datasets(cfg, default_batch_size=3)
    assert d.batch_size == 3
    assert (d.enable_bucket, d.bucket_no_upscale, d.subsets[0].num_repeats) == (False, False, 1)
    (d,) = resolve_datasets(cfg)
    assert d.batch_size == 1


def test_duplicate_subset_dropped_and_zero_repeats_skipped():
    cfg = parse_dataset_config({"datasets": [{"resolution": 512, "subsets": [
        {"image_dir": "x"}, {"image_dir": "x", "num_repeats": 5}, {"image_dir": "y", "num_repeats": 0}]}]})
    (d,) = resolve_datasets(cfg)
    assert [s.image_dir.name for s in d.subsets] == ["x"]


# --- config: errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, message",
    [
        (_cfg(resolutoin=512), r"unknown dataset option 'resolutoin' in \[general\]; did you mean 'resolution'"),
        ({"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x", "num_repeat": 2}]}]},
         r"'num_repeat' in \[\[datasets\]\] #1 > \[\[datasets.subsets\]\] #1; did you mean 'num_repeats'"),
        (_cfg(color_aug=1), r"^dataset option 'color_aug' in \[general\]: .*boolean"),
        (_cfg(face_crop_aug_range=[2.0, 4.0]), r"'face_crop_aug_range' is not supported .*file name"),
        ({"datasets": [{"subsets": [{"image_dir": "x", "resolution": 512}]}]}, "'resolution' .* dataset-level"),
        (_cfg(image_dir="x"), r"'image_dir' in \[general\] can only be set inside \[\[datasets.subsets\]\]"),
        (_cfg(num_repeats="3"), r"'num_repeats' in \[general\].*got str '3'"),
        (_cfg(enable_bucket="yes"), r"'enable_bucket' in \[general\]"),
        (_cfg(resolution=[512]), r"'resolution' in \[general\].*\[width, height\]"),
        (_cfg(batch_size=0), r"'batch_size' in \[general\]"),
        (_cfg(bucket_reso_steps=8), r"'bucket_reso_steps' .*multiple of 16"),
        (_cfg(bucket_reso_steps=40), "multiple of 16 for Anima"),
        ({"datasets": [{"subsets": []}]}, r"\[\[datasets\]\] #1 has no \[\[datasets.subsets\]\]"),
        ({"general": {}}, r"no \[\[datasets\]\]"),
        ({"datasets": [{"subsets": [{"num_repeats": 1}]}]}, "has no image_dir"),
        ({"dataset": []}, "did you mean 'datasets'"),
    ],
)
def test_config_errors(raw, message):
    with pytest.raises(DatasetConfigError, match=message):
        parse_dataset_config(raw)


def test_steps_multiple_of_16_accepted():
    for steps in (16, 32, 48, 64):
        parse_dataset_config(_cfg(bucket_reso_steps=steps))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"datasets": [{"subsets": [{"image_dir": "x"}]}]}, "'resolution' is required"),
        ({"general": {"resolution": 2048, "enable_bucket": True}, "datasets": [{"subsets": [{"image_dir": "x"}]}]},
         r"max_bucket_reso \(1024\) must be >= the larger side"),
        ({"general": {"resolution": 200, "enable_bucket": True}, "datasets": [{"subsets": [{"image_dir": "x"}]}]},
         r"min_bucket_reso \(256\) must be <="),
        ({"general": {"resolution": 500}, "datasets": [{"subsets": [{"image_dir": "x"}]}]},
         "multiple of 16"),
    ],
)
def test_resolve_errors(raw, message):
    cfg = parse_dataset_config(raw)
    with pytest.raises(DatasetConfigError, match=message):
        resolve_datasets(cfg)


def test_load_errors(tmp_path):
    with pytest.raises(DatasetConfigError, match="does not exist"):
        load_dataset_config(tmp_path / "missing.toml")
    bad = _write(tmp_path / "bad.toml", "[general\nresolution = 1")
    with pytest.raises(DatasetConfigError, match="not valid TOML"):
        load_dataset_config(bad)
    typo = _write(tmp_path / "typo.toml",
                  "[general]\nbatchsize = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\n")
    with pytest.raises(DatasetConfigError, match=r"typo.toml: unknown dataset option 'batchsize'.*'batch_size'"):
        load_dataset_config(typo)


def test_missing_image_dir_named(tmp_path):
    cfg = parse_dataset_config({"general": {"resolution": 512},
                                "datasets": [{"subsets": [{"image_dir": str(tmp_path / "nope")}]}]})
    with pytest.raises(DatasetConfigError, match=r"image_dir .*nope.* is not a folder"):
        build_dataset(cfg)


# --- images ------------------------------------------------------------------------------------------------

def _solid(path: Path, size, color, mode="RGB", **save):
    Image.new(mode, size, color).save(path, **save)
    return path


def test_alpha_composited_on_white(tmp_path):
    im = Image.new("RGBA", (8, 4), (0, 0, 0, 0))  # transparent black
    im.paste((255, 0, 0, 255), (4, 0, 8, 4))  # right half opaque red
    im.save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((7, 3)) == (255, 0, 0)
    # palette image with a transparent index
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (2, 0, 4, 4))
    p.save(tmp_path / "p.png", transparency=0)
    rgb = load_image(tmp_path / "p.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((3, 0)) == (0, 255, 0)
    # greyscale converts to RGB
    _solid(tmp_path / "l.png", (4, 4), 128, mode="L")
    assert load_image(tmp_path / "l.png").getpixel((1, 1)) == (128, 128, 128)


def _exif_rotated(path: Path) -> Path:
    """Stored 400x200, left half red / right half blue, EXIF orientation 6 (display rotated 90 deg clockwise)."""
    im = Image.new("RGB", (400, 200), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation(tmp_path):
    path = _exif_rotated(tmp_path / "e.jpg")
    assert image_size(path) == (200, 400)
    im = load_image(path)
    assert im.size == (200, 400)
    top, bottom = im.getpixel((100, 50)), im.getpixel((100, 350))
    assert top[0] > 200 and top[2] < 60  # stored left (red) is displayed on top
    assert bottom[2] > 200 and bottom[0] < 60


# --- dataset -----------------------------------------------------------------------------------------------

@pytest.fixture()
def folder(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _solid(one / "a.png", (640, 480), (255, 0, 0))
    _write(one / "a.caption", "  a red cat  \n")
    _solid(one / "b.jpg", (480, 640), (0, 0, 255), quality=95)
    (one / "b.caption").write_bytes("\ufeffb blue dog, ÿ\nsecond line ignored\n".encode())
    _solid(one / "c.png", (512, 512), (0, 255, 0))  # no caption -> class_tokens
    _write(one / "notes.md", "not an image")
    im = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    im.save(two / "d.PNG")
    _write(two / "d.caption", "transparent")
    _exif_rotated(two / "e.jpg")
    _write(two / "e.caption", "rotated")
    _write(tmp_path / "dataset.toml", """
[general]
resolution = 512
enable_bucket = true
batch_size = 2
class_tokens = "sks"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "one"
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = "two"
""")
    return tmp_path


def test_dataset_over_generated_images(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)  # image_dir is relative: found via the config's folder
    ds = build_dataset(load_dataset_config(folder / "dataset.toml"), seed=1)
    assert ds.num_images == 5
    assert ds.num_train_items == 3 * 3 + 2
    by_name = {it.path.name: it for it in ds.items}
    assert by_name["a.png"].caption == "a red cat"
    assert by_name["b.jpg"].caption == "b blue dog, ÿ"
    assert by_name["c.png"].caption == "sks"
    # resolution 512 buckets (hand-computed in test_buckets): 640x480 (AR 1.333) -> 576x448 (err .048 vs
    # 640x384 .333), resized to round(640*448/480)=597 x 448; 480x640 -> 448x576; 512x512 exact;
    # EXIF 200x400 (AR .5) -> 320x704 (err .045; 320x768 .083, 384x640 .1), wider -> heights: 352x704.
    assert (by_name["a.png"].bucket, by_name["a.png"].resized) == ((576, 448), (597, 448))
    assert by_name["b.jpg"].bucket == (448, 576)
    assert by_name["c.png"].bucket == by_name["d.PNG"].bucket == (512, 512)
    assert (by_name["e.jpg"].size, by_name["e.jpg"].bucket, by_name["e.jpg"].resized) == (
        (200, 400), (320, 704), (352, 704))
    assert ds.bucket_table() == [(320, 704, 1), (448, 576, 3), (512, 512, 4), (576, 448, 3)]
    assert len(ds) == 1 + 2 + 2 + 2  # ceil per bucket with batch_size 2, partial batches kept

    batches = list(ds.epoch(0))
    assert len(batches) == len(ds)
    seen = Counter()
    for batch in batches:
        w, h = batch.bucket
        assert batch.images.dtype == torch.float32
        assert batch.images.shape == (len(batch.paths), 3, h, w)
        assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
        assert len(batch.captions) == len(batch.paths) <= 2
        assert all(it.bucket == batch.bucket for it in batch.items)
        seen.update(p.name for p in batch.paths)
        for img, path in zip(batch.images, batch.paths):
            mean = img.mean(dim=(1, 2))
            if path.name == "a.png":
                assert mean[0] > 0.95 and mean[1] < 0.05
            if path.name == "d.PNG":  # fully transparent -> white
                assert torch.all(img > 0.99)
            if path.name == "e.jpg":  # top red, bottom blue after rotation; centre crop of 352 -> 320 wide
                assert img[0, :300].mean() > 0.9 and img[2, -300:].mean() > 0.9
    assert seen == {"a.png": 3, "b.jpg": 3, "c.png": 3, "d.PNG": 1, "e.jpg": 1}


def test_epoch_determinism(folder):
    cfg = load_dataset_config(folder / "dataset.toml")
    ds = build_dataset(cfg, seed=7)
    plans = [ds.batch_plan(e) for e in range(6)]
    again = build_dataset(cfg, seed=7)
    assert [again.batch_plan(e) for e in range(6)] == plans
    assert len({str(p) for p in plans}) > 1  # epochs differ
    assert build_dataset(cfg, seed=8).batch_plan(0) != plans[0] or build_dataset(cfg, seed=9).batch_plan(0) != plans[0]
    first = list(ds.epoch(3))
    second = list(again.epoch(3, prefetch=2))
    assert [b.paths for b in first] == [b.paths for b in second]
    assert all(torch.equal(x.images, y.images) for x, y in zip(first, second))


def test_no_bucket_and_no_upscale(folder):
    raw = {"datasets": [{"resolution": [320, 256], "batch_size": 4,
                         "subsets": [{"image_dir": str(folder / "one"), "class_tokens": "x"}]}]}
    ds = build_dataset(parse_dataset_config(raw))
    assert ds.bucket_table() == [(320, 256, 3)]
    (batch,) = list(ds.epoch(0))
    assert batch.images.shape == (3, 3, 256, 320)

    raw = {"datasets": [{"resolution": 256, "enable_bucket": True, "bucket_no_upscale": True, "bucket_reso_steps": 64,
                         "subsets": [{"image_dir": str(folder / "one"), "class_tokens": "x"}]}]}
    ds = build_dataset(parse_dataset_config(raw))
    # area 65536: 640x480 -> rw = sqrt(65536*4/3) = 295.6 -> 256, h round(192) = 192 (AR 1.333, exact) vs
    # rh = 221.7 -> 192, w round(256) = 256: tie -> height variant (256, 192); 480x640 -> (192, 256);
    # 512x512 -> 256x256
    assert {it.path.name: it.bucket for it in ds.items} == {"a.png": (256, 192), "b.jpg": (192, 256),
                                                           "c.png": (256, 256)}


def test_missing_caption_without_class_tokens_with_strict_captions(folder):
    # the default (kohya: an empty caption, reported) is tested in tests/data/test_uncaptioned.py
    raw = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": str(folder / "one")}]}]}
    with pytest.raises(DatasetConfigError, match=r"1 image\(s\) have no caption file \(.caption\) and "
                                                 r"strict_captions is on: .*c.png"):
        build_dataset(parse_dataset_config(raw), strict_captions=True)
    _write(folder / "one" / "c.txt", "green")
    with pytest.raises(DatasetConfigError, match=r'found c.txt: set caption_extension = ".txt"'):
        build_dataset(parse_dataset_config(raw), strict_captions=True)


def test_empty_image_dir(tmp_path):
    raw = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": str(tmp_path)}]}]}
    with pytest.raises(DatasetConfigError, match="no images"):
        build_dataset(parse_dataset_config(raw))
