"""The prompt bank (evaluation/prompt_bank.py): the built-in anime prompts, kohya prompt files through
sample/prompts.py, and the trigger put in or left out."""

from __future__ import annotations

import pytest

from anima_trainer.evaluation import prompt_bank as bank_module
from anima_trainer.evaluation.prompt_bank import (
    BANK_NEGATIVE,
    BUILTIN_PROMPTS,
    bank_from_file,
    builtin_bank,
    grid_bank,
    mentions_trigger,
    probe_bank,
    split_by_trigger,
    trigger_pairs,
    with_trigger,
)
from anima_trainer.sample.prompts import PromptFileError, SamplePrompt


def test_builtin_bank_covers_the_empty_prompt_characters_styles_and_scenes():
    bank = builtin_bank()
    assert 14 <= len(bank) <= 18 and len({p.text for p in bank}) == len(bank)
    assert bank[0].text == ""  # the unconditional prediction
    texts = [p.text for p in bank]
    assert sum("no humans" in t for t in texts) >= 3  # scenes without people
    assert sum(t.startswith(("masterpiece", "best quality", "score_9")) for t in texts) >= 12  # Anima tag order
    assert any("2girls" in t for t in texts) and any("1boy" in t for t in texts)
    assert any("watercolor" in t for t in texts) and any("pixel art" in t for t in texts)
    assert any(". " in t for t in texts)  # a natural-language part, as Anima's card recommends
    for index, entry in enumerate(bank):
        assert entry.source == "builtin" and entry.sample.negative_prompt == BANK_NEGATIVE
        assert (entry.sample.seed, entry.sample.width, entry.sample.steps) == (index, 512, 30)
        assert entry.sample.where == f"built-in prompt #{index}"
    assert tuple(texts) == BUILTIN_PROMPTS


def test_a_kohya_prompt_file_loads_through_sample_prompts(tmp_path, monkeypatch):
    path = tmp_path / "prompts.txt"
    path.write_text("# mine\nsks, 1girl, red dress --n lowres --w 768 --h 512 --d 7 --l 4\n"
                    f"{BUILTIN_PROMPTS[3]} --n {BANK_NEGATIVE}\n", encoding="utf-8")
    calls = []
    real = bank_module.load_sample_prompts
    monkeypatch.setattr(bank_module, "load_sample_prompts", lambda p: calls.append(p) or real(p))
    entries = bank_from_file(path)
    assert calls == [path]  # the one parser of kohya prompt files
    first = entries[0]
    assert first.source == "prompt_file" and first.sample == SamplePrompt("sks, 1girl, red dress", "lowres", 768, 512,
                                                                          7, 30, 4.0, 3.0)
    assert first.sample.where == f"{path} line 2"
    assert [e.text for e in probe_bank(path)] == [e.text for e in entries]  # the file replaces the bank
    assert [e.text for e in probe_bank()] == list(BUILTIN_PROMPTS)
    # the grids: the run's prompts first; the same prompt from a later source is left out (the built-in #3)
    grids = grid_bank(path, probe_bank(), None)
    assert [e.source for e in grids[:2]] == ["sample_prompts", "sample_prompts"]
    assert len(grids) == 2 + len(BUILTIN_PROMPTS) - 1
    # with a trigger each probe prompt comes with the trigger put in, then as written ("sks" alone: the empty one)
    triggered = grid_bank(None, probe_bank()[:2], "sks")
    assert [e.text for e in triggered] == ["sks", "", f"sks, {BUILTIN_PROMPTS[1]}", BUILTIN_PROMPTS[1]]
    assert triggered[2].sample.seed == triggered[3].sample.seed == 1  # the same seed: side by side
    path.write_text("cat --x 1\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"line 1: option --x is not known"):
        probe_bank(path)


def test_trigger_in_and_out():
    assert mentions_trigger("1girl, sks, smile", "sks") and mentions_trigger("SKS style", "sks")
    assert not mentions_trigger("tasks, 1girl", "sks") and not mentions_trigger("", "sks")
    assert mentions_trigger("1girl, ohwx (style)", "ohwx (style)")
    assert with_trigger("1girl, smile", "sks") == "sks, 1girl, smile"
    assert with_trigger("", "sks") == "sks" and with_trigger("a sks b", "sks") == "a sks b"
    assert split_by_trigger(["sks, a", "b", "c sks"], "sks") == (["b"], ["sks, a", "c sks"])
    without, with_ = trigger_pairs(["", "sks, 1girl", "1boy"], "sks")
    assert without == ["", "1boy"] and with_ == ["sks", "sks, 1boy"]
    with pytest.raises(ValueError, match="non-empty"):
        with_trigger("x", " ")
