"""Our own regenerator of the random reference models behind ``tests/fixtures/anima_ref``.

The fixture README defines every weight by (seed, tensor name, shape, offset, scale): element i of a
tensor is ``offset + scale * u_i`` where ``u_i`` comes from numpy's Philox4x64 keyed by the first
16 bytes of ``sha256("anima-ref-weightgen/1:<seed>:<name>")``.  The file layout (sorted names,
sorted compact JSON header padded with spaces to 8 bytes) is reproduced too, so the generated file's
sha256 can be checked against the one the fixture manifest records.

Generated files are cached (``ANIMA_TEST_CACHE``, default a folder under the system temp dir) and
written atomically, so parallel or repeated test runs never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "anima_ref"
SPEC_FORMAT = "anima-ref-weightgen/1"
_ITEMSIZE = {"F32": 4, "BF16": 2}

# name -> (spec file, expected sha256 of the generated file, per the fixture README)
REFERENCE_MODELS = {
    "tiny_dit": ("tiny_dit_spec.json", "7379c08d75262a752c24aba44c36fc2a4b3b667471deb3a1b8daf97f97fcec5b"),
    "qwen3": ("qwen3_spec.json", "b641d3bba87e583dd300b4644ead0402bbd16adcdc84793753676c5f6a28f80f"),
    "vae": ("vae_spec.json", "ee8b804ac3ced224d2328f324acc54d690b66a80052e78672d46bf278a289fe0"),
}


def _bit_generator(seed: int, name: str) -> np.random.Philox:
    """Philox keyed by the first 16 bytes of sha256 of the tensor's identity (README definition)."""
    digest = hashlib.sha256(f"{SPEC_FORMAT}:{int(seed)}:{name}".encode()).digest()
    return np.random.Philox(key=np.frombuffer(digest[:16], dtype="<u8").astype(np.uint64))


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns with round-to-nearest-even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + bias) >> np.uint32(16)).astype(np.uint16)


def tensor_bytes(seed: int, entry: dict) -> bytes:
    """Little-endian bytes of one spec'd tensor, in its file dtype."""
    count = int(np.prod(entry["shape"], dtype=np.int64))
    values = np.empty(count, dtype=np.float32)
    bits = _bit_generator(seed, entry["name"])
    step = 1 << 24
    for start in range(0, count, step):
        stop = min(count, start + step)
        raw = bits.random_raw(stop - start)
        u = ((raw >> np.uint64(40)).astype(np.float64) + 0.5) / float(1 << 23) - 1.0
        values[start:stop] = (float(entry["offset"]) + float(entry["scale"]) * u).astype(np.float32)
    if entry["dtype"] == "F32":
        return values.astype("<f4").tobytes()
    if entry["dtype"] == "BF16":
        return _to_bf16_bits(values).astype("<u2").tobytes()
    raise ValueError(f"unsupported dtype {entry['dtype']!r}")


def write_spec(spec: dict, path: Path) -> str:
    """Write the spec'd safetensors file byte-exactly; returns its sha256."""
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"spec format {spec.get('format')!r} is not {SPEC_FORMAT!r}")
    entries = sorted(spec["tensors"], key=lambda e: e["name"])
    header: dict = {}
    offset = 0
    for e in entries:
        nbytes = int(np.prod(e["shape"], dtype=np.int64)) * _ITEMSIZE[e["dtype"]]
        header[e["name"]] = {"dtype": e["dtype"], "shape": [int(s) for s in e["shape"]],
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if spec.get("metadata"):
        header["__metadata__"] = {str(k): str(v) for k, v in spec["metadata"].items()}
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        head = struct.pack("<Q", len(blob)) + blob
        f.write(head)
        sha.update(head)
        for e in entries:
            data = tensor_bytes(spec["seed"], e)
            f.write(data)
            sha.update(data)
    return sha.hexdigest()


def load_spec(spec_file: str) -> dict:
    return json.loads((FIXTURES / spec_file).read_text())


def cache_dir() -> Path:
    root = Path(os.environ.get("ANIMA_TEST_CACHE") or Path(tempfile.gettempdir()) / "anima-trainer-test-models")
    root.mkdir(parents=True, exist_ok=True)
    return root


def reference_model(name: str) -> Path:
    """Path of a regenerated reference model, generating (and hash-checking) it on first use."""
    spec_file, expected_sha = REFERENCE_MODELS[name]
    target = cache_dir() / f"{name}_{expected_sha[:12]}.safetensors"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        sha = write_spec(load_spec(spec_file), Path(tmp))
        if sha != expected_sha:
            raise AssertionError(f"regenerated {name} has sha256 {sha}, the fixture README says {expected_sha}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
