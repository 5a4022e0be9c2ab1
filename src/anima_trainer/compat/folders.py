"""Image folders → dataset subsets, for trainers that take a folder instead of a dataset.toml.

Two conventions exist and they differ, so each has its own function:

* kohya's `--train_data_dir` / `--reg_data_dir` (kohya_anima.md §1.3): every immediate subfolder named
  `<N>_<class tokens>` is one subset with `num_repeats = N` and `class_tokens` = the rest of the name;
  other subfolders and images directly in the folder are not used; subfolders are not searched.
* the root-style Anima_Trainer `data_dir` (seed_system.md §6.1): searched recursively; an image's repeat is
  N when its own folder is named `<N>_<name>` (and is not `data_dir` itself), else 1 — but only if some
  immediate subfolder has that form; otherwise every image is repeated `repeats` times.

Both return one `FolderSubset` per folder that holds images (kohya's `image_dir` is not recursive, so a
recursive layout needs one subset per folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from anima_trainer.data.images import IMAGE_EXTENSIONS

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class FolderSubset:
    image_dir: Path
    num_repeats: int
    class_tokens: str | None
    images: int


def _images_in(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def kohya_folder_subsets(folder: str | Path, what: str) -> tuple[list[FolderSubset], list[str]]:
    """kohya's DreamBooth folder: (subsets, notes about folders that were not used).  `what` names the option
    in errors (e.g. "train_data_dir")."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: {root} is not a folder")
    subsets: list[FolderSubset] = []
    notes: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = REPEAT_FOLDER.match(sub.name)
        if m is None:
            notes.append(f"{what}: folder '{sub.name}' is not named <repeats>_<name>; not used (as in kohya)")
            continue
        n = _images_in(sub)
        if n == 0:
            notes.append(f"{what}: folder '{sub.name}' has no images; not used")
            continue
        subsets.append(FolderSubset(sub, int(m.group(1)), m.group(2), n))
    loose = _images_in(root)
    if loose:
        notes.append(f"{what}: {loose} image(s) directly in {root} are not used (kohya reads only the "
                     "<repeats>_<name> subfolders)")
    return subsets, notes


def root_folder_subsets(folder: str | Path, repeats: int,
                        what: str = "dataset.data_dir") -> tuple[list[FolderSubset], bool]:
    """The root-style trainer's recursive `data_dir` scan (see the module docstring): (subsets, whether the
    folder has the <N>_<name> layout, in which case `repeats` is not used)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: {root} is not a folder")
    kohya_layout = any(p.is_dir() and REPEAT_FOLDER.match(p.name) for p in root.iterdir())
    folders = sorted({p.parent for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS},
                     key=lambda p: p.as_posix())
    out = []
    for d in folders:
        if kohya_layout:
            m = REPEAT_FOLDER.match(d.name) if d != root else None
            n = int(m.group(1)) if m else 1
        else:
            n = repeats
        out.append(FolderSubset(d, n, None, _images_in(d)))
    return out, kohya_layout
