"""The T5 tokenizer folder: what makes it complete, `spiece.model` → `tokenizer.json`, strict validation.

Why a converter: `google/t5-v1_1-base` (sd-scripts-anima's default source) ships only `spiece.model`, and
transformers 5 turns that into a fast tokenizer only with the `sentencepiece` package, which anima-trainer does
not require.  The SentencePiece model is a small protobuf (pieces with scores and types, the trainer and
normalizer specs); this module reads it directly and builds the same `tokenizers` pipeline as ComfyUI's
`t5_tokenizer/tokenizer.json` (Unigram over the 32000 pieces + 100 `<extra_id_N>`, the precompiled NFKC
map, right-strip, runs of spaces → one `▁`, Metaspace with a prefix space, `</s>` appended).  The tests check
the result token-for-token against that reference file.

Strict validation (`t5_tokenizer_validate_strict`) checks exactly what Anima's LLM adapter relies on, measured
on the reference files: `<pad>`=0, `</s>`=1, `<unk>`=2; 32100 tokens (32000 SentencePiece pieces + 100 extra
ids: `<extra_id_0>`=32099 … `<extra_id_99>`=32000), all below the 32128 rows of T5's embedding; a Unigram
`tokenizer.json`; and a fixed sentence encoding to known ids.  sd-scripts-anima's strict mode only checked that
the special ids are in range (seed_system.md §3.4).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from anima_trainer.tools.download.errors import SourceError

SPECIAL_IDS = {"<pad>": 0, "</s>": 1, "<unk>": 2}
SPM_PIECES = 32000
EXTRA_IDS = 100
TOKENS = SPM_PIECES + EXTRA_IDS  # 32100
MODEL_VOCAB = 32128  # rows of T5 v1.1's embedding (config.json vocab_size): 32100 padded to a multiple of 128
# A fixed sentence (NFKC full-width letters, a circled digit, a double space, a trailing space) and its ids,
# taken from ComfyUI's t5_tokenizer (identical to google/t5-v1_1-xxl's vocabulary).
SMOKE_TEXT = "anima strict validation: 1girl,  solo, ｆｕｌｌ-width ① café "
SMOKE_IDS = [3, 13607, 9, 6926, 16148, 10, 209, 18722, 6, 6729, 6, 423, 18, 12018, 189, 209, 11949, 1]
NEEDED = ("tokenizer.json", "spiece.model")  # at least one of them

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class TokenizerCheckError(ValueError):
    """The T5 tokenizer folder is not what Anima was trained with; the message lists every mismatch."""


# ------------------------------------------------------------------------------------ SentencePiece model

@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1  # UNIGRAM
    unk_id: int = 0
    eos_id: int = 2
    byte_fallback: bool = False
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; values are int, bytes or a 4/8-byte blob."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    while i < n:
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            yield num, wire, varint()
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated field")
            yield num, wire, buf[i:i + size]
            i += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield num, wire, buf[i:i + width]
            i += width
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _int32(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def read_spm(path: Path) -> SpmModel:
    """The parts of a SentencePiece `ModelProto` a tokenizer needs (field numbers of sentencepiece_model.proto)."""
    m = SpmModel()
    for num, wire, value in _fields(path.read_bytes()):
        if num == 1 and wire == 2:
            piece, score, kind = "", 0.0, _NORMAL
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            m.pieces.append((piece, score, kind))
        elif num == 2 and wire == 2:
            for f, w, v in _fields(value):
                if w == 0:
                    if f == 3:
                        m.model_type = v
                    elif f == 35:
                        m.byte_fallback = bool(v)
                    elif f == 40:
                        m.unk_id = _int32(v)
                    elif f == 42:
                        m.eos_id = _int32(v)
        elif num == 3 and wire == 2:
            for f, w, v in _fields(value):
                if f == 2 and w == 2:
                    m.charsmap = v
                elif f == 3 and w == 0:
                    m.add_dummy_prefix = bool(v)
                elif f == 4 and w == 0:
                    m.remove_extra_whitespaces = bool(v)
    if not m.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    return m


def spm_to_tokenizer_json(spiece: Path, out: Path, extra_ids: int = EXTRA_IDS) -> None:
    """Write the fast-tokenizer file for a T5 SentencePiece model (see module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    m = read_spm(spiece)
    if m.model_type != 1:
        raise ValueError(f"{spiece} is not a Unigram SentencePiece model (model_type {m.model_type})")
    extras = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
    vocab = [(p, s) for p, s, _ in m.pieces] + [(e, 0.0) for e in extras]
    tok = Tokenizer(Unigram(vocab, unk_id=m.unk_id, byte_fallback=m.byte_fallback))
    norms = [normalizers.Precompiled(m.charsmap)] if m.charsmap else []
    if m.remove_extra_whitespaces:
        norms += [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    tok.normalizer = normalizers.Sequence(norms)
    scheme = "first" if m.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always" if m.add_dummy_prefix else "never")
    specials = [p for p, _, kind in m.pieces if kind in (_CONTROL, _UNKNOWN)] + extras
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    eos = m.pieces[m.eos_id][0] if 0 <= m.eos_id < len(m.pieces) else "</s>"
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, m.eos_id)])
    tok.save(str(out))


