"""Fine-tuning style subsets: images and captions listed in a `metadata_file` (kohya's FineTuningDataset).

Accepted formats (chosen by the file name, as kohya: `.jsonl` = JSON Lines, anything else = JSON):

* JSON, kohya's `merge_captions_to_metadata.py` / `merge_dd_tags_to_metadata.py` output: one object
  `{image_key: {"caption": str, "tags": str, ...}, ...}`.
* JSONL: one object per non-blank line, `{"image_path": str, "caption": str, "tags": str, ...}`
  (`file_name`, the Hugging Face imagefolder name, is accepted for `image_path`).

Per entry: `caption` and `tags` are optional strings (missing = ""); `image_size` = [width, height] (or JSONL
`width` + `height`) is checked if present but sizes are always read from the image header; other keys
(e.g. `train_resolution` from kohya's old bucketing script) are ignored, as buckets are computed here.

Image keys (kohya): an absolute path is used as is; a relative one is joined to the subset's `image_dir`
(required then) and must stay inside it: `../x.png` (also `a/../../x.png`) is an error naming the entries
(kohya would follow it out of the dataset).  If the key has no extension, or that file does not exist,
`<key><ext>` is tried for each image extension (images.EXTENSION_PREFERENCE order, lower then upper case):
keys without extension, as kohya's merge scripts write them, work.  Images that cannot be found are one
DatasetConfigError listing them (kohya would look for latent .npz files instead; we need the image).

Caption (kohya): `tags` is appended to the caption with the subset's `caption_separator` ("caption,tags"),
or is the caption when that is empty.  With `enable_wildcard` every non-empty caption line gets the tags
(tags' own newlines become separators) and `process_caption` picks a line per sample; without it the first
non-empty line is used, as for caption files (kohya would keep all lines).

Malformed input (not JSON, an entry that is not an object, a non-string caption / tags / path, a bad
image_size) is a DatasetConfigError naming the file and line.  A JSONL key that repeats an earlier line
replaces it with a warning (kohya keeps the last too).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .buckets import Size
from .config import DatasetConfigError
from .images import EXTENSION_PREFERENCE
from .textfiles import read_text

log = logging.getLogger(__name__)

JSONL_PATH_KEYS = ("image_path", "file_name")


@dataclass(frozen=True)
class MetadataEntry:
    key: str  # image key as written in the file
    caption: str  # raw caption (tags appended), before per-sample processing
    image_size: Size | None  # as given in the file, if any
    where: str  # "file:line" (JSONL) or "file: key" (JSON), for messages
    # the tags as kohya lists them for ss_tag_frequency (its FineTuningDataset `tags_list`): with enable_wildcard
    # newlines → separator, else as written; None where kohya lists nothing (no tags; empty without wildcard)
    tags: str | None = None


def _fail(where: str, message: str) -> DatasetConfigError:
    return DatasetConfigError(f"{where}: {message}")


def _find_key_line(text: str, key: str) -> int | None:
    """Line of `"key":` in a JSON text (for messages only; None if not found literally)."""
    pos = text.find(json.dumps(key) + ":")
    if pos < 0:
        pos = text.find(json.dumps(key))
    return None if pos < 0 else text.count("\n", 0, pos) + 1


def _entry(key: Any, record: Any, where: str, separator: str, enable_wildcard: bool,
           label: str | None = None) -> MetadataEntry:
    """`where` is stored ("file:line"); `label` (default `where`) prefixes error messages."""
    stored, where = where, label or where
    if not isinstance(record, dict):
        raise _fail(where, f"entry must be an object like {{\"caption\": \"...\"}}, got {type(record).__name__}")
    if not isinstance(key, str) or not key.strip():
        raise _fail(where, f"image path / key must be a non-empty string, got {key!r}")
    caption, tags = record.get("caption"), record.get("tags")
    for name, value in (("caption", caption), ("tags", tags)):
        if value is not None and not isinstance(value, str):
            raise _fail(where, f"'{name}' must be a string, got {type(value).__name__} {value!r}")
    size = record.get("image_size")
    if size is None and "width" in record and "height" in record:
        size = [record["width"], record["height"]]
    if size is not None:
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)):
            raise _fail(where, f"'image_size' must be [width, height] (positive ints), got {size!r}")
        size = (size[0], size[1])
    listed = (tags.replace("\n", separator) if tags is not None else None) if enable_wildcard else (tags or None)
    return MetadataEntry(key, join_caption(caption or "", tags or "", separator, enable_wildcard), size, stored,
                         listed)


def join_caption(caption: str, tags: str, separator: str, enable_wildcard: bool) -> str:
    """kohya's caption + tags rule (module docstring)."""
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    tags = separator.join(t.strip() for t in tags.splitlines() if t.strip())
    if not enable_wildcard:
        lines = lines[:1]
    if not lines:
        return tags
    if tags:
        lines = [f"{line}{separator}{tags}" for line in lines]
    return "\n".join(lines)


