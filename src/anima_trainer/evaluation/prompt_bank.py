"""The prompts a network is measured and shown on: the run's sample prompts, a user's prompt file (both in kohya's
prompt syntax, read by sample/prompts.py) and a built-in bank of anime prompts, with the trigger word put in or
left out.

The built-in bank covers what a LoRA most often breaks: characters the base model knows (character and series
tags), styles and media, scenes without people, several people, and the empty prompt (the unconditional
prediction every CFG step uses).  It is written as Anima users write prompts: Danbooru tags in Anima's order —
quality / meta / year / safety tags, then the count (1girl, 1boy, no humans), character, series, general tags —
with natural-language sentences on some entries, and the negative prompt of Anima's official ComfyUI workflow.
Everything else of a bank prompt (size, steps, CFG, shift) is kohya's preview default, and its seed is its index,
as for a prompt-file line without options.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from anima_trainer.sample.prompts import SamplePrompt, load_sample_prompts

# Anima's official ComfyUI workflow (image_anima_base_v1) negative prompt
BANK_NEGATIVE = "worst quality, low quality, score_1, score_2, score_3, blurry, jpeg artifacts, sepia"

BUILTIN_PROMPTS: tuple[str, ...] = (
    "",  # the empty prompt: the unconditional prediction of every CFG step
    "masterpiece, best quality, score_9, safe, 1girl, solo, long hair, brown hair, school uniform, smile, "
    "looking at viewer, classroom, upper body",
    "masterpiece, best quality, safe, 1boy, solo, short hair, black hair, black jacket, hands in pockets, "
    "city street, night, neon lights, cowboy shot",
    "best quality, score_8, safe, 1girl, hatsune miku, vocaloid, twintails, aqua hair, headset, singing, "
    "stage, spotlight",
    "best quality, safe, 1girl, hakurei reimu, touhou, red bow, detached sleeves, shrine, torii, autumn leaves",
    "best quality, safe, 1girl, frieren, sousou no frieren, elf, white hair, twintails, holding staff, meadow, "
    "flowers, wind",
    "masterpiece, best quality, safe, 2girls, multiple girls, holding hands, sundress, beach, ocean, summer, "
    "blue sky, smile",
    "best quality, safe, 1girl, chibi, cat ears, oversized hoodie, simple background, white background, full body",
    "masterpiece, best quality, no humans, scenery, fantasy, castle, mountains, sunset, clouds, wide shot",
    "best quality, no humans, scenery, cyberpunk, city, rain, night, reflections, neon sign, puddle",
    "best quality, safe, 1girl, solo, watercolor (medium), traditional media, flower field, sun hat, white dress",
    "best quality, 1boy, solo, monochrome, greyscale, sketch, lineart, portrait, glasses, white background",
    "best quality, pixel art, 1girl, knight, armor, sword, dungeon, torch, dark",
    "masterpiece, best quality, newest, safe, 1girl, solo, kimono, summer festival, night, fireworks, "
    "paper lantern, from behind",
    "best quality, no humans, food, ramen, chopsticks, steam, still life, close-up, wooden table",
    "score_9, score_8, year 2024, safe, 1girl, solo, red hair, maid, cafe, holding tray, cake. A cheerful maid "
    "carries a tray of cakes through a bright cafe. Sunlight falls through the tall windows behind her.",
)


@dataclass(frozen=True)
class BankPrompt:
    """One prompt of a bank, with its settings (a `SamplePrompt`: negative, size, seed, steps, CFG, shift) and
    where it came from: "sample_prompts" (the run's file), "prompt_file" (the user's) or "builtin"."""

    sample: SamplePrompt
    source: str

    @property
    def text(self) -> str:
        return self.sample.prompt


def builtin_bank() -> list[BankPrompt]:
    """The built-in prompts as bank entries (negative `BANK_NEGATIVE`, seed = index, kohya's preview defaults)."""
    out = []
    for index, text in enumerate(BUILTIN_PROMPTS):
        sample = SamplePrompt(text, BANK_NEGATIVE).normalised(index)
        sample.where = f"built-in prompt #{index}"
        out.append(BankPrompt(sample, "builtin"))
    return out


def bank_from_file(path: str | Path, source: str = "prompt_file") -> list[BankPrompt]:
    """Every prompt of a kohya prompt file (.txt with ` --n/--w/--h/--d/--s/--l/--fs` options, .toml, .json),
    read and checked by `sample.prompts.load_sample_prompts` (its PromptFileError names file, place and fix)."""
    return [BankPrompt(sample, source) for sample in load_sample_prompts(path)]


def probe_bank(prompt_file: str | Path | None = None) -> list[BankPrompt]:
    """The prompts drift and response are measured on: the prompt file when given (training's `eval_prompts`,
    eval's `--prompts`), else the built-in bank.  Training and `anima-trainer eval` both take their probe from
    here, so an evaluation of a run's checkpoints measures the prompts the run logged its metrics on."""
    return bank_from_file(prompt_file) if prompt_file is not None else builtin_bank()


def _trigger_pattern(trigger: str) -> re.Pattern[str]:
    if not trigger.strip():
        raise ValueError("the trigger must be a non-empty word or tag")
    return re.compile(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", re.IGNORECASE)


def mentions_trigger(text: str, trigger: str) -> bool:
    """Whether `text` contains `trigger` as a whole word or tag (case-insensitive): "sks" is in "1girl, sks"
    and "SKS style", not in "tasks"."""
    return _trigger_pattern(trigger).search(text) is not None


def with_trigger(text: str, trigger: str) -> str:
    """`text` with the trigger as its first tag ("trigger, text"; the empty prompt becomes "trigger"); unchanged
    when it already mentions the trigger."""
    if mentions_trigger(text, trigger):
        return text
    return f"{trigger.strip()}, {text}" if text.strip() else trigger.strip()


def grid_bank(sample_prompts: str | Path | None, probe: Sequence[BankPrompt], trigger: str | None) -> list[BankPrompt]:
    """The prompts the evaluation's grids draw, in order: the run's sample prompts (what the user wanted to see),
    then the probe prompts — each with the trigger put in before it as written, when there is a trigger, so the
    concept and its leak sit side by side.  A prompt (with the same negative) already listed is left out."""
    entries = bank_from_file(sample_prompts, "sample_prompts") if sample_prompts is not None else []
    for entry in probe:
        if trigger:
            entries.append(BankPrompt(replace(entry.sample, prompt=with_trigger(entry.text, trigger)), entry.source))
        entries.append(entry)
    seen: set[tuple[str, str]] = set()
    unique = []
    for entry in entries:
        key = (entry.sample.prompt, entry.sample.negative_prompt)
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique


def split_by_trigger(texts: Iterable[str], trigger: str) -> tuple[list[str], list[str]]:
    """(prompts without the trigger, prompts with it), each in the given order."""
    pattern = _trigger_pattern(trigger)
    without, with_ = [], []
    for text in texts:
        (with_ if pattern.search(text) else without).append(text)
    return without, with_


def trigger_pairs(texts: Sequence[str], trigger: str) -> tuple[list[str], list[str]]:
    """The prompts that do not mention the trigger, and the same prompts with it put in: the matched sets that
    preservation drift and trigger response compare (the leak score is their ratio)."""
    without, _ = split_by_trigger(texts, trigger)
    return without, [with_trigger(text, trigger) for text in without]