# ----------------------------------------------------------------------------------- folder completeness

def missing_files(folder: Path) -> list[str]:
    """What the folder lacks for T5 loading ([] = complete)."""
    if any((folder / n).is_file() for n in NEEDED):
        return []
    return [" or ".join(NEEDED)]


def _sentencepiece_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentencepiece") is not None


def make_loadable(folder: Path) -> bool:
    """A folder with only `spiece.model` gets a `tokenizer.json` (transformers needs `sentencepiece` for it
    otherwise).  Returns True when a file was written."""
    if (folder / "tokenizer.json").is_file() or not (folder / "spiece.model").is_file():
        return False
    if _sentencepiece_available():
        return False
    spm_to_tokenizer_json(folder / "spiece.model", folder / "tokenizer.json")
    return True


def check_downloaded(folder: Path) -> None:
    """Sanity of freshly downloaded T5 files (a mirror may answer an error page with status 200); makes the
    folder loadable.  Raises SourceError, so that the download moves on to the next source."""
    try:
        _check_files(folder)
        make_loadable(folder)
    except Exception as e:  # noqa: BLE001 - JSON / protobuf / tokenizers errors alike: this source's files are unusable
        raise SourceError(f"the downloaded T5 tokenizer is broken: {e}") from None


def _check_files(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if (folder / name).is_file():
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise ValueError(f"{name} is not JSON ({type(e).__name__}: {e})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{name} is not a JSON object")
    if (folder / "spiece.model").is_file():
        read_spm(folder / "spiece.model")


# -------------------------------------------------------------------------------------- strict validation

def validate_t5_tokenizer(folder: Path) -> None:
    """Raise TokenizerCheckError listing every way `folder` differs from Anima's T5 tokenizer."""
    from transformers import T5TokenizerFast

    problems: list[str] = []
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise TokenizerCheckError(f"{folder}: no tokenizer.json")
    try:
        model = json.loads(tj.read_text(encoding="utf-8"))["model"]
        if not isinstance(model, dict):
            raise TypeError("'model' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise TokenizerCheckError(f"{tj}: not a tokenizers file ({type(e).__name__}: {e})") from None
    if model.get("type") != "Unigram":
        problems.append(f"tokenizer.json model type is {model.get('type')!r}, expected 'Unigram'")
    elif len(model.get("vocab", [])) != TOKENS:
        problems.append(f"tokenizer.json has {len(model.get('vocab', []))} tokens, expected {TOKENS} "
                        f"({SPM_PIECES} SentencePiece pieces + {EXTRA_IDS} <extra_id_N>)")
    config = folder / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise TokenizerCheckError(f"{config}: not a JSON file ({type(e).__name__}: {e})") from None
        if not isinstance(cfg, dict):
            raise TokenizerCheckError(f"{config}: not a JSON object")
        if cfg.get("vocab_size") != MODEL_VOCAB:
            problems.append(f"config.json vocab_size is {cfg.get('vocab_size')}, expected {MODEL_VOCAB}")
    try:
        tok = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises for a broken folder
        problems.append(f"cannot be loaded by T5TokenizerFast ({e})")
        raise TokenizerCheckError(f"{folder}: " + "; ".join(problems)) from None
    for token, want in SPECIAL_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            problems.append(f"{token} has id {got}, expected {want}")
    for attr, token in (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
        if getattr(tok, attr) != token:
            problems.append(f"{attr} is {getattr(tok, attr)!r}, expected {token!r}")
    if len(tok) != TOKENS:
        problems.append(f"the tokenizer has {len(tok)} tokens, expected {TOKENS}")
    vocab = tok.get_vocab()
    for i in (0, EXTRA_IDS - 1):
        token, want = f"<extra_id_{i}>", TOKENS - 1 - i
        if vocab.get(token) != want:
            problems.append(f"{token} is {'missing' if token not in vocab else f'id {vocab[token]}'}, "
                            f"expected id {want}")
    if vocab and max(vocab.values()) >= MODEL_VOCAB:
        problems.append(f"largest token id {max(vocab.values())} is outside T5's {MODEL_VOCAB} embeddings")
    ids = tok(SMOKE_TEXT)["input_ids"]
    if ids != SMOKE_IDS:
        problems.append(f"{SMOKE_TEXT!r} encodes to {ids}, expected {SMOKE_IDS}")
    if problems:
        raise TokenizerCheckError(f"{folder}: " + "; ".join(problems))
