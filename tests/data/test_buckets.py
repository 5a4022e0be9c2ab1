"""Bucket generation and assignment against values computed by hand from kohya's rules
(docs: kohya_anima.md §2.4).  The expected numbers below were worked out on paper, not by running the code."""

from __future__ import annotations

import pytest

from anima_trainer.data.buckets import BucketSelector, cover_size, crop_offsets, make_bucket_resolutions


def _both(pairs):
    return sorted({p for a, b in pairs for p in ((a, b), (b, a))})


def test_buckets_1024_step64_default_max():
    # max_area = 1024^2; for every w in 256..1024, floor(floor(A/w)/64)*64 >= 1024, so h = max = 1024.
    expected = _both([(w, 1024) for w in range(256, 1025, 64)])
    got = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert got == expected
    assert len(got) == 25  # the doc's count


def test_buckets_1024_step64_max2048():
    # h(w) = min(2048, floor(floor(1048576 / w) / 64) * 64), hand-computed per w:
    # 256..512 -> 2048; 576 -> 1792; 640 -> 1600; 704 -> 1472; 768 -> 1344; 832 -> 1216; 896 -> 1152;
    # 960 -> 1088; 1024 -> 1024; 1088 -> 960; 1152 -> 896; 1216 -> 832; 1280 -> 768; 1344 -> 768;
    # 1408 -> 704; 1472 -> 704; 1536 -> 640; 1600 -> 640; 1664 -> 576; 1728 -> 576; 1792 -> 576;
    # 1856 -> 512; 1920 -> 512; 1984 -> 512; 2048 -> 512.
    pairs = [(256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 2048), (576, 1792), (640, 1600),
             (704, 1472), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1280, 768),
             (1408, 704), (1536, 640), (1664, 576), (1728, 576), (1856, 512), (1920, 512), (1984, 512)]
    got = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert got == _both(pairs)
    assert len(got) == 41  # the doc's count
    for b in [(1344, 768), (1280, 768), (1216, 832), (1152, 896), (1088, 960), (2048, 512), (2048, 256)]:
        assert b in got
    assert all(w * h <= 1024 * 1024 for w, h in got)


def test_buckets_512_step64():
    # A = 262144: w=256 -> 1024; 320 -> 768; 384 -> 640; 448 -> 576; 512 -> 512; 576 -> 448; 640 -> 384;
    # 704 -> 320; 768 -> 320; 832..1024 -> 256; square 512.
    pairs = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (704, 320), (768, 320), (832, 256),
             (896, 256), (960, 256), (1024, 256)]
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == _both(pairs)


def test_buckets_non_square_resolution_and_min_limit():
    # resolution [768, 512] -> A = 393216, square floor(sqrt(A)/64)*64 = floor(627.06/64)*64 = 576.
    # min 384, max 768: w=384 -> min(768, floor(1024/64)*64=1024) = 768; 448 -> 877 -> 832 -> 768;
    # 512 -> 768; 576 -> 682 -> 640; 640 -> 614 -> 576; 704 -> 558 -> 512; 768 -> 512.
    pairs = [(384, 768), (448, 768), (512, 768), (576, 640), (640, 576), (704, 512), (768, 512), (576, 576)]
    assert make_bucket_resolutions((768, 512), 384, 768, 64) == _both(pairs)


@pytest.mark.parametrize(
    "image, max_size, bucket, resized",
    [
        # exact bucket size is used as is
        ((1024, 1024), 2048, (1024, 1024), (1024, 1024)),
        ((1216, 832), 2048, (1216, 832), (1216, 832)),
        # AR 1.5: 1216/832 = 1.4615 (err .0385) beats 1280/768 = 1.6667; image wider -> match heights:
        # scale 832/1000, width round(1248.0) = 1248
        ((1500, 1000), 2048, (1216, 832), (1248, 832)),
        # AR .75: 896/1152 = .7778 (err .0278) beats 832/1216 = .6842; narrower -> match widths:
        # scale 896/600, height round(1194.67) = 1195 (upscale)
        ((600, 800), 2048, (896, 1152), (896, 1195)),
        # default max 1024: 1024/704 = 1.4545 (err .0455) beats 1024/640 = 1.6; heights: 704/1000 -> 1056
        ((1500, 1000), 1024, (1024, 704), (1056, 704)),
        # AR 2: 1408/704 = 2 exactly; scale 704/1000 = .704 -> (1408, 704) covers exactly
        ((2000, 1000), 2048, (1408, 704), (1408, 704)),
    ],
)
def test_select_bucket_normal(image, max_size, bucket, resized):
    sel = BucketSelector((1024, 1024), 256, max_size, 64)
    choice = sel.select(image)
    assert choice.bucket == bucket
    assert choice.resized == resized


def test_cover_and_crop():
    assert cover_size((1500, 1000), (1216, 832)) == (1248, 832)
    assert crop_offsets((1248, 832), (1216, 832)) == (16, 0)
    assert cover_size((600, 800), (896, 1152)) == (896, 1195)
    assert crop_offsets((896, 1195), (896, 1152)) == (0, 21)  # 43 // 2


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        # smaller than the target area: native size, bucket floored to 64
        ((500, 300), (448, 256), (500, 300)),
        ((1024, 1024), (1024, 1024), (1024, 1024)),
        # AR 1.5, area 6M: rw = sqrt(A*1.5) = 1254.14, rh = 836.09.
        # width variant: 1254 -> 1216, height round(810.67)=811 -> 768, AR 1.5833 (err .0833)
        # height variant: 836 -> 832, width round(1248)=1248 -> 1216, AR 1.4615 (err .0385)  <- wins
        # resized = (round(832*1.5)=1248, 832), bucket = (1216, 832)
        ((3000, 2000), (1216, 832), (1248, 832)),
        # AR 2, area 2M: rw = 1448.15 -> 1408, h 704; rh = 724.08 -> 704, w 1408; tie -> height variant
        ((2000, 1000), (1408, 704), (1408, 704)),
        # AR 1/3: rw = 591.2 -> 576, h 1728; rh = 1773.7 -> 1728, w 576; tie -> (576, 1728)
        ((1000, 3000), (576, 1728), (576, 1728)),
    ],
)
def test_select_bucket_no_upscale(image, bucket, resized):
    sel = BucketSelector((1024, 1024), 256, 1024, 64, no_upscale=True)
    assert sel.predefined == []
    choice = sel.select(image)
    assert choice.bucket == bucket
    assert choice.resized == resized


def test_no_upscale_too_small_image():
    sel = BucketSelector((1024, 1024), 256, 1024, 64, no_upscale=True)
    with pytest.raises(ValueError, match="too small"):
        sel.select((50, 300))


def test_fixed_bucket():
    sel = BucketSelector.fixed((512, 768))
    choice = sel.select((1000, 1000))
    assert choice.bucket == (512, 768)
    assert choice.resized == (768, 768)  # AR 1 > 512/768: relatively wider -> match heights
