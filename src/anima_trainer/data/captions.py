"""Captions: finding and reading caption files (DreamBooth style).

Reading happens once, at scan time: the caption file next to the image (`<stem><caption_extension>`),
UTF-8 (a BOM is dropped), first line only (kohya uses the first line when wildcards are off), stripped.
No caption file -> the subset's `class_tokens`; neither -> DatasetConfigError naming the images.
An existing but empty caption file gives the empty caption (a deliberate unconditional sample).

Per-step caption processing (kohya's order: prefix/suffix -> dropout -> wildcard -> keep_tokens / shuffle /
tag dropout -> secondary separator) is not implemented yet; it will live here as a function of
(raw caption, subset options, rng) called when a batch is formed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import DatasetConfigError

log = logging.getLogger(__name__)

_COMMON_EXTENSIONS = (".txt", ".caption", ".tags")


def caption_path(image: Path, extension: str) -> Path:
    """`<stem><extension>` next to the image (kohya: splitext(image)[0] + extension)."""
    return image.parent / (image.stem + extension)


def read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetConfigError(f"caption file {path} is not valid UTF-8: {e}") from None
    lines = text.splitlines()
    caption = lines[0].strip() if lines else ""
    if not caption:
        log.warning("caption file %s is empty; the image trains with an empty caption", path)
    return caption


def captions_for_images(
    images: list[Path], extension: str, class_tokens: str | None, where: str = ""
) -> list[str]:
    """One caption per image; raises DatasetConfigError listing images without caption and class_tokens."""
    captions, missing = [], []
    for image in images:
        path = caption_path(image, extension)
        if path.is_file():
            captions.append(read_caption(path))
        elif class_tokens is not None:
            captions.append(class_tokens)
        else:
            missing.append(image)
            captions.append("")
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        hint = ""
        for ext in _COMMON_EXTENSIONS:
            if ext != extension and caption_path(missing[0], ext).is_file():
                hint = f"; found {caption_path(missing[0], ext).name}: set caption_extension = \"{ext}\""
                break
        prefix = f"{where}: " if where else ""
        raise DatasetConfigError(
            f"{prefix}{len(missing)} image(s) have no caption file ({extension}) and the subset sets no "
            f"class_tokens: {shown}{hint}"
        )
    return captions
