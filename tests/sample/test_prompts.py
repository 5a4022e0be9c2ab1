"""kohya sample-prompt files: .txt options, .toml and .json forms, normalisation and errors."""

from __future__ import annotations

import json

import pytest

from anima_trainer.sample.prompts import SamplePrompt, load_sample_prompts, parse_prompt_line


def test_txt_line_options():
    p = parse_prompt_line("1girl, smile --n worst quality, blurry --w 768 --h 1000 --d 5 --s 20 --l 4.5 --fs 2")
    assert p == SamplePrompt("1girl, smile", "worst quality, blurry", 768, 1000, 5, 20, 4.5, 2.0)
    assert parse_prompt_line("cat --ss euler --g 3").prompt == "cat"  # parsed-but-unused kohya options
    with pytest.raises(ValueError, match="--x is not known"):
        parse_prompt_line("cat --x 1")
    with pytest.raises(ValueError, match="--w must be an integer, got .wide.; write e.g. --w 768"):
        parse_prompt_line("cat --w wide")


def test_files_in_three_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\nfirst --w 100 --h 70 --s 0\nsecond --d 9\n", encoding="utf-8")
    a, b = load_sample_prompts(txt)
    assert (a.width, a.height, a.steps, a.seed, a.cfg, a.shift) == (96, 64, 1, 0, 7.5, 3.0)
    assert (b.seed, b.width) == (9, 512)
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 640\nscale = 4.0\n[[prompt.subset]]\nprompt = "a"\n'
                    '[[prompt.subset]]\nprompt = "b"\nwidth = 320\nsample_steps = 12\n', encoding="utf-8")
    a, b = load_sample_prompts(toml)
    assert (a.prompt, a.width, a.cfg, b.width, b.steps, b.seed) == ("a", 640, 4.0, 320, 12, 1)
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["plain", {"prompt": "x", "negative_prompt": "y", "seed": 3}]), encoding="utf-8")
    a, b = load_sample_prompts(js)
    assert (a.prompt, b.negative_prompt, b.seed) == ("plain", "y", 3)
    js.write_text(json.dumps([{"prompt": "x", "sampler": "euler"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="sampler"):
        load_sample_prompts(js)
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no sample prompts"):
        load_sample_prompts(tmp_path / "empty.txt")
