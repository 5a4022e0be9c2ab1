"""Write a SentencePiece model file (protobuf wire format) for the tests, from a reference tokenizer.json.

Only what `download/t5.py` reads: pieces (string, float score, type), trainer_spec (model_type, unk_id, eos_id,
pad_id, bos_id) and normalizer_spec (name, precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint(num << 3 | wire)
    if wire == 0:
        return key + _varint(int(payload))
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload  # wire 5: 4 raw bytes


def spm_from_tokenizer_json(tokenizer_json: Path, out: Path, pieces: int = 32000) -> None:
    """A T5-style spiece.model holding the first `pieces` Unigram entries and the normalizer's charsmap."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"][:pieces]
    charsmap = base64.b64decode(data["normalizer"]["normalizers"][0]["precompiled_charsmap"])
    types = {"<pad>": 3, "</s>": 3, "<unk>": 2}
    buf = bytearray()
    for piece, score in vocab:
        msg = _field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", score))
        msg += _field(3, 0, types.get(piece, 1))
        buf += _field(1, 2, msg)
    trainer = _field(3, 0, 1) + _field(4, 0, pieces) + _field(40, 0, 2) + _field(41, 0, -1) + _field(42, 0, 1)
    trainer += _field(43, 0, 0)
    buf += _field(2, 2, trainer)
    normalizer = _field(1, 2, b"nmt_nfkc") + _field(2, 2, charsmap) + _field(3, 0, 1) + _field(4, 0, 1)
    buf += _field(3, 2, normalizer)
    out.write_bytes(bytes(buf))
