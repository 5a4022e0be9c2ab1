"""Training start-up: `ensure_tokenizers(cfg)` and the sd-scripts-anima tokenizer flags in TrainConfig."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.tools.download import sources
from anima_trainer.tools.download.errors import DownloadError
from anima_trainer.tools.download.fetch import Context
from anima_trainer.tools.download.startup import ensure_tokenizers, with_tokenizer_dirs

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors", "--vae", "v",
            "--output_dir", "o", "--dataset_config", "ds.toml"]
NV = "nv-community/Cosmos-Predict2-2B-Text2Image"


def cfg(*args: str):
    return parse_train_args([*REQUIRED, *args])


@pytest.fixture(autouse=True)
def _qwen_in_the_cache(_online, tokenizers_dir):
    """qwen3 is one file here: its tokenizer comes from the tokenizer cache (HF_HOME), filled as by an earlier run;
    these tests are about the T5 folder (tests/tools/download/test_tokenizer_cache.py: the cache itself)."""
    shutil.copytree(tokenizers_dir / "qwen", with_tokenizer_dirs(cfg()).qwen3_tokenizer_path)


def test_flags_defaults_and_negation(tmp_path):
    c = cfg()
    assert (c.auto_download_t5_tokenizer, c.t5_tokenizer_repo_id, c.t5_tokenizer_subfolder) == (
        True, "google/t5-v1_1-base", "tokenizer")
    assert (c.t5_tokenizer_modelscope_fallback, c.t5_tokenizer_modelscope_repo_id,
            c.t5_tokenizer_modelscope_revision, c.t5_tokenizer_modelscope_subfolder) == (True, NV, "master",
                                                                                         "tokenizer")
    assert c.t5_tokenizer_validate_strict is False
    assert cfg("--no-auto_download_t5_tokenizer").auto_download_t5_tokenizer is False
    assert cfg("--auto_download_t5_tokenizer=false").auto_download_t5_tokenizer is False
    assert cfg("--no-t5_tokenizer_modelscope_fallback").t5_tokenizer_modelscope_fallback is False
    assert cfg("--t5_tokenizer_validate_strict").t5_tokenizer_validate_strict is True
    # sd-scripts-anima: an empty value means the default
    assert cfg("--t5_tokenizer_subfolder", "", "--t5_tokenizer_repo_id", "").t5_tokenizer_repo_id == \
        "google/t5-v1_1-base"
    toml = tmp_path / "train.toml"
    toml.write_text('[t5]\nauto_download_t5_tokenizer = false\nt5_tokenizer_validate_strict = true\n'
                    f't5_tokenizer_repo_id = "https://www.modelscope.cn/models/{NV}"\n'
                    't5_tokenizer_modelscope_revision = "v2"\nt5_tokenizer_dir = "tok/t5"\n')
    c = parse_train_args([*REQUIRED, "--config_file", str(toml)])
    assert (c.auto_download_t5_tokenizer, c.t5_tokenizer_validate_strict, c.t5_tokenizer_path) == (
        False, True, Path("tok/t5"))
    with pytest.raises(ConfigError, match="t5_tokenizer_repo_id: 'https://example.com/a/b': unsupported host"):
        cfg("--t5_tokenizer_repo_id", "https://example.com/a/b")
    with pytest.raises(ConfigError, match="t5_tokenizer_modelscope_repo_id: .* is not a ModelScope repo id"):
        cfg("--t5_tokenizer_modelscope_repo_id", "hf:a/b")


def test_missing_folders_without_auto_download_name_the_key(tmp_path):
    c = cfg("--t5_tokenizer_path", str(tmp_path / "t5"), "--no-auto_download_t5_tokenizer")
    with pytest.raises(ConfigError) as e:
        ensure_tokenizers(c)
    assert str(e.value).startswith(f"t5_tokenizer_path: the folder {tmp_path / 't5'} does not exist (needed: "
                                   "tokenizer.json or spiece.model); turn auto_download_t5_tokenizer on")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "tokenizer.json").write_text("{}")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "vocab.json").write_text("{}")
    c = cfg("--t5_tokenizer_path", str(tmp_path / "t5"), "--qwen3_tokenizer_path", str(tmp_path / "qwen"),
            "--no-auto_download_t5_tokenizer")
    with pytest.raises(ConfigError, match=f"qwen3_tokenizer_path: the folder {tmp_path / 'qwen'} lacks merges.txt"):
        ensure_tokenizers(c)
    with pytest.raises(ConfigError, match="t5_tokenizer_path: not set, and the tokenizer cache folder .* is not "
                                          "filled"):
        ensure_tokenizers(cfg("--no-auto_download_t5_tokenizer", "--tokenizer_cache_dir", str(tmp_path / "c")))


def test_complete_folders_need_no_network(tokenizers_dir, tmp_path, closed_url):
    base = tmp_path / "tok"
    shutil.copytree(tokenizers_dir, base)
    offline = Context(closed_url, closed_url)
    dirs = ensure_tokenizers(cfg("--qwen3_tokenizer_path", str(base), "--t5_tokenizer_validate_strict"), ctx=offline)
    assert (dirs.qwen, dirs.t5, dirs.downloaded) == (base, base / "t5", [])  # qwen/ and t5/ under one folder


def _serve_t5(hub, spiece_bytes, repo="google/t5-v1_1-base", sub=""):
    """The repo as google/t5-v1_1-base has it: spiece.model and the config files at the root, no tokenizer.json."""
    prefix = f"{sub}/" if sub else ""
    add = hub.add_hf if repo.startswith("google") else hub.add_ms
    add(repo, prefix + "spiece.model", spiece_bytes, **({"lfs": True} if add == hub.add_hf else {}))
    add(repo, prefix + "config.json", b'{"model_type": "t5", "vocab_size": 32128}')
    add(repo, prefix + "special_tokens_map.json", b'{"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}')


def test_auto_download_t5_from_hf_root_then_strict_check(hub, ctx, tokenizers_dir, spiece_bytes, tmp_path):
    from transformers import T5TokenizerFast

    _serve_t5(hub, spiece_bytes)
    target = tmp_path / "models" / "t5"
    dirs = ensure_tokenizers(cfg("--t5_tokenizer_path", str(target), "--t5_tokenizer_validate_strict"), ctx=ctx)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "special_tokens_map.json", "spiece.model",
                                                        "tokenizer.json"]
    assert sorted(f.path.name for f in dirs.downloaded) == sorted(p.name for p in target.iterdir())
    heads = [r.path for r in hub.requests("hf", "HEAD")]
    assert heads[:2] == ["/google/t5-v1_1-base/resolve/main/tokenizer/tokenizer.json",
                         "/google/t5-v1_1-base/resolve/main/tokenizer/spiece.model"]  # subfolder first, then root
    tok = T5TokenizerFast.from_pretrained(str(target), local_files_only=True)
    ref = T5TokenizerFast.from_pretrained(str(tokenizers_dir / "t5"))
    assert tok("1girl, solo, masterpiece")["input_ids"] == ref("1girl, solo, masterpiece")["input_ids"]
    n = len(hub.seen)
    ensure_tokenizers(cfg("--t5_tokenizer_path", str(target)), ctx=ctx)  # complete now: no request
    assert len(hub.seen) == n


def test_gated_hf_falls_back_to_modelscope_for_both_tokenizers(hub, ctx, tokenizers_dir, spiece_bytes, tmp_path):
    hub.add_hf("google/t5-v1_1-base", "spiece.model", b"x", lfs=True)
    hub.status["google/t5-v1_1-base"] = (403, "GatedRepo")
    _serve_t5(hub, spiece_bytes, repo=NV, sub="tokenizer")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        hub.add_ms(sources.QWEN_TOKENIZER.modelscope_repo, name, (tokenizers_dir / "qwen" / name).read_bytes())
    # Qwen: not on the fake Hub at all (401 RepoNotFound)
    c = cfg("--t5_tokenizer_path", str(tmp_path / "t5"), "--qwen3_tokenizer_path", str(tmp_path / "qwen"))
    dirs = ensure_tokenizers(c, ctx=ctx)
    sources_used = {f.path.name: f.source for f in dirs.downloaded}
    assert sources_used["spiece.model"] == f"ModelScope {NV}@master tokenizer/spiece.model"
    assert sources_used["vocab.json"] == "ModelScope Qwen/Qwen3-0.6B-Base@master vocab.json"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "qwen" / name).read_bytes() == (tokenizers_dir / "qwen" / name).read_bytes()
    assert (tmp_path / "t5" / "tokenizer.json").is_file()  # made from spiece.model
    assert sources_used["tokenizer.json"] == f"made from the files of ModelScope {NV}@master tokenizer"


def test_both_failing_and_fallback_off(hub, ctx, tmp_path):
    hub.status["google/t5-v1_1-base"] = (403, "GatedRepo")
    target = tmp_path / "t5"
    with pytest.raises(DownloadError) as e:
        ensure_tokenizers(cfg("--t5_tokenizer_path", str(target)), ctx=ctx)
    msg = str(e.value)
    assert msg.startswith(f"could not download the T5 tokenizer into {target}:\n")
    assert "  - Hugging Face google/t5-v1_1-base@main tokenizer/tokenizer.json: gated repo (HTTP 403)" in msg
    assert msg.endswith(f"  - ModelScope {NV}@master: 'tokenizer/' has no tokenizer.json or spiece.model")
    with pytest.raises(DownloadError) as e:
        ensure_tokenizers(cfg("--t5_tokenizer_path", str(target), "--no-t5_tokenizer_modelscope_fallback"), ctx=ctx)
    assert "ModelScope" in str(e.value).splitlines()[-1] and "fallback is off" in str(e.value)
    assert not target.exists() and not (tmp_path / ".t5.download").exists()


def test_modelscope_primary_never_asks_hugging_face(hub, ctx, spiece_bytes, tmp_path):
    _serve_t5(hub, spiece_bytes, repo=NV, sub="tokenizer")
    c = cfg("--t5_tokenizer_path", str(tmp_path / "t5"), "--t5_tokenizer_repo_id",
            f"https://www.modelscope.cn/models/{NV}/tree/master/tokenizer")
    ensure_tokenizers(c, ctx=ctx)
    assert (tmp_path / "t5" / "tokenizer.json").is_file() and hub.requests("hf", "HEAD") == []


def test_strict_validation_failure_is_a_config_error(tokenizers_dir, tmp_path, closed_url):
    t5 = tmp_path / "t5"
    shutil.copytree(tokenizers_dir / "t5", t5)
    (t5 / "config.json").write_text('{"vocab_size": 32000}')
    with pytest.raises(ConfigError, match="t5_tokenizer_validate_strict: .*config.json vocab_size is 32000, "
                                          "expected 32128"):
        ensure_tokenizers(cfg("--t5_tokenizer_path", str(t5), "--t5_tokenizer_validate_strict"),
                          ctx=Context(closed_url, closed_url))


def test_spiece_only_folder_is_made_loadable_without_network(spiece_bytes, tmp_path, closed_url):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "spiece.model").write_bytes(spiece_bytes)
    c = cfg("--t5_tokenizer_path", str(t5), "--no-auto_download_t5_tokenizer", "--t5_tokenizer_validate_strict")
    assert ensure_tokenizers(c, ctx=Context(closed_url, closed_url)).downloaded == []
    assert (t5 / "tokenizer.json").is_file()
