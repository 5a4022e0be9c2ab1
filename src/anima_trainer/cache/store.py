"""Content-addressed safetensors cache entries that cannot go stale.

An entry's file name is a hash of everything it depends on (image bytes, bucket and crop, caption text,
model file fingerprints, dtype, cache format version), and the same description is stored in the file's
metadata and compared on read.  Editing a caption, replacing an image or switching the VAE therefore
simply misses the old entry and builds a new one for exactly that item; nothing is ever reused wrongly.
Entries are written through fileio's one write path (temp file, fsync, rename, folder fsync; mode from the
umask) and refused if they hold NaN/Inf (latents and text states are always finite: a non-finite one would
poison every epoch, so it stops the cache build naming the image or caption).  A corrupt or foreign file is
treated as missing and rebuilt; temporaries of a killed writer are removed when the folder is next opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from anima_trainer.fileio import remove_stale_temporaries

from anima_trainer.tensor_files import atomic_save

log = logging.getLogger(__name__)
CACHE_FORMAT_VERSION = 1
CACHE_FOLDER = ".anima_cache"
_SAMPLE = 1 << 20
_swept: set[Path] = set()  # folders whose stale temporaries this process already removed


def file_sha256(path: str | Path) -> str:
    """Full content hash (images, tokenizer files: small)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """Cheap identity of a multi-GB model file: size + its first, middle and last MiB (header included).

    Hashing 4 GB on every start would cost seconds; any replaced or re-saved checkpoint differs in these
    bytes (the safetensors header alone lists every tensor's dtype, shape and offset).
    """
    path = Path(path)
    if path.is_dir():  # every weight file below it: a diffusers-layout root keeps them in subfolders
        return hashlib.sha256("".join(model_fingerprint(p) for p in sorted(path.rglob("*.safetensors")))
                              .encode()).hexdigest()
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def entry_key(fields: dict) -> str:
    """Canonical JSON of what an entry depends on (with the format version)."""
    return json.dumps({**fields, "format": CACHE_FORMAT_VERSION}, sort_keys=True, separators=(",", ":"))


class CacheStore:
    """One folder of entries; `get` returns None for anything missing, foreign or corrupt."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        key = self.folder.absolute()
        if key not in _swept:  # once per folder and process (a store is opened per image)
            _swept.add(key)
            for p in remove_stale_temporaries(self.folder):
                log.info("removed %s, left by a killed cache write", p)

    def path_for(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"

    def lookup(self, key: str) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """(tensors or None, whether a file was there but unusable: corrupt or written for another key)."""
        path = self.path_for(key)
        if not path.exists():
            return None, False
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if (f.metadata() or {}).get("anima_cache_key") != key:
                    return None, True
                return {k: f.get_tensor(k) for k in f.keys()}, False  # noqa: SIM118 - a safetensors handle, not a dict
        except (SafetensorError, OSError, ValueError) as e:
            log.warning("cache entry %s is unreadable (%s); rebuilding it", path, e)
            return None, True

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.lookup(key)[0]

    def put(self, key: str, tensors: dict[str, torch.Tensor], source: str = "") -> Path:
        """Write one entry; NonFiniteError (naming `source`, the image or caption) if a tensor holds NaN/Inf."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        what = f"cache entry of {source}: " if source else "cache entry "
        return atomic_save(tensors, self.path_for(key), {"anima_cache_key": key}, what=what)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


def store_for(image_path: Path) -> CacheStore:
    """Entries live beside the images (like kohya's .npz files), in a hidden folder per image folder."""
    return CacheStore(Path(image_path).parent / CACHE_FOLDER)
