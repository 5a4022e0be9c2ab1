"""Aspect-ratio buckets, following kohya's `make_bucket_resolutions` / `BucketManager.select_bucket` rules.

Bucket list (normal mode), for a target area A = W*H, step s, side limits [lo, hi]:
  * the square (q, q) with q = floor(sqrt(A) / s) * s;
  * for w = lo, lo+s, ..., <= hi:  h = min(hi, floor(floor(A / w) / s) * s);  if h >= lo add (w, h) and (h, w);
  * deduplicate, sort (by width, then height).
Selection (normal mode): the image's exact size if it is a bucket, else the bucket with the smallest
|bucket_w/bucket_h - image_w/image_h| (first one in sorted order on ties).  The image is scaled so that it
covers the bucket (relatively wider image -> match heights, else match widths; sides rounded half up), then
the overflow is centre-cropped (offset = overflow // 2).
`bucket_no_upscale`: one bucket per image size.  Images larger than A are scaled to area A keeping the aspect
ratio, rounding either the width or the height to the step (whichever variant keeps the aspect ratio better);
smaller images keep their size; the bucket is the (resized) size floored to multiples of s.
`bucket_free_fit` (beautifulrem/sd-scripts): no bucket list; each image gets its own bucket of area <= A that keeps
its aspect ratio (upscaling allowed), see `free_fit_bucket`; the image is then covered + centre-cropped as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """kohya's predefined bucket list for target area max_reso[0] * max_reso[1]."""
    if step < 1 or min_size < 1:
        raise ValueError("step and min_size must be positive")
    max_area = max_reso[0] * max_reso[1]
    resos: set[Size] = set()
    side = int(math.sqrt(max_area) // step) * step
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def _round_to_step(x: float, step: int) -> int:
    """Round half up to an integer, then floor to a multiple of `step` (kohya's round_to_steps)."""
    n = int(x + 0.5)
    return n - n % step


def free_fit_bucket(image: Size, max_area: int, min_size: int, max_size: int, step: int) -> Size:
    """The `bucket_free_fit` bucket of one image: its aspect ratio at area `max_area`, within the side bounds.

    Why this shape: it crops (almost) nothing, unlike the nearest predefined bucket.  Rules, in order:
      1. ideal sides w = sqrt(A * r), h = sqrt(A / r) for r = image_w / image_h (area exactly A);
      2. a side above `max_size` scales both sides down (aspect kept, area shrinks);
      3. a side below `min_size` is raised to it, and the other side becomes min(max_size, the aspect-kept
         length, A / min_size), so the area still does not exceed A;
      4. each side is rounded DOWN to a multiple of `step`, so the area never exceeds A (the caller keeps
         min_size / max_size multiples of `step`, so the bounds still hold).
    """
    iw, ih = image
    if iw < 1 or ih < 1:
        raise ValueError(f"invalid image size {image}")
    ratio = iw / ih
    w, h = math.sqrt(max_area * ratio), math.sqrt(max_area / ratio)
    if max(w, h) > max_size:
        k = max_size / max(w, h)
        w, h = w * k, h * k
    if min(w, h) < min_size:
        if w <= h:
            w, h = min_size, min(max_size, min_size / ratio, max_area / min_size)
        else:
            w, h = min(max_size, min_size * ratio, max_area / min_size), min_size
    # the epsilon keeps float noise (sqrt(1024**2) = 1023.9999...) from dropping a whole step
    bw, bh = (int(side + 1e-9) // step * step for side in (w, h))
    return max(bw, step), max(bh, step)


@dataclass(frozen=True)
class BucketChoice:
    bucket: Size  # training size (width, height)
    resized: Size  # size the image is resized to before the centre crop (covers `bucket`)


def cover_size(image: Size, bucket: Size) -> Size:
    """Scale `image` so that it covers `bucket` with one side equal (kohya's rule, half-up rounding)."""
    iw, ih = image
    bw, bh = bucket
    if iw / ih > bw / bh:  # relatively wider than the bucket: match heights
        scale = bh / ih
    else:  # match widths
        scale = bw / iw
    return int(iw * scale + 0.5), int(ih * scale + 0.5)


def crop_offsets(resized: Size, bucket: Size) -> tuple[int, int]:
    """(left, top) of the centre crop of `bucket` out of `resized`."""
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


class BucketSelector:
    """Assigns image sizes to buckets for one dataset."""

    def __init__(self, max_reso: Size, min_size: int, max_size: int, step: int, no_upscale: bool = False,
                 free_fit: bool = False):
        if no_upscale and free_fit:
            raise ValueError("bucket_no_upscale and bucket_free_fit are mutually exclusive")
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.step = step
        self.no_upscale = no_upscale
        self.free_fit = free_fit
        self.min_size, self.max_size = min_size, max_size
        self.predefined: list[Size] = ([] if no_upscale or free_fit
                                       else make_bucket_resolutions(max_reso, min_size, max_size, step))
        self._predefined_set = set(self.predefined)

    @classmethod
    def fixed(cls, resolution: Size) -> BucketSelector:
        """enable_bucket = false: a single bucket equal to `resolution` (images are covered + centre-cropped)."""
        sel = cls.__new__(cls)
        sel.max_reso, sel.max_area, sel.step, sel.no_upscale = resolution, resolution[0] * resolution[1], 1, False
        sel.free_fit, sel.min_size, sel.max_size = False, min(resolution), max(resolution)
        sel.predefined = [tuple(resolution)]
        sel._predefined_set = set(sel.predefined)
        return sel

    def select(self, image: Size) -> BucketChoice:
        iw, ih = image
        if iw < 1 or ih < 1:
            raise ValueError(f"invalid image size {image}")
        if self.no_upscale:
            return self._select_no_upscale(image)
        if self.free_fit:
            bucket = free_fit_bucket(image, self.max_area, self.min_size, self.max_size, self.step)
            return BucketChoice(bucket, cover_size(image, bucket))
        if image in self._predefined_set:
            bucket = image
        else:
            ar = iw / ih
            bucket = min(self.predefined, key=lambda r: abs(r[0] / r[1] - ar))  # min() keeps the first on ties
        return BucketChoice(bucket, cover_size(image, bucket))

    def _select_no_upscale(self, image: Size) -> BucketChoice:
        iw, ih = image
        ar = iw / ih
        if iw * ih > self.max_area:
            rw = math.sqrt(self.max_area * ar)
            rh = self.max_area / rw
            # variant 1: width rounded to the step, height follows the aspect ratio
            w1 = _round_to_step(rw, self.step)
            h1 = _round_to_step(w1 / ar, self.step)
            err1 = abs(w1 / h1 - ar) if h1 > 0 else math.inf
            # variant 2: height rounded to the step, width follows
            h2 = _round_to_step(rh, self.step)
            w2 = _round_to_step(h2 * ar, self.step)
            err2 = abs(w2 / h2 - ar) if h2 > 0 else math.inf
            if err1 < err2:
                resized = (w1, int(w1 / ar + 0.5))
            else:
                resized = (int(h2 * ar + 0.5), h2)
        else:
            resized = image
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        if bucket[0] < 1 or bucket[1] < 1:
            raise ValueError(
                f"image of size {iw}x{ih} is too small for bucket_reso_steps {self.step} with bucket_no_upscale"
            )
        return BucketChoice(bucket, resized)
