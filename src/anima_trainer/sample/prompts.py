"""kohya's sample-prompt files (`--sample_prompts`): .txt lines with ` --x value` options, .toml, .json.

Per-prompt defaults follow kohya's Anima previews (512×512, 30 steps, CFG 7.5, shift 3.0) except the seed:
kohya draws a random seed when none is given, we use the prompt's index so previews are comparable
across saves.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path


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

    def normalised(self, index: int) -> "SamplePrompt":
        """Sizes floored to multiples of 16 (min 64), steps clamped to 1..1000, seed defaulted to `index`."""
        fix = lambda v: max(64, int(v) // 16 * 16)  # noqa: E731
        return SamplePrompt(self.prompt, self.negative_prompt, fix(self.width), fix(self.height),
                            index if self.seed is None else int(self.seed), min(1000, max(1, int(self.steps))),
                            float(self.cfg), float(self.shift))


_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "cfg",
                "fs": "shift"}
_IGNORED_TXT = {"g", "ss", "ctr", "rcfg"}  # parsed but unused by Anima in kohya too
_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "sample_steps": "steps", "scale": "cfg", "flow_shift": "shift"}


def parse_prompt_line(line: str) -> SamplePrompt:
    """`text --n negative --w 768 --d 5` → SamplePrompt (unknown option letters are errors)."""
    parts = (" " + line).split(" --")
    fields: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        if key in _IGNORED_TXT:
            continue
        if key not in _TXT_OPTIONS:
            raise ValueError(f"sample prompt option --{key} is not known (known: "
                             f"{', '.join('--' + k for k in _TXT_OPTIONS)}): {line!r}")
        fields[_TXT_OPTIONS[key]] = value.strip()
    return _from_fields(fields, line)


def _from_fields(fields: dict, where: str) -> SamplePrompt:
    try:
        for name, cast in (("width", int), ("height", int), ("seed", int), ("steps", int), ("cfg", float),
                           ("shift", float)):
            if name in fields and fields[name] is not None:
                fields[name] = cast(fields[name])
    except ValueError as e:
        raise ValueError(f"sample prompt {where!r}: {e}") from None
    return SamplePrompt(**fields)


def _from_dict(entry: dict | str, defaults: dict) -> SamplePrompt:
    if isinstance(entry, str):
        entry = {"prompt": entry}
    merged = {**defaults, **entry}
    unknown = sorted(set(merged) - set(_DICT_KEYS))
    if unknown:
        raise ValueError(f"sample prompt keys {unknown} are not known (known: {sorted(_DICT_KEYS)})")
    return _from_fields({_DICT_KEYS[k]: v for k, v in merged.items()}, str(entry))


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """All prompts of a kohya prompt file, normalised (sizes, steps, seeds)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        table = tomllib.loads(text).get("prompt", {})
        defaults = {k: v for k, v in table.items() if k != "subset"}
        prompts = [_from_dict(e, defaults) for e in table.get("subset", [])]
    elif path.suffix == ".json":
        prompts = [_from_dict(e, {}) for e in json.loads(text)]
    else:
        prompts = [parse_prompt_line(line) for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} contains no sample prompts")
    return [p.normalised(i) for i, p in enumerate(prompts)]

