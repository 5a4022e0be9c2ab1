"""issue 14 item 4 / tokenizer_cache_dir: a config that names only `qwen3` (one file) gets both tokenizers
downloaded into a per-user cache folder at start-up (huggingface_hub's HF_HOME, or tokenizer_cache_dir), and
the next run uses that cache offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_dataset_toml, write_demo_models, write_shapes_dataset
from anima_trainer.tools.download.startup import ensure_tokenizers, tokenizer_cache_root, with_tokenizer_dirs
from anima_trainer.tools.download.errors import DownloadError

QWEN_REPO, T5_REPO = "Qwen/Qwen3-0.6B-Base", "google/t5-v1_1-base"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokcache")
    models = write_demo_models(root / "models", seed=3)
    images = write_shapes_dataset(root / "images", count=4, seed=3)
    return {"models": models, "dataset": write_demo_dataset_toml(root / "dataset.toml", images)}


def _args(tiny: dict, out: Path, *extra: str) -> list[str]:
    m = tiny["models"]
    return ["--pretrained_model_name_or_path", str(m["dit"]), "--qwen3", str(m["qwen3"]), "--vae", str(m["vae"]),
            "--dataset_config", str(tiny["dataset"]), "--output_dir", str(out), "--max_train_steps", "1",
            "--max_data_loader_n_workers", "0", *extra]


def _serve_tiny_tokenizers(hub, tiny: dict) -> None:
    tok = tiny["models"]["tokenizers"]
    for name in ("vocab.json", "merges.txt"):
        hub.add_hf(QWEN_REPO, name, (tok / "qwen" / name).read_bytes())
    hub.add_hf(T5_REPO, "tokenizer/tokenizer.json", (tok / "t5" / "tokenizer.json").read_bytes())


def test_cache_root_follows_huggingface_hub(tmp_path):
    cfg = parse_train_args(_args({"models": {"dit": "d", "qwen3": "q", "vae": "v"}, "dataset": "ds"}, tmp_path))
    assert tokenizer_cache_root(cfg, {"HF_HOME": "/data/hf"}) == Path("/data/hf/anima-trainer/tokenizers")
    assert tokenizer_cache_root(cfg, {"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/huggingface/anima-trainer/tokenizers")
    assert tokenizer_cache_root(cfg, {}) == Path("~/.cache/huggingface/anima-trainer/tokenizers").expanduser()
    mine = parse_train_args(_args({"models": {"dit": "d", "qwen3": "q", "vae": "v"}, "dataset": "ds"}, tmp_path,
                                  "--tokenizer_cache_dir", str(tmp_path / "tok")))
    assert tokenizer_cache_root(mine, {"HF_HOME": "/data/hf"}) == tmp_path / "tok"
    dirs = with_tokenizer_dirs(mine)
    assert (dirs.qwen3_tokenizer_path, dirs.t5_tokenizer_path) == (tmp_path / "tok" / "qwen-hf-Qwen--Qwen3-0.6B-Base",
                                                                    tmp_path / "tok" / "t5-hf-google--t5-v1_1-base")


def test_only_qwen3_named_downloads_into_the_cache_and_trains_offline_next_time(hub, tiny, tmp_path, monkeypatch):
    from anima_trainer.train.loop import run_training

    _serve_tiny_tokenizers(hub, tiny)
    monkeypatch.setenv("HF_ENDPOINT", hub.hf_url)
    monkeypatch.setenv("ANIMA_TRAINER_MODELSCOPE_ENDPOINT", hub.ms_url)
    cache = tmp_path / "tokenizer_cache"
    run = run_training(parse_train_args(_args(tiny, tmp_path / "a", "--tokenizer_cache_dir", str(cache))))
    assert run.final_path.is_file() and run.steps == 1
    tok = tiny["models"]["tokenizers"]
    qwen, t5 = cache / "qwen-hf-Qwen--Qwen3-0.6B-Base", cache / "t5-hf-google--t5-v1_1-base"
    assert (qwen / "vocab.json").read_bytes() == (tok / "qwen" / "vocab.json").read_bytes()
    assert (t5 / "tokenizer.json").read_bytes() == (tok / "t5" / "tokenizer.json").read_bytes()
    asked = len(hub.seen)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the second run: offline, from the filled cache
    run = run_training(parse_train_args(_args(tiny, tmp_path / "b", "--tokenizer_cache_dir", str(cache))))
    assert run.final_path.is_file() and len(hub.seen) == asked


def test_default_cache_is_under_hf_home(hub, tiny, tmp_path, monkeypatch):
    _serve_tiny_tokenizers(hub, tiny)
    monkeypatch.setenv("HF_ENDPOINT", hub.hf_url)
    monkeypatch.setenv("ANIMA_TRAINER_MODELSCOPE_ENDPOINT", hub.ms_url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = parse_train_args(_args(tiny, tmp_path / "a"))
    ensure_tokenizers(cfg)
    root = tmp_path / "hf" / "anima-trainer" / "tokenizers"
    assert sorted(p.name for p in root.iterdir()) == ["qwen-hf-Qwen--Qwen3-0.6B-Base", "t5-hf-google--t5-v1_1-base"]


def test_offline_with_an_empty_cache_names_the_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = parse_train_args(_args(tiny, tmp_path / "a", "--tokenizer_cache_dir", str(tmp_path / "c")))
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as e:
        ensure_tokenizers(cfg)
    assert str(tmp_path / "c" / "t5-hf-google--t5-v1_1-base") in str(e.value)


def test_auto_download_off_with_an_empty_cache_is_a_config_error(tiny, tmp_path):
    cfg = parse_train_args(_args(tiny, tmp_path / "a", "--tokenizer_cache_dir", str(tmp_path / "c"),
                                 "--no-auto_download_t5_tokenizer"))
    with pytest.raises(ConfigError, match=r"t5_tokenizer_path: not set, and the tokenizer cache folder "
                                          r".*t5-hf-google--t5-v1_1-base is not filled"):
        ensure_tokenizers(cfg)
