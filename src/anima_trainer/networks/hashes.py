"""The model hashes kohya writes into every network file (`sshs_model_hash`, `sshs_legacy_hash`), and their check.

kohya (library/train_util.py `precalculate_safetensors_hashes`, called by each network's `save_weights`)
serialises the tensors with safetensors together with only the `ss_*` metadata keys and hashes those bytes the way
sd-webui-additional-networks does:

* `sshs_model_hash` (`addnet_hash_safetensors`): sha256 of everything after the header (8-byte length + JSON), i.e.
  of the tensor data alone; it equals the sha256 of the saved file's data section, which is also the ModelSpec
  `modelspec.hash_sha256` (there with a "0x" prefix; kohya leaves that key out, we write it);
* `sshs_legacy_hash` (`addnet_hash_legacy`): the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB
  of those bytes (the empty string's hash for a file under 1 MiB).  That window can fall into the header, whose
  metadata key order safetensors does not fix, so for a header over 1 MiB the value is not reproducible (kohya's
  neither); `verify_hashes` says so instead of claiming a mismatch.
Both are computed from the tensors exactly as written, so tools that trust the precomputed values see the file's.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import torch

LEGACY_OFFSET = 0x100000
LEGACY_SIZE = 0x10000


def addnet_hash_safetensors(data: io.BufferedIOBase) -> str:
    """sha256 (hex) of the data after a safetensors header."""
    data.seek(0)
    n = int.from_bytes(data.read(8), "little")
    data.seek(n + 8)
    h = hashlib.sha256()
    for chunk in iter(lambda: data.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def addnet_hash_legacy(data: io.BufferedIOBase) -> str:
    """First 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB."""
    data.seek(LEGACY_OFFSET)
    return hashlib.sha256(data.read(LEGACY_SIZE)).hexdigest()[:8]


def _hashed_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> io.BytesIO:
    """What kohya hashes: `tensors` serialised by safetensors with only the `ss_*` keys of `metadata`."""
    import safetensors.torch

    ss = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return io.BytesIO(safetensors.torch.save(cpu, ss or None))


def precalculate_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of `tensors` saved with the `ss_*` keys of `metadata`, as kohya."""
    buf = _hashed_bytes(tensors, metadata)
    return addnet_hash_safetensors(buf), addnet_hash_legacy(buf)


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`metadata` plus kohya's sshs_* hashes of `tensors` (and `modelspec.hash_sha256` where the file has a
    modelspec block): the metadata every saved network file carries."""
    out = dict(metadata or {})
    model_hash, legacy_hash = precalculate_hashes(tensors, out)
    out["sshs_model_hash"], out["sshs_legacy_hash"] = model_hash, legacy_hash
    if any(k.startswith("modelspec.") for k in out):
        out["modelspec.hash_sha256"] = "0x" + model_hash
    return out


def verify_hashes(path: str | Path) -> dict[str, str]:
    """For each hash key the file has: "ok", "differs (recomputed X)" or, for a legacy hash whose window lies in
    the metadata header, "not reproducible (...)".  The model hash is recomputed from the file's data section
    (what tools compute), the legacy hash as kohya computes it from the file's tensors and ss_* keys."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    with path.open("rb") as fh:
        data_hash = addnet_hash_safetensors(fh)
    buf = _hashed_bytes(tensors, meta)
    legacy = addnet_hash_legacy(buf)
    header_end = 8 + int.from_bytes(buf.getvalue()[:8], "little")
    out: dict[str, str] = {}

    def judge(key: str, expected: str) -> None:
        if key in meta:
            out[key] = "ok" if meta[key] == expected else f"differs (recomputed {expected})"

    judge("sshs_model_hash", data_hash)
    judge("modelspec.hash_sha256", "0x" + data_hash)
    if "sshs_legacy_hash" in meta:
        if meta["sshs_legacy_hash"] != legacy and header_end > LEGACY_OFFSET:
            out["sshs_legacy_hash"] = ("not reproducible (the 1 MiB window of kohya's legacy hash lies in the "
                                       "metadata header, whose key order safetensors does not fix)")
        else:
            judge("sshs_legacy_hash", legacy)
    return out
