"""Image files: discovery, header-only sizes, decoding to RGB, resize + centre crop, tensors.

Mode handling (decision): EXIF orientation is applied (sizes are reported after it); images with
transparency (RGBA, LA, palette or colour-key transparency) are alpha-composited on white, because fully
transparent pixels often hold arbitrary colours that a plain alpha drop would expose; 16-bit greyscale is
scaled to 8 bits; everything else goes through Pillow's convert("RGB") (CMYK, L, P, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Size, crop_offsets

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # kohya's list, matched case-insensitively

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # transpose / rotate 90 / transverse / rotate 270


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_size(path: Path) -> Size:
    """(width, height) as the model will see it (EXIF orientation applied), read from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as exif_transpose does
                orientation = 1
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow image to RGB (alpha composited on white)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if _has_transparency(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Decode `path` to an RGB image with EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None


def resize_and_crop(im: Image.Image, resized: Size, bucket: Size) -> Image.Image:
    """Resize to `resized` (area filter when shrinking, Lanczos otherwise, as kohya), centre-crop to `bucket`."""
    if im.size != tuple(resized):
        shrinking = im.width > resized[0] and im.height > resized[1]
        im = im.resize(tuple(resized), Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    if im.size != tuple(bucket):
        if im.width < bucket[0] or im.height < bucket[1]:
            raise ValueError(f"resized image {im.size} does not cover bucket {bucket}")
        left, top = crop_offsets(im.size, bucket)
        im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    return im


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Stack same-size RGB images into float32 [B, 3, H, W] in [0, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
