"""kohya's sample-prompt files (`--sample_prompts`): .txt lines with ` --x value` options, .toml, .json.

Per-prompt defaults follow kohya's Anima previews (512×512, 30 steps, CFG 7.5, shift 3.0) except the seed:
kohya draws a random seed when none is given, we use the prompt's index so previews are comparable
across saves.

The whole file is parsed and checked when training starts (train/budget.py), so a mistake stops the run before
its first step with one line naming the file, the line (TOML: the `[[prompt.subset]]`, JSON: the list index),
the reason and the fix — never hours later at the first preview.  Like kohya, sizes are floored to multiples of
16 (at least 64) and steps clamped to 1..1000; a side above `PREVIEW_MAX_SIDE` is an error (it would take
longer than the training step it is meant to show).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anima_trainer.config.errors import ConfigError

PREVIEW_MAX_SIDE = 4096  # px; 4096² = 65536 image tokens, the DiT's largest trained size (docs/training.md)
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


class PromptFileError(ConfigError):
    """A mistake in the sample-prompt file; the message names the file, the place, the reason and the fix."""


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 30
    cfg: float = 7.5
    shift: float = 3.0
    where: str = field(default="", compare=False, repr=False)  # "p.txt line 3": for later messages

    def normalised(self, index: int) -> SamplePrompt:
        """Sizes floored to multiples of 16 (min 64), steps clamped to 1..1000, seed defaulted to `index`."""
        fix = lambda v: max(64, int(v) // 16 * 16)  # noqa: E731
        return SamplePrompt(self.prompt, self.negative_prompt, fix(self.width), fix(self.height),
                            index if self.seed is None else int(self.seed), min(1000, max(1, int(self.steps))),
                            float(self.cfg), float(self.shift), self.where)


_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "cfg",
                "fs": "shift"}
_IGNORED_TXT = {"g", "ss", "ctr", "rcfg"}  # parsed but unused by Anima in kohya too
_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "sample_steps": "steps", "scale": "cfg", "flow_shift": "shift"}
_FIELD_NAMES = {"txt": {v: f"--{k}" for k, v in _TXT_OPTIONS.items()}, "dict": {v: k for k, v in _DICT_KEYS.items()}}
_EXAMPLES = {"width": "768", "height": "768", "seed": "42", "steps": "28", "cfg": "4.5", "shift": "3.0"}


def _check_value(name: str, value: Any, style: str) -> Any:
    """One option's value, converted and range-checked; ValueError naming the option (as written) and a fix."""
    opt = _FIELD_NAMES[style][name]
    if name in ("prompt", "negative_prompt"):
        if value is None and name == "negative_prompt":
            return ""
        if not isinstance(value, str):
            raise ValueError(f"{opt} must be a string, got {type(value).__name__} {_short(value)}; write "
                             f"{opt} = \"text\" (one prompt per entry)")
        return value
    integer = name in ("width", "height", "seed", "steps")
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError  # noqa: TRY004 - caught below, reported as the option's ValueError
        if integer:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number: int | float = int(value)
        else:
            number = float(value)
    except (ValueError, OverflowError):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{opt} must be {kind}, got {_short(value)}; write e.g. "
                         f"{opt} {'= ' if style == 'dict' else ''}{_EXAMPLES[name]}") from None
    if name in ("cfg", "shift") and not math.isfinite(number):
        raise ValueError(f"{opt} must be a finite number, got {_short(value)}; write e.g. "
                         f"{opt} {'= ' if style == 'dict' else ''}{_EXAMPLES[name]}")
    if name == "shift" and number <= 0:
        raise ValueError(f"{opt} must be > 0, got {_short(value)}; Anima's default is 3.0")
    if name in ("width", "height") and number > PREVIEW_MAX_SIDE:
        raise ValueError(f"{opt} {number} is larger than the preview limit of {PREVIEW_MAX_SIDE} px; use at most "
                         f"{PREVIEW_MAX_SIDE} (1024 is Anima's native size)")
    if name == "seed" and not SEED_RANGE[0] <= number < SEED_RANGE[1]:
        raise ValueError(f"{opt} {number} is outside the seed range [-2**63, 2**64); use e.g. "
                         f"{opt} {'= ' if style == 'dict' else ''}42")
    return number