def read_metadata(path: Path, *, separator: str = ",", enable_wildcard: bool = False) -> list[MetadataEntry]:
    """Entries of a metadata file in file order (JSON: key order; JSONL: line order, last duplicate wins)."""
    try:
        text = read_text(path)
    except OSError as e:
        raise DatasetConfigError(f"metadata_file {path} cannot be read: {e.strerror or e}") from None
    if path.suffix.lower() == ".jsonl":
        entries: dict[str, MetadataEntry] = {}
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise _fail(where, "nested too deeply to be read (a broken or hostile file)") from None
            if not isinstance(record, dict):
                raise _fail(where, f"each line must be a JSON object, got {type(record).__name__}")
            key_name = next((k for k in JSONL_PATH_KEYS if k in record), None)
            if key_name is None:
                raise _fail(where, f"no \"image_path\" (each line needs the image path and its caption), "
                                   f"keys: {', '.join(record) or 'none'}")
            entry = _entry(record[key_name], record, where, separator, enable_wildcard)
            if entry.key in entries:
                log.warning("%s: image %r is listed again (first at %s); the later entry is used",
                            where, entry.key, entries[entry.key].where)
                del entries[entry.key]
            entries[entry.key] = entry
        return list(entries.values())
    try:
        data = json.loads(text)
    except RecursionError:
        raise _fail(str(path), "nested too deeply to be read (a broken or hostile file)") from None
    except json.JSONDecodeError as e:
        raise _fail(f"{path}:{e.lineno}", f"not valid JSON ({e.msg} at column {e.colno}); a JSON Lines file "
                                          f"must be named *.jsonl") from None
    if not isinstance(data, dict):
        raise _fail(str(path), "must be a JSON object {\"image key\": {\"caption\": ..., \"tags\": ...}, ...} "
                               f"(kohya's format), got {type(data).__name__}; JSON Lines files must be named *.jsonl")
    out = []
    for key, record in data.items():
        line = _find_key_line(text, key) if isinstance(key, str) else None
        where = f"{path}:{line}" if line else str(path)
        out.append(_entry(key, record, where, separator, enable_wildcard, label=f"{where} (image {key!r})"))
    return out


def resolve_image(key: str, image_dir: Path | None) -> Path | None:
    """The image file of `key` (module docstring), or None when there is none."""
    raw = Path(key)
    if raw.is_absolute():
        path = raw
    elif image_dir is None:
        raise ValueError("relative image path needs image_dir")
    else:
        path = image_dir / raw
    if raw.suffix and path.is_file():
        return path
    for ext in EXTENSION_PREFERENCE:
        for variant in (ext, ext.upper()):
            candidate = path.parent / (path.name + variant)
            if candidate.is_file():
                return candidate
    return None


def resolve_metadata_subset(entries: list[MetadataEntry], image_dir: Path | None, metadata_file: Path,
                            where: str) -> list[tuple[Path, MetadataEntry]]:
    """(image path, entry) per entry; DatasetConfigError listing every image that cannot be found."""
    found, missing, escaping = [], [], []
    for entry in entries:
        if image_dir is not None and not Path(entry.key).is_absolute() \
                and os.path.normpath(entry.key).split(os.sep)[0] == os.pardir:
            escaping.append(entry)
            continue
        try:
            path = resolve_image(entry.key, image_dir)
        except ValueError:
            raise _fail(entry.where, f"image path {entry.key!r} is relative, so {where} needs image_dir "
                                     f"(the folder the paths are relative to)") from None
        if path is None:
            missing.append(entry)
        else:
            found.append((path, entry))
    if escaping:
        shown = "; ".join(f"{e.key!r} ({e.where})" for e in escaping[:5])
        more = f" and {len(escaping) - 5} more" if len(escaping) > 5 else ""
        raise DatasetConfigError(
            f"{where}: {len(escaping)} relative image path(s) in metadata_file {metadata_file} lead outside "
            f"image_dir {image_dir}: {shown}{more}; move the images into image_dir, or write absolute paths"
        )
    if missing:
        shown = "; ".join(f"{e.key!r} ({e.where})" for e in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        base = f" in image_dir {image_dir}" if image_dir is not None else ""
        raise DatasetConfigError(
            f"{where}: {len(missing)} image(s) listed in metadata_file {metadata_file} not found{base}: "
            f"{shown}{more}"
        )
    return found
