"""Captions: finding and reading caption files (DreamBooth style).

Reading happens once, at scan time: the caption file next to the image (`<stem><caption_extension>`),
UTF-8 (a BOM is dropped; other encodings: see textfiles.py), stripped.  Without `enable_wildcard` only the
first line is kept (kohya); with it, every non-empty line is kept (joined by "\n") and `process_caption`
picks one per step.
No caption file -> the subset's `class_tokens`, else an empty caption, as in kohya (listed in the start-up
report; `strict_captions` makes it a DatasetConfigError naming the images).
An existing but empty caption file gives the empty caption (a deliberate unconditional sample).

`process_caption` turns that raw caption into the text of one training sample (kohya_anima.md §2.3).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Protocol

from .config import DatasetConfigError
from .params import CaptionParams
from .textfiles import read_text

log = logging.getLogger(__name__)

_COMMON_EXTENSIONS = (".txt", ".caption", ".tags")


def caption_path(image: Path, extension: str) -> Path:
    """`<stem><extension>` next to the image (kohya: splitext(image)[0] + extension)."""
    return image.parent / (image.stem + extension)


def read_caption(path: Path, *, all_lines: bool = False) -> str:
    """First line, stripped; with `all_lines` (kohya's enable_wildcard) every non-empty stripped line,
    joined by "\n"."""
    try:
        text = read_text(path)  # UTF-8, else a reported fallback (textfiles.py)
    except OSError as e:
        raise DatasetConfigError(f"caption file {path} cannot be read: {e.strerror or e} (fix its permissions, "
                                 "or remove it to use class_tokens)") from None
    lines = text.splitlines()
    if all_lines:
        caption = "\n".join(line.strip() for line in lines if line.strip())
    else:
        caption = lines[0].strip() if lines else ""
    if not caption:
        log.warning("caption file %s is empty; the image trains with an empty caption", path)
    return caption


def captions_for_images(
    images: list[Path], extension: str, class_tokens: str | None, where: str = "", *, enable_wildcard: bool = False,
    uncaptioned: list[tuple[Path, str]] | None = None,
) -> list[str]:
    """One raw caption per image.  An image without a caption file trains as in kohya: with the subset's
    `class_tokens`, else with an empty caption; it is appended to `uncaptioned` as (image, caption used) for the
    start-up report (and for `missing_captions_error` under strict_captions).  A folder standing where a caption
    file should be is always an error.  `enable_wildcard` keeps all lines of multi-line caption files (see
    `read_caption`)."""
    captions, missing, blocked = [], [], []
    for image in images:
        path = caption_path(image, extension)
        if path.is_file():
            captions.append(read_caption(path, all_lines=enable_wildcard))
            continue
        (blocked if path.exists() else missing).append(image)
        captions.append(class_tokens if class_tokens is not None else "")
    if blocked:
        prefix = f"{where}: " if where else ""
        raise DatasetConfigError(
            f"{prefix}{len(blocked)} image(s) have no caption file ({extension}): something that is not a file "
            f"stands where it should be: {_shown(blocked)}; remove or rename it (an image without a caption file "
            "trains with the subset's class_tokens, else an empty caption)")
    if uncaptioned is not None:
        uncaptioned.extend((image, class_tokens if class_tokens is not None else "") for image in missing)
    return captions


def missing_captions_error(missing: list[Path], extensions: dict[Path, str]) -> DatasetConfigError:
    """strict_captions: one error naming every image of every subset without a caption file (`extensions`:
    each image's caption_extension), with a hint when the first has a caption under another common extension."""
    exts = sorted({extensions[p] for p in missing})
    hint = ""
    for ext in _COMMON_EXTENSIONS:
        if ext != extensions[missing[0]] and caption_path(missing[0], ext).is_file():
            hint = f"; found {caption_path(missing[0], ext).name}: set caption_extension = \"{ext}\""
            break
    return DatasetConfigError(
        f"{len(missing)} image(s) have no caption file ({', '.join(exts)}) and strict_captions is on: "
        f"{_shown(missing)}{hint}; add the caption files, or set strict_captions = false to train them with their "
        "subset's class_tokens, else an empty caption (kohya)")


def _shown(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


# --- per-step processing (kohya's BaseDataset.process_caption) ---------------------------------------------

class CaptionRng(Protocol):
    """The draws `process_caption` makes; `random.Random` satisfies it (tests script it)."""

    def random(self) -> float: ...
    def choice(self, seq: list[str]) -> str: ...
    def shuffle(self, x: list[str]) -> None: ...


# `{{` and `}}` are literal braces; `{a|b|c}` (no braces inside, not empty) is one random alternative.
_WILDCARD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


def expand_wildcards(text: str, rng: CaptionRng) -> str:
    """`{a|b|c}` -> one of a / b / c (one draw per group, left to right); `{{` -> `{`, `}}` -> `}`."""

    def one(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return rng.choice(m.group(1).split("|"))

    return _WILDCARD.sub(one, text)


def warmup_steps(params: CaptionParams, max_train_steps: int | None) -> int:
    """token_warmup_step in steps: as given when >= 1, else a fraction of max_train_steps (kohya)."""
    w = params.token_warmup_step
    if w <= 0:
        return 0
    if w >= 1:
        return math.floor(w)
    if max_train_steps is None:
        raise ValueError(f"token_warmup_step = {w:g} is a fraction of max_train_steps, which was not given")
    return math.floor(w * max_train_steps)


def _tags(text: str, sep: str) -> list[str]:
    # kohya keeps empty tags in the keep_tokens path ("a, b," -> "a, b, " / "a, , b" after a shuffle);
    # we drop them everywhere, as kohya does in the keep_tokens_separator path.
    return [t for t in (part.strip() for part in text.split(sep)) if t]


def process_caption(
    raw: str,
    params: CaptionParams,
    *,
    rng: CaptionRng,
    epoch: int,
    step: int = 0,
    max_train_steps: int | None = None,
) -> str:
    """The caption of one training sample, in kohya's order (kohya_anima.md §2.3):

    1. caption dropout -> "" (the text side encodes "" like ComfyUI's empty prompt): with probability
       `caption_dropout_rate` (one draw, only when the rate is > 0), or in every `caption_dropout_every_n_epochs`-th
       epoch counted from 1 (kohya's `current_epoch`), i.e. when `(epoch + 1) % n == 0` for our 0-based `epoch`;
       a dropped caption skips every later step;
    2. line: with `enable_wildcard` one random line of a multi-line caption (a draw only if there are
       several), else the first line;
    3. `caption_prefix` + " " + line + " " + `caption_suffix` (kohya joins with a space; the prefix and
       suffix are ordinary text from here on, so they are shuffled / dropped unless `keep_tokens` or a
       `keep_tokens_separator` inside them protects them);
    4. with `enable_wildcard`: `{a|b}` -> one alternative, `{{` / `}}` -> literal braces (prefix/suffix too);
    5. if `shuffle_caption`, `caption_tag_dropout_rate` > 0 or `token_warmup_step` > 0 (or the caption
       contains `keep_tokens_separator`): split by `caption_separator` into fixed / flexible / fixed-suffix
       tags -- by the first and second `keep_tokens_separator` when it occurs, else the first `keep_tokens`
       tags are fixed --, then on the flexible tags only: token-warmup truncation (the first
       `floor(step * (n - token_warmup_min) / warmup) + token_warmup_min` while step < warmup), shuffle,
       tag dropout (one draw per tag, dropped when draw < rate); re-join all with ", " (kohya's fixed join);
    6. `secondary_separator` -> `caption_separator` (so "sky;;;cloud" is one tag in step 5, "sky,cloud" after).

    Deliberate differences from kohya: the prefix/suffix go on the chosen line (kohya adds them before the
    line choice, so a multi-line caption got the prefix only on its first line and the suffix only on its
    last); `keep_tokens_separator` markers are removed even without shuffle / tag dropout / warmup (kohya
    leaves "|||" in the text then); empty tags are dropped (see `_tags`).  Textual-inversion token
    replacement does not apply (no TI training here).

    `rng` supplies every random draw (pass a `random.Random` seeded per sample); `step` is the optimizer
    step, used by token warmup only; `max_train_steps` is needed only for a fractional `token_warmup_step`.
    """
    p = params
    # 1. caption dropout (kohya draws for the rate first, then checks the epoch)
    dropped = p.caption_dropout_rate > 0 and rng.random() < p.caption_dropout_rate
    if not dropped and p.caption_dropout_every_n_epochs > 0:
        dropped = (epoch + 1) % p.caption_dropout_every_n_epochs == 0
    if dropped:
        return ""

    # 2. line choice
    if p.enable_wildcard:
        lines = [line for line in raw.split("\n") if line.strip()] or [""]
        caption = lines[0] if len(lines) == 1 else rng.choice(lines)
    else:
        caption = raw.split("\n", 1)[0]

    # 3. prefix / suffix
    if p.caption_prefix:
        caption = p.caption_prefix + " " + caption
    if p.caption_suffix:
        caption = caption + " " + p.caption_suffix

    # 4. wildcards
    if p.enable_wildcard:
        caption = expand_wildcards(caption, rng)

    # 5. fixed / flexible tags: warmup, shuffle, tag dropout
    sep, marker = p.caption_separator, p.keep_tokens_separator
    has_marker = bool(marker) and marker in caption
    if p.shuffle_caption or p.caption_tag_dropout_rate > 0 or p.token_warmup_step > 0 or has_marker:
        fixed_suffix: list[str] = []
        if has_marker:
            fixed_part, flex_part = caption.split(marker, 1)
            if marker in flex_part:
                flex_part, suffix_part = flex_part.split(marker, 1)
                fixed_suffix = _tags(suffix_part, sep)
            fixed, flex = _tags(fixed_part, sep), _tags(flex_part, sep)
        else:
            tags = _tags(caption, sep)
            fixed, flex = tags[: p.keep_tokens], tags[p.keep_tokens :]

        warmup = warmup_steps(p, max_train_steps)
        if warmup and step < warmup:
            keep = math.floor(step * (len(flex) - p.token_warmup_min) / warmup) + p.token_warmup_min
            flex = flex[: max(keep, 0)]
        if p.shuffle_caption:
            rng.shuffle(flex)
        if p.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= p.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)

    # 6. secondary separator
    if p.secondary_separator:
        caption = caption.replace(p.secondary_separator, sep)
    return caption
