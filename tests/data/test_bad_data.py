"""Bad data: every broken / odd file is either converted correctly or skipped with a reason at start-up.

The corpus is generated here (Pillow + hand-written bytes), nothing is committed."""

from __future__ import annotations

import io
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from anima_trainer.data import DatasetConfigError, build_dataset, parse_dataset_config
from anima_trainer.data import images as images_mod
from anima_trainer.data.images import (
    ImageReadError,
    ImageRejected,
    load_image,
    probe_image,
)
from anima_trainer.data.textfiles import decode_text

# --- writers -------------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes | None) -> bytes:
    """A PNG from filtered scanlines (`raw`, filter byte 0 per row); raw=None writes an empty IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw if raw is not None else b"")
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _rgb16_png(path: Path, w: int, h: int, rgb: tuple[int, int, int]) -> Path:
    row = b"\x00" + struct.pack(">HHH", *rgb) * w
    path.write_bytes(_png_bytes(w, h, 16, 2, row * h))
    return path


def _noise(size=(256, 256), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _toml(folder: Path, **dataset) -> dict:
    ds = {"resolution": 256, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 512,
          "batch_size": 2, **dataset}
    ds["subsets"] = [{"image_dir": str(folder), "caption_extension": ".txt", "class_tokens": "sks"}]
    return parse_dataset_config({"datasets": [ds]})


# --- the corpus ------------------------------------------------------------------------------------------------

HUGE = (15000, 15000)  # 225 MP: above MAX_IMAGE_PIXELS (179 MP), below Pillow's own hard error (358 MP)


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (128, 96), (255, 0, 0)).save(d / "good.png")
    (d / "good.txt").write_bytes(b"caf\xe9 \x93quoted\x94")  # cp1252
    png = _encoded(_noise(), "PNG")
    (d / "trunc.png").write_bytes(png[: len(png) // 2])
    jpg = _encoded(_noise(), "JPEG", quality=90)
    (d / "trunc.jpg").write_bytes(jpg[: int(len(jpg) * 0.6)])
    (d / "trailing.jpg").write_bytes(jpg + b"camera trailer data")  # valid JPEG + junk after EOI: kept
    (d / "tail.png").write_bytes(png + b"junk after IEND")  # kept
    (d / "empty.png").write_bytes(b"")
    (d / "notimg.jpg").write_text("<html>403 Forbidden</html>")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)
    _rgb16_png(d / "rgb16.png", 64, 64, (0xFFFF, 0x8000, 0x0000))
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(d / "grey16.png")
    p = Image.new("P", (64, 64), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (32, 0, 64, 64))
    p.save(d / "pal.png", transparency=0)
    Image.new("LA", (64, 64), (0, 128)).save(d / "la.png")
    (d / "huge.png").write_bytes(_png_bytes(*HUGE, 8, 2, None))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(d / "tiny.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(d / "dup.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(d / "dup.jpg")
    (d / "dup.txt").write_text("shared caption", encoding="utf-8")
    os.symlink("loop.png", d / "loop.png")  # points at itself
    os.symlink("missing.png", d / "broken.png")
    os.symlink(".", d / "folder.png")  # a folder (loops back to imgs/) with an image extension
    return d


EXPECTED_SKIPS = {
    "broken.png": "broken symlink (-> missing.png)",
    "dup.jpg": "duplicate stem: same name as dup.png, which is used instead",
    "empty.png": "empty file (0 bytes)",
    "folder.png": "not a regular file",
    "huge.png": f"too large: {HUGE[0]}x{HUGE[1]} = {HUGE[0] * HUGE[1]:,} pixels > limit 178,956,970 "
                "(anima_trainer.data.images.MAX_IMAGE_PIXELS; downscale the file)",
    "loop.png": "symlink loop",
    "notimg.jpg": "not an image Pillow can identify (wrong extension or corrupt header)",
    "trunc.jpg": "truncated or corrupt JPEG (",
    "trunc.png": "truncated or corrupt PNG (",
}


def test_corpus_skips_and_reports(corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="anima_trainer.data.scan"):
        ds = build_dataset(_toml(corpus, resolution=64))
    skipped = {p.name: reason for p, reason in ds.skipped}
    assert sorted(skipped) == sorted(EXPECTED_SKIPS)
    for name, reason in EXPECTED_SKIPS.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
    assert all(isinstance(p, Path) and p.parent == corpus for p, _ in ds.skipped)
    assert [p.name for p, _ in ds.skipped] == sorted(skipped)  # scan order: by file name

    used = sorted(it.path.name for it in ds.items)
    assert used == ["cmyk.jpg", "dup.png", "good.png", "grey16.png", "la.png", "pal.png", "rgb16.png",
                    "tail.png", "tiny.png", "trailing.jpg"]
    captions = {it.path.name: it.caption for it in ds.items}
    assert captions["good.png"] == "café \u201cquoted\u201d"  # cp1252 curly quotes
    assert captions["dup.png"] == "shared caption"
    notices = {p.name: msg for p, msg in ds.notices}
    assert notices["good.txt"].startswith("not valid UTF-8; decoded as cp1252")
    assert notices["tiny.png"].startswith("upscaled: 8x8 -> 64x64 (8.0x) for bucket 64x64")
    assert set(notices) == {"good.txt", "tiny.png"}

    # one summary warning each, with counts and the first paths
    summaries = [r.getMessage() for r in caplog.records if r.name == "anima_trainer.data.scan"]
    (skip_line,) = [m for m in summaries if "skipped" in m]
    assert skip_line.startswith(f"dataset: skipped {len(EXPECTED_SKIPS)} file(s)")
    assert "1 x symlink loop: " + str(corpus / "loop.png") in skip_line
    assert "1 x empty file: " in skip_line
    assert any("2 file(s) used with a caveat" in m for m in summaries)

    # the whole epoch loads: nothing left that fails mid-run
    batches = list(ds.epoch(0, prefetch=2))
    assert sum(len(b.paths) for b in batches) == len(ds.items)


def test_conversions_pixel_values(corpus):
    cmyk = load_image(corpus / "cmyk.jpg")
    assert cmyk.mode == "RGB"
    r, g, b = cmyk.getpixel((32, 32))
    assert r > 245 and g < 10 and b < 10
    assert load_image(corpus / "rgb16.png").getpixel((5, 5)) == (255, 128, 0)  # 16-bit RGB: high byte
    assert load_image(corpus / "grey16.png").getpixel((5, 5)) == (128, 128, 128)  # 32768 / 257, rounded
    pal = load_image(corpus / "pal.png")
    assert pal.getpixel((0, 0)) == (255, 255, 255) and pal.getpixel((63, 0)) == (0, 255, 0)
    la = load_image(corpus / "la.png")  # black at alpha 128/255 over white
    assert all(abs(c - 127) <= 1 for c in la.getpixel((10, 10)))
    assert load_image(corpus / "trailing.jpg").size == (256, 256)
    for name in ("cmyk.jpg", "rgb16.png", "grey16.png", "pal.png", "la.png"):
        info = probe_image(corpus / name)
        assert info.size == (64, 64)
    assert probe_image(corpus / "grey16.png").mode.startswith("I")


def test_grey16_colour_key_transparency(tmp_path):
    arr = np.array([[1000, 2000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "k.png", transparency=1000)
    im = load_image(tmp_path / "k.png")
    assert im.getpixel((0, 0)) == (255, 255, 255)  # the key value is transparent -> white
    assert im.getpixel((1, 0)) == (8, 8, 8)  # 2000 / 257 = 7.8


def test_decompression_bomb_limit_monkeypatched(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 9_999)
    with pytest.raises(ImageRejected) as e:
        probe_image(tmp_path / "a.png")
    assert e.value.reason.startswith("too large: 100x100 = 10,000 pixels > limit 9,999")
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 10_000)
    assert probe_image(tmp_path / "a.png").size == (100, 100)
    # Pillow's own limit was raised to ours, so accepted images never warn
    assert Image.MAX_IMAGE_PIXELS >= 178_956_970


def test_beyond_pillows_hard_limit(tmp_path):
    (tmp_path / "x.png").write_bytes(_png_bytes(30000, 30000, 8, 2, None))  # 900 MP: Pillow refuses to open
    with pytest.raises(ImageRejected, match="too large: above Pillow's limit"):
        probe_image(tmp_path / "x.png")


def test_truncated_webp_and_bmp(tmp_path):
    webp = _encoded(_noise((64, 64)), "WEBP")
    bmp = _encoded(_noise((64, 64)), "BMP")
    (tmp_path / "w.webp").write_bytes(webp[: len(webp) - 20])
    (tmp_path / "b.bmp").write_bytes(bmp[: len(bmp) - 100])
    for name, prefix in (("w.webp", ""), ("b.bmp", f"truncated BMP ({len(bmp) - 100} of {len(bmp)} bytes)")):
        with pytest.raises(ImageRejected) as e:
            probe_image(tmp_path / name)
        assert e.value.reason.startswith(prefix) and ("truncated" in e.value.reason or "unreadable" in e.value.reason)


def test_corrupt_inside_data_found_at_load_or_with_verify(tmp_path):
    """Damage that keeps the length and the end marker is invisible to the quick checks: load names the file,
    and verify_images=True moves the failure to start-up."""
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "ok.png")
    png = bytearray(_encoded(_noise((64, 64)), "PNG", compress_level=0))
    start = png.index(b"IDAT") + 4
    png[start + 2: start + 400] = b"\xff" * 398  # inside the zlib stream; chunk length and IEND intact
    (d / "bad.png").write_bytes(bytes(png))
    ds = build_dataset(_toml(d, resolution=64, min_bucket_reso=64, max_bucket_reso=64))
    assert ds.skipped == []
    bad = next(i for i, it in enumerate(ds.items) if it.path.name == "bad.png")
    with pytest.raises(ImageReadError, match=r"cannot decode image .*bad\.png.*verify_images=True"):
        ds.load_item(bad)
    ds = build_dataset(_toml(d, resolution=64, min_bucket_reso=64, max_bucket_reso=64), verify_images=True)
    assert [p.name for p, _ in ds.skipped] == ["bad.png"]
    assert ds.skipped[0][1].startswith("unreadable: ")
    assert [it.path.name for it in ds.items] == ["ok.png"]


def test_tiny_images_no_upscale_and_extreme_aspect(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "tiny.png")
    Image.new("RGB", (200, 100)).save(d / "ok.png")
    Image.new("RGB", (4000, 4)).save(d / "strip.png")
    ds = build_dataset(_toml(d, bucket_no_upscale=True))
    assert ds.skipped == [
        (d / "strip.png",
         "too small: image of size 4000x4 is too small for bucket_reso_steps 64 with bucket_no_upscale"),
        (d / "tiny.png", "too small: image of size 8x8 is too small for bucket_reso_steps 64 with bucket_no_upscale"),
    ]
    ds = build_dataset(_toml(d))  # normal mode: tiny is upscaled (kohya), the strip would be a 256x256000 resize
    assert [p.name for p, _ in ds.skipped] == ["strip.png"]
    assert ds.skipped[0][1].startswith("extreme aspect ratio: 4000x4 would be resized to ")
    assert sorted(it.path.name for it in ds.items) == ["ok.png", "tiny.png"]


def test_subset_with_only_bad_files_is_an_error(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    (d / "b.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetConfigError, match=r"no usable images in image_dir .*: 1 x empty file: .*a\.png; "
                                                 r"1 x not an image Pillow can identify: .*b\.jpg"):
        build_dataset(_toml(d))


def test_same_file_in_two_datasets_reported_once(corpus):
    cfg = _toml(corpus, resolution=64)
    raw = {"datasets": [dict(cfg.datasets[0].model_dump(exclude_none=True)) for _ in range(2)]}
    raw["datasets"][1]["resolution"] = [128, 128]
    raw["datasets"][1]["min_bucket_reso"] = 64
    ds = build_dataset(parse_dataset_config(raw))
    assert len(ds.skipped) == len(EXPECTED_SKIPS)
    assert len({it.dataset_index for it in ds.items}) == 2


def test_decode_text_fallbacks():
    assert decode_text("héllo".encode()) == ("héllo", "utf-8")
    assert decode_text(b"\xef\xbb\xbfbom") == ("bom", "utf-8")
    assert decode_text("ハロー".encode("utf-16")) == ("ハロー", "utf-16")
    assert decode_text(b"\x93a\x94") == ("\u201ca\u201d", "cp1252")
    assert decode_text(b"\x81x") == ("\x81x", "latin-1")  # 0x81 is undefined in cp1252


# --- scanning never decodes pixels --------------------------------------------------------------------------------

def test_scan_reads_headers_only(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    big = Image.new("RGB", (6000, 4000), (10, 20, 30))  # 72 MP: a decode would take ~0.3 s and 72 MB
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(d / "big.png", compress_level=1, exif=exif)  # PNG eXIf before IDAT (Pillow writes it there)
    big.save(d / "plain.png", compress_level=1)
    big.save(d / "photo.jpg", quality=50, exif=exif)
    Image.new("RGB", (64, 64)).save(d / "small.webp")
    Image.new("RGB", (64, 64)).save(d / "other.bmp")
    loads = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loads.append(getattr(self, "filename", "?"))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    t0 = time.perf_counter()
    ds = build_dataset(_toml(d, resolution=512, max_bucket_reso=1024))
    elapsed = time.perf_counter() - t0
    assert loads == []
    assert elapsed < 2.0
    sizes = {it.path.name: it.size for it in ds.items}
    assert sizes == {"big.png": (4000, 6000), "plain.png": (6000, 4000), "photo.jpg": (4000, 6000),
                     "small.webp": (64, 64), "other.bmp": (64, 64)}
    # and loading applies the same orientation the scan saw
    assert load_image(d / "big.png").size == (4000, 6000)
    assert set(loads) == {str(d / "big.png")}  # the counter does see decodes
