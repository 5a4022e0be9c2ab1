"""One coloured-shape concept with a trigger word in every caption: the dataset of the evidence tests
(tests/evaluation/test_evidence.py).  Red circles of different sizes and places on white, each captioned
"<trigger>, a red circle on a white background"."""

from __future__ import annotations

import io
import random
from pathlib import Path

from anima_trainer.fileio import atomic_write_bytes

RED = (220, 40, 40)


def write_concept_dataset(folder: str | Path, trigger: str, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """`count` PNGs + captions in `folder` (created); the same files for the same arguments."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        image = Image.new("RGB", (size, size), "white")
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=RED)
        png = io.BytesIO()
        image.save(png, format="PNG")
        atomic_write_bytes(png.getvalue(), folder / f"concept_{i:02d}.png")
        atomic_write_bytes(f"{trigger}, a red circle on a white background".encode(), folder / f"concept_{i:02d}.txt")
    return folder
