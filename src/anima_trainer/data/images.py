"""Image files: discovery, header-only probing (size, orientation, sanity checks), decoding to RGB,
resize + centre crop, tensors.

Mode handling (decision): EXIF orientation is applied (sizes are reported after it); images with
transparency (RGBA, LA, palette or colour-key transparency) are alpha-composited on white, because fully
transparent pixels often hold arbitrary colours that a plain alpha drop would expose; 16-bit greyscale is
scaled to 8 bits (v / 257, rounded); 16-bit RGB(A) PNGs keep the high byte (Pillow's decoder); everything
else goes through Pillow's convert("RGB") (CMYK, L, P, 1, ...).  Colour profiles (ICC) are not applied.
For alpha_mask subsets the alpha channel is also returned separately (`alpha_channel`, before compositing;
the pixels are still the RGB composite on white); images without transparency have no mask (= all ones).

Start-up checks (decision): `probe_image` reads the header and O(1) bytes at the end of the file, never the
pixels, and rejects what would otherwise fail mid-run:
  * empty files, files Pillow cannot identify, broken symlinks and symlink loops;
  * truncated files: a PNG must end with its IEND chunk (else the chunk CRCs are walked with
    `Image.verify()`, which decompresses nothing); a JPEG must end with the EOI marker (else the image is
    decoded once, at scan, to tell trailing data from truncation — rare); WebP / BMP must be at least as
    long as the size in their header;
  * pixel modes `to_rgb` cannot convert;
  * images above MAX_IMAGE_PIXELS (decompression-bomb limit).
Corruption inside the compressed data that keeps the file length intact is not visible without decoding:
`probe_image(full=True)` (build_dataset(verify_images=True)) decodes every image at start-up; otherwise such
a file raises ImageReadError naming it when its batch is loaded.

EXIF orientation is read from the header only (Pillow's PngImageFile.getexif() would decode the whole
image to look for an eXIf chunk after the pixel data; such late chunks are ignored here, consistently at
scan and at load, so the scanned size always matches the loaded one).
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from .buckets import Size, crop_offsets
from .config import RESIZE_INTERPOLATIONS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # kohya's list, matched case-insensitively

# Decompression-bomb limit (decision): 178,956,970 pixels (e.g. 13,377 x 13,377; a 16k x 10k scan fits) =
# Pillow's own hard-error threshold (2 x its default warning limit of 89.5 MP).  Images above it are
# skipped at start-up with a message naming the limit.  Pillow's warning threshold is raised to the same
# value on import so accepted images decode without DecompressionBombWarning; Pillow itself still refuses
# anything above 2 x this.  Change this constant (not Pillow's) to change the limit.
MAX_IMAGE_PIXELS = 178_956_970
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# Which extension wins when several images share a stem in one folder (they would share a caption file):
# lossless first, then kohya's list order; ties (a.png / a.PNG) by file name.
EXTENSION_PREFERENCE = (".png", ".webp", ".bmp", ".jpg", ".jpeg")

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # transpose / rotate 90 / transverse / rotate 270
_TRANSPOSE = {  # as ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_EOI = b"\xff\xd9"


class ImageReadError(OSError, ValueError):
    """An image file exists but cannot be decoded.  Also a ValueError: a bad input of the user, which the
    command line reports as one `error:` line (exit 2), e.g. when the latent cache decodes a damaged image."""


class ImageRejected(ImageReadError):
    """`probe_image` refuses a file; `reason` is the short text shown in the start-up report."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    size: Size  # (width, height) after EXIF orientation
    orientation: int  # EXIF orientation 1..8 read from the header
    format: str  # Pillow format name (PNG, JPEG, ...)
    mode: str  # Pillow mode before conversion


# --- discovery ------------------------------------------------------------------------------------------

