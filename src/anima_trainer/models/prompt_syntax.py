"""ComfyUI's prompt-weight syntax, re-implemented so that captions tokenize exactly as ComfyUI does.

Why this matters for Anima: ComfyUI tokenizes every weighted segment of a prompt *separately*, so the
token ids of `name (series)` differ from a plain tokenizer call even though the Qwen weights are later
reset to 1.0.  A LoRA trained on ids ComfyUI never produces would see a (slightly) different input at
inference, so we reproduce ComfyUI's rules, quirks included:

* `(text)` multiplies the weight by 1.1, nested parentheses multiply again (`((x))` = 1.1 * 1.1);
* `(text:1.3)` sets the weight to 1.3 (it replaces, it does not multiply); the number is whatever
  Python's `float` accepts after the last `:`; the colon must not be the first character;
* `\\(` and `\\)` are literal parentheses; `[text]` is *not* special (plain text);
* an unmatched `)` makes the rest of that level plain text (ComfyUI's nesting counter goes negative);
* an `embedding:NAME` word (at the start of a segment or after a space/newline) is a textual-inversion
  reference.  We never load embeddings, which is what ComfyUI does when the file does not exist: the
  name is dropped and any text after it in the same segment is kept (whitespace-normalised), as is a
  trailing comma of the name.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

EMPHASIS = 1.1
EMBEDDING_PREFIX = "embedding:"
# Escaped parentheses are hidden behind sentinels while the parentheses are parsed (ComfyUI does the same).
_ESCAPES = (("\\)", "\x00\x01"), ("\\(", "\x00\x02"))
_EMBEDDING_SPLIT = re.compile(f"[ \n]{re.escape(EMBEDDING_PREFIX)}")


def _escape(text: str) -> str:
    for literal, sentinel in _ESCAPES:
        text = text.replace(literal, sentinel)
    return text


def _unescape(text: str) -> str:
    for literal, sentinel in _ESCAPES:
        text = text.replace(sentinel, literal[1])
    return text


def _top_level_groups(text: str) -> list[str]:
    """Split into plain runs and top-level `(...)` groups (groups keep their parentheses)."""
    groups: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    groups.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                groups.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        groups.append(current)
    return groups


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for group in _top_level_groups(text):
        if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
            inner = group[1:-1]
            inner_weight = weight * EMPHASIS
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out.extend(_weighted(inner, inner_weight))
        else:
            out.append((group, weight))
    return out


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """[(segment text with escapes resolved, weight)] in prompt order (ComfyUI `token_weights`)."""
    return [(_unescape(segment), weight) for segment, weight in _weighted(_escape(text), 1.0)]


def _drop_embedding(word: str) -> str:
    """What ComfyUI tokenizes for an `embedding:NAME rest` word whose embedding does not exist."""
    parts = word[len(EMBEDDING_PREFIX):].strip("\n").split()
    if not parts:
        return ""
    name, leftover = parts[0], " ".join(parts[1:])
    stripped = name.strip(",")
    logger.warning("prompt references %s%s; textual-inversion embeddings are not supported, ignoring it",
                   EMBEDDING_PREFIX, stripped or name)
    if len(stripped) < len(name):
        return f"{name[len(stripped):]} {leftover}"
    return leftover


def tokenizer_chunks(text: str) -> list[tuple[str, float]]:
    """The pieces ComfyUI hands to a tokenizer one by one, with their prompt weights.

    Each piece is tokenized on its own (no special tokens) and the ids are concatenated.
    """
    chunks: list[tuple[str, float]] = []
    for segment, weight in parse_prompt_weights(text):
        pieces = _EMBEDDING_SPLIT.split(segment)
        words = pieces[:1] + [EMBEDDING_PREFIX + p for p in pieces[1:]]
        for word in words:
            if word.startswith(EMBEDDING_PREFIX):
                word = _drop_embedding(word)
            if word:
                chunks.append((word, weight))
    return chunks
