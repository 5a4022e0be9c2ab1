"""The T5 tokenizer folder: spiece.model → tokenizer.json (against the real tokenizer) and strict validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from anima_trainer.tools.download import t5
from anima_trainer.tools.download.errors import SourceError

TEXTS = [
    t5.SMOKE_TEXT, "1girl, solo, masterpiece, best quality", "  leading and trailing   ", "tab\tnew\nline",
    "日本語のテキスト、カタカナ", "Ünïcödé ﬁ ligature ㍻ ½ ①②", "emoji 😀 and <unk> literally", "",
    "(masterpiece:1.2), \\(escaped\\) [brackets]", "x </s> y <pad> <extra_id_0> <extra_id_99>",
]


@pytest.fixture
def spiece(spiece_bytes, tmp_path) -> Path:
    """A SentencePiece model with the real T5 pieces, scores and normalization map."""
    out = tmp_path / "spm" / "spiece.model"
    out.parent.mkdir()
    out.write_bytes(spiece_bytes)
    return out


def test_read_spm(spiece):
    m = t5.read_spm(spiece)
    assert len(m.pieces) == 32000 and (m.unk_id, m.eos_id, m.model_type) == (2, 1, 1)
    assert m.pieces[:3] == [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)]
    assert m.add_dummy_prefix and m.remove_extra_whitespaces and len(m.charsmap) > 100_000


def test_converted_tokenizer_matches_the_reference(spiece, tokenizers_dir, tmp_path):
    from transformers import T5TokenizerFast

    folder = tmp_path / "t5"
    folder.mkdir()
    shutil.copy(spiece, folder / "spiece.model")
    assert t5.missing_files(folder) == []
    assert t5.make_loadable(folder) and (folder / "tokenizer.json").is_file()
    assert not t5.make_loadable(folder)  # once
    ref = Tokenizer.from_file(str(tokenizers_dir / "t5" / "tokenizer.json"))
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text).ids == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids) == ref.decode(ref.encode(text).ids), text
    # through transformers, also with google/t5-v1_1-base's old-style config files next to it
    ref_t = T5TokenizerFast.from_pretrained(str(tokenizers_dir / "t5"))
    extra = [f"<extra_id_{i}>" for i in range(100)]
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 100,
         "additional_special_tokens": extra, "model_max_length": 512}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra}))
    ours_t = T5TokenizerFast.from_pretrained(str(folder))
    for text in TEXTS:
        assert ours_t(text)["input_ids"] == ref_t(text)["input_ids"], text
    t5.validate_t5_tokenizer(folder)


def test_strict_validation_passes_on_the_real_files(tokenizers_dir):
    t5.validate_t5_tokenizer(tokenizers_dir / "t5")


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _swap_pad_eos(d):
    v = d["model"]["vocab"]
    v[0], v[1] = [v[1][0], v[0][1]], [v[0][0], v[1][1]]
    for t in d["added_tokens"][:2]:
        t["content"] = {"<pad>": "</s>", "</s>": "<pad>"}[t["content"]]


def _drop_last(d):
    d["model"]["vocab"].pop()
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "<extra_id_0>"]


def _rename_extra_99(d):
    d["model"]["vocab"][32000][0] = "<extra_id_x>"
    for t in d["added_tokens"]:
        if t["content"] == "<extra_id_99>":
            t["content"] = "<extra_id_x>"


def _change_piece(d):
    v = d["model"]["vocab"]
    i = next(i for i, (p, _) in enumerate(v) if p == "▁solo")
    v[i][0] = "▁so1o"


@pytest.mark.parametrize("name, edit, message", [
    ("tokenizer.json", lambda d: d["model"].update(type="WordPiece"),
     "tokenizer.json model type is 'WordPiece', expected 'Unigram'"),
    ("tokenizer.json", _swap_pad_eos, "<pad> has id 1, expected 0; </s> has id 0, expected 1"),
    ("tokenizer.json", _drop_last, "tokenizer.json has 32099 tokens, expected 32100 (32000 SentencePiece pieces + "
                                   "100 <extra_id_N>)"),
    # transformers re-adds the 100 extra ids the config promises: the renamed one comes back at the end
    ("tokenizer.json", _rename_extra_99, "the tokenizer has 32101 tokens, expected 32100; <extra_id_99> is id "
                                         "32100, expected id 32000"),
    ("tokenizer.json", _change_piece, "encodes to [3, 13607, 9, 6926, 16148, 10, 209, 18722, 6, 9467, 32, 6, 423"),
    ("config.json", lambda d: d.update(vocab_size=32100), "config.json vocab_size is 32100, expected 32128"),
])
def test_strict_validation_names_each_mismatch(tokenizers_dir, tmp_path, name, edit, message):
    folder = tmp_path / "t5"
    shutil.copytree(tokenizers_dir / "t5", folder)
    if name == "config.json":
        (folder / name).write_text(json.dumps({"model_type": "t5", "vocab_size": 32128}))
        t5.validate_t5_tokenizer(folder)  # the right config passes
    _edit_json(folder / name, edit)
    with pytest.raises(t5.TokenizerCheckError) as e:
        t5.validate_t5_tokenizer(folder)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{folder}: ")


def test_strict_validation_of_an_unloadable_folder(tmp_path):
    with pytest.raises(t5.TokenizerCheckError, match="no tokenizer.json"):
        t5.validate_t5_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(t5.TokenizerCheckError, match="not a tokenizers file"):
        t5.validate_t5_tokenizer(tmp_path)


def test_downloaded_files_are_sanity_checked(tmp_path):
    (tmp_path / "tokenizer.json").write_text("<html>rate limited</html>")
    with pytest.raises(SourceError, match="broken: tokenizer.json is not JSON"):
        t5.check_downloaded(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "spiece.model").write_bytes(b"\x0a\x09abc")  # a field cut short
    with pytest.raises(SourceError, match="truncated field"):
        t5.check_downloaded(tmp_path)
    assert t5.missing_files(tmp_path / "nowhere") == ["tokenizer.json or spiece.model"]