def _short(value: Any, keep: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= keep else text[:keep] + "…"


def parse_prompt_line(line: str) -> SamplePrompt:
    """`text --n negative --w 768 --d 5` → SamplePrompt; ValueError (unknown option letter, bad value) says why."""
    parts = (" " + line).split(" --")
    fields: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        if key in _IGNORED_TXT:
            continue
        if key not in _TXT_OPTIONS:
            raise ValueError(f"option --{key} is not known (known: {', '.join('--' + k for k in _TXT_OPTIONS)}; "
                             "a literal ' --' inside the prompt text is read as an option)")
        name = _TXT_OPTIONS[key]
        fields[name] = _check_value(name, value.strip(), "txt")
    return SamplePrompt(**fields)


def _from_dict(entry: Any, defaults: dict) -> SamplePrompt:
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"expected a prompt string or an object with \"prompt\", got {type(entry).__name__} "  # noqa: TRY004
                         f"{_short(entry)}")
    merged = {**defaults, **entry}
    unknown = sorted(set(merged) - set(_DICT_KEYS))
    if unknown:
        raise ValueError(f"keys {unknown} are not known (known: {sorted(_DICT_KEYS)})")
    if "prompt" not in merged:
        raise ValueError("has no \"prompt\"; add prompt = \"...\"")
    return SamplePrompt(**{_DICT_KEYS[k]: _check_value(_DICT_KEYS[k], v, "dict") for k, v in merged.items()})


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"sample_prompts: {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise PromptFileError(f"sample_prompts: {path} is a folder; give a .txt, .toml or .json file") from None
    except OSError as e:
        raise PromptFileError(f"sample_prompts: {path} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PromptFileError(f"sample_prompts: {path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                              "save the file as UTF-8") from None


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """All prompts of a kohya prompt file, checked and normalised (sizes, steps, seeds).

    Any mistake → PromptFileError (a ConfigError): `sample_prompts: <file> <place>: <reason>; <fix>`."""
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    prompts: list[SamplePrompt] = []
    if suffix == ".toml":
        try:
            doc = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as e:
            raise PromptFileError(f"sample_prompts: {path} is not valid TOML: {str(e) or 'nested too deeply'}") \
                from None
        table = doc.get("prompt", {})
        if not isinstance(table, dict):
            raise PromptFileError(f"sample_prompts: {path}: 'prompt' must be a table ([prompt] with "
                                  "[[prompt.subset]] entries)")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        subsets = table.get("subset", [])
        if not isinstance(subsets, list):
            raise PromptFileError(f"sample_prompts: {path}: 'prompt.subset' must be an array of tables "
                                  "([[prompt.subset]])")
        for i, entry in enumerate(subsets):
            where = f"{path} [[prompt.subset]] #{i + 1}"
            try:
                prompts.append(_with_where(_from_dict(entry, defaults), where))
            except ValueError as e:
                raise PromptFileError(f"sample_prompts: {where}: {e}") from None
    elif suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"sample_prompts: {path} line {e.lineno} column {e.colno}: not valid JSON: "
                                  f"{e.msg}") from None
        except RecursionError:
            raise PromptFileError(f"sample_prompts: {path} is not usable JSON: nested too deeply") from None
        if not isinstance(doc, list):
            raise PromptFileError(f"sample_prompts: {path}: expected a JSON list of prompts "
                                  f"([\"a prompt\", {{\"prompt\": \"...\", \"width\": 768}}]), got "
                                  f"{type(doc).__name__}")
        for i, entry in enumerate(doc):
            where = f"{path} [{i}]"
            try:
                prompts.append(_with_where(_from_dict(entry, {}), where))
            except ValueError as e:
                raise PromptFileError(f"sample_prompts: {where}: {e}") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path} line {n}"
            try:
                prompts.append(_with_where(parse_prompt_line(line), where))
            except ValueError as e:
                raise PromptFileError(f"sample_prompts: {where}: {e}") from None
    if not prompts:
        raise PromptFileError(f"sample_prompts: {path} contains no sample prompts (a .txt file: one prompt per "
                              "line; .toml: [[prompt.subset]] tables; .json: a list)")
    return [p.normalised(i) for i, p in enumerate(prompts)]


def _with_where(prompt: SamplePrompt, where: str) -> SamplePrompt:
    prompt.where = where
    return prompt
