"""Pixel augmentation: kohya's `color_aug` (weak hue / gamma jitter).

kohya (`train_util.AugHelper.color_aug`, a stand-in for albumentations'
`OneOf([HueSaturationValue(8, 0, 0), RandomGamma((95, 105))], p=0.33)`): with probability 0.33 a sample is
jittered, then with equal odds either
  * its hue is rotated by uniform(-8, 8) OpenCV hue units (OpenCV's hue runs 0..180, so +-16 degrees),
    saturation and value unchanged, or
  * a gamma uniform(0.95, 1.05) is applied.
Otherwise the pixels are untouched.  The draw order (apply?, which?, amount) is kohya's.

Differences (decision): the hue is rotated in floating point (kohya goes through 8-bit OpenCV HSV, which
quantises hue to 2-degree steps even for small shifts), and the gamma is applied to normalised values,
255 * (v / 255) ** gamma, as albumentations' RandomGamma that kohya replaced; kohya's code raises the raw
0..255 values to the power (v ** gamma), which brightens mid-tones by up to ~30 % and clips highlights for
gamma > 1, far from the "weak jitter" it documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT_DEGREES = 16.0  # kohya: 8 OpenCV hue units
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class ColorJitter:
    """One drawn colour augmentation: a hue rotation in degrees, or a gamma (exactly one is not neutral)."""

    hue_degrees: float = 0.0
    gamma: float = 1.0


def draw_color_jitter(rng: random.Random) -> ColorJitter | None:
    """kohya's draw: None (no change) with probability 0.67, else a hue shift or a gamma with equal odds."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return None
    if rng.random() > 0.5:
        return ColorJitter(hue_degrees=rng.uniform(-HUE_SHIFT_LIMIT_DEGREES, HUE_SHIFT_LIMIT_DEGREES))
    return ColorJitter(gamma=rng.uniform(*GAMMA_RANGE))


def rotate_hue(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the HSV hue of float RGB values in [0, 1] ([..., 3]) by `degrees`; S and V are kept, so each
    pixel's max and min channel values are unchanged (greys stay grey)."""
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = (hue + degrees / 60.0) % 6.0  # in sextants
    x = chroma * (1.0 - np.abs(hue % 2.0 - 1.0))
    zero = np.zeros_like(chroma)
    sector = np.floor(hue).astype(np.int64) % 6
    choices = [
        (chroma, x, zero), (x, chroma, zero), (zero, chroma, x),
        (zero, x, chroma), (x, zero, chroma), (chroma, zero, x),
    ]
    out = np.empty_like(rgb)
    for c in range(3):
        out[..., c] = np.choose(sector, [choice[c] for choice in choices]) + mn
    return out


def apply_color_jitter(im: Image.Image, jitter: ColorJitter) -> Image.Image:
    """Apply a drawn jitter to an RGB image (8 bits per channel, rounded)."""
    arr = np.asarray(im, dtype=np.float64) / 255.0
    if jitter.hue_degrees:
        arr = rotate_hue(arr, jitter.hue_degrees)
    if jitter.gamma != 1.0:
        arr = np.power(arr, jitter.gamma)
    return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), mode="RGB")