def scan_folder(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files directly inside `folder` (not recursive), sorted by name, plus (path, reason) for
    entries with an image extension that are not usable files (broken symlink, symlink loop, folder).

    Not recursive, so a symlinked folder (even one pointing back at `folder`) is never descended into."""
    images, rejected = [], []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            st = os.stat(path)  # follows symlinks
        except OSError as e:
            if e.errno == errno.ELOOP:
                rejected.append((path, "symlink loop"))
            elif entry.is_symlink() and e.errno == errno.ENOENT:
                rejected.append((path, f"broken symlink (-> {os.readlink(path)})"))
            else:
                rejected.append((path, f"cannot stat: {e.strerror or e}"))
            continue
        if not stat.S_ISREG(st.st_mode):
            rejected.append((path, "not a regular file"))
            continue
        images.append(path)
    return images, rejected


def pick_duplicate_stems(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Keep one image per (folder, stem): a.png + a.jpg would share a.txt and one latent-cache name.
    The winner follows EXTENSION_PREFERENCE, then the file name; the others are returned as rejected."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for p in paths:
        groups.setdefault((p.parent, p.stem), []).append(p)

    def rank(p: Path) -> tuple[int, str]:
        ext = p.suffix.lower()
        return (EXTENSION_PREFERENCE.index(ext) if ext in EXTENSION_PREFERENCE else len(EXTENSION_PREFERENCE), p.name)

    keep, rejected = set(), []
    for group in groups.values():
        best = min(group, key=rank)
        keep.add(best)
        rejected.extend((p, f"duplicate stem: same name as {best.name}, which is used instead")
                        for p in sorted(group) if p != best)
    return [p for p in paths if p in keep], sorted(rejected)


# --- probing (header only) ------------------------------------------------------------------------------

def _header_orientation(im: Image.Image) -> int:
    """EXIF orientation from data Pillow parsed while opening (never decodes; see the module docstring)."""
    try:
        # the base-class method reads im.info only; PngImageFile.getexif() would load the pixels
        orientation = Image.Image.getexif(im).get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as exif_transpose does
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


@cache
def mode_supported(mode: str) -> bool:
    """Whether `to_rgb` converts this Pillow mode (tried once on a 1x1 image)."""
    try:
        to_rgb(Image.new(mode, (1, 1)))
    except Exception:  # noqa: BLE001
        return False
    return True


def _tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - n))
        return f.read()


def _truncation(path: Path, im: ImageFile.ImageFile, file_size: int) -> str | None:
    """Cheap end-of-file checks per format; a reason string if the file is truncated, else None."""
    fmt = im.format
    if fmt == "PNG":
        if _tail(path, len(_PNG_IEND)) == _PNG_IEND:
            return None
        try:  # data after IEND, or truncated: walk the chunks (CRC only, no decompression)
            with Image.open(path) as again:
                again.verify()
        except Exception as e:  # noqa: BLE001
            return f"truncated or corrupt PNG ({e})"
        return None
    if fmt in ("JPEG", "MPO"):
        if _tail(path, 64).rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
            return None
        try:  # no EOI marker at the end: trailing data (fine) or truncation: decode once to tell
            with Image.open(path) as again:
                again.load()
        except Exception as e:  # noqa: BLE001
            return f"truncated or corrupt JPEG ({e})"
        return None
    if fmt == "WEBP":
        with open(path, "rb") as f:
            head = f.read(12)
        if len(head) >= 8 and head[:4] == b"RIFF":
            expected = int.from_bytes(head[4:8], "little") + 8
            if file_size < expected:
                return f"truncated WebP ({file_size} of {expected} bytes)"
        return None
    if fmt == "BMP":
        with open(path, "rb") as f:
            head = f.read(6)
        expected = int.from_bytes(head[2:6], "little") if head[:2] == b"BM" else 0
        if file_size < expected:
            return f"truncated BMP ({file_size} of {expected} bytes)"
    return None


def probe_image(path: Path, *, full: bool = False) -> ImageInfo:
    """Size / orientation / mode from the header plus the start-up checks (module docstring); raises
    ImageRejected with a one-line reason.  `full=True` also decodes the pixels (slow, catches everything)."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except OSError as e:
        raise ImageRejected(path, f"cannot stat: {e.strerror or e}") from None
    if file_size == 0:
        raise ImageRejected(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageRejected(path, _too_large(w, h))
                mode, fmt = im.mode, im.format or "?"
                orientation = _header_orientation(im)
                truncated = _truncation(path, im, file_size)
                if truncated is None and full:
                    im.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError:  # above Pillow's hard limit; the size is in the header anyway
        raise ImageRejected(path, f"too large: above Pillow's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} "
                                  f"pixels (anima-trainer's limit: {MAX_IMAGE_PIXELS})") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected(path, "not an image Pillow can identify (wrong extension or corrupt header)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file problem
        raise ImageRejected(path, f"unreadable: {type(e).__name__}: {e}") from None
    if truncated is not None:
        raise ImageRejected(path, truncated)
    if w < 1 or h < 1:
        raise ImageRejected(path, f"invalid size {w}x{h}")
    if not mode_supported(mode):
        raise ImageRejected(path, f"unsupported pixel mode {mode!r}")
    size = (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)
    return ImageInfo(size, orientation, fmt, mode)


def _too_large(w: int, h: int) -> str:
    return (f"too large: {w}x{h} = {w * h:,} pixels > limit {MAX_IMAGE_PIXELS:,} "
            "(anima_trainer.data.images.MAX_IMAGE_PIXELS; downscale the file)")


def image_size(path: Path) -> Size:
    """(width, height) as the model will see it (EXIF orientation applied), read from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = _header_orientation(im)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


# --- decoding -------------------------------------------------------------------------------------------

def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow image to RGB (alpha composited on white)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        if "transparency" in im.info:  # 16-bit colour key: mask from the raw values, then composite
            key = im.info["transparency"]
            alpha = Image.fromarray(np.where(np.asarray(im) == key, 0, 255).astype(np.uint8))
            grey = _sixteen_to_eight(im)
            grey.putalpha(alpha)
            return to_rgb(grey)
        return _sixteen_to_eight(im).convert("RGB")
    if _has_transparency(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return im.convert("RGB")


def alpha_channel(im: Image.Image) -> Image.Image | None:
    """The transparency of `im` as an "L" image (255 = opaque), None when it has none.  Covers RGBA / LA /
    PA / premultiplied modes and colour-key transparency (palette, RGB, L and 16-bit greyscale)."""
    if not _has_transparency(im):
        return None
    if im.mode.startswith("I;16") or im.mode == "I":
        key = im.info["transparency"]
        return Image.fromarray(np.where(np.asarray(im) == key, 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGBA").getchannel("A")


def _sixteen_to_eight(im: Image.Image) -> Image.Image:
    arr = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def load_image(path: Path) -> Image.Image:
    """Decode `path` to an RGB image with EXIF orientation (from the header, as at scan) applied."""
    return load_image_with_alpha(path, alpha=False)[0]


def load_image_with_alpha(path: Path, *, alpha: bool = True) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image as `load_image`, its alpha channel as an "L" image or None) with EXIF orientation applied
    to both; with alpha=False the second element is always None."""
    try:
        with Image.open(path) as im:
            orientation = _header_orientation(im)  # before load(): the same value probe_image saw
            im.load()
            out = to_rgb(im)
            mask = alpha_channel(im) if alpha else None
            if orientation in _TRANSPOSE:
                out = out.transpose(_TRANSPOSE[orientation])
                if mask is not None:
                    mask = mask.transpose(_TRANSPOSE[orientation])
            return out, mask
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes an error naming the file
        if isinstance(e, OSError) and not path.is_file() or isinstance(e, (FileNotFoundError, PermissionError)):
            raise ImageReadError(
                f"image {path} was removed or became unreadable during the run ({type(e).__name__}: "
                f"{getattr(e, 'strerror', None) or e}); it was there at start-up: put it back (a state saved "
                "earlier resumes with --resume latest) or remove it from the dataset and start again") from None
        raise ImageReadError(
            f"cannot decode image {path}: {type(e).__name__}: {e} (it passed the start-up checks, so the damage "
            "is inside the compressed data; remove or re-export the file, or scan with verify_images=True)"
        ) from None


def resize_and_crop(im: Image.Image, resized: Size, bucket: Size, offset: tuple[int, int] | None = None, *,
                    interpolation: str | None = None) -> Image.Image:
    """Resize to `resized` (area filter when shrinking, Lanczos otherwise, as kohya), crop `bucket` at
    `offset` = (left, top) in the resized image (None: the centre crop)."""
    if im.size != tuple(resized):
        shrinking = im.width > resized[0] and im.height > resized[1]
        im = im.resize(tuple(resized), resample_filter(interpolation, shrinking=shrinking))
    if im.size != tuple(bucket):
        if im.width < bucket[0] or im.height < bucket[1]:
            raise ValueError(f"resized image {im.size} does not cover bucket {bucket}")
        left, top = crop_offsets(im.size, bucket) if offset is None else offset
        if not (0 <= left <= im.width - bucket[0] and 0 <= top <= im.height - bucket[1]):
            raise ValueError(f"crop offset {(left, top)} of bucket {bucket} out of range in {im.size}")
        im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    return im


def resample_filter(interpolation: str | None, *, shrinking: bool) -> Image.Resampling:
    """Pillow filter for kohya's resize_interpolation name (config.RESIZE_INTERPOLATIONS); None = kohya's
    default: area (BOX) when shrinking, Lanczos otherwise.  A name applies in both directions (kohya)."""
    if interpolation is None:
        return Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return Image.Resampling[RESIZE_INTERPOLATIONS[interpolation]]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Stack same-size RGB images into float32 [B, 3, H, W] in [0, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
