"""issue 14 item 1: kohya's output options — file metadata (training_comment, metadata_*, no_metadata),
output_config, save_n_epoch_ratio and initial_step / initial_epoch / skip_until_initial_step."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.config.train import MINIMUM_METADATA_KEYS
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.train import loop
from anima_trainer.train.loop import run_training


def _config(setup: dict, out: Path, *extra: str, steps: int = 2, batch_size: int = 4):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=batch_size)
    return parse_train_args(["--config_file", str(toml), "--train_batch_size", str(batch_size), *extra])


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_comment_and_modelspec_fields_are_in_the_saved_file(setup, tmp_path):
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG not really")
    cfg = _config(setup, tmp_path / "run", "--training_comment", "trained for issue 14", "--metadata_author", "me",
                  "--metadata_title", "Shapes", "--metadata_tags", "a,b", "--metadata_license", "CC-BY-4.0",
                  "--metadata_description", "shapes LoRA", "--metadata_trigger_phrase", "shp",
                  "--metadata_usage_hint", "weight 0.8", "--metadata_merged_from", "x,y",
                  "--metadata_thumbnail", str(thumb))
    meta = _metadata(run_training(cfg).final_path)
    assert meta["ss_training_comment"] == "trained for issue 14"
    assert {k: meta[k] for k in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                                 "modelspec.title", "modelspec.author", "modelspec.tags", "modelspec.license",
                                 "modelspec.description", "modelspec.trigger_phrase", "modelspec.usage_hint",
                                 "modelspec.merged_from", "modelspec.resolution")} == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "anima-preview/lora",
        "modelspec.implementation": "https://huggingface.co/circlestone-labs/Anima", "modelspec.title": "Shapes",
        "modelspec.author": "me", "modelspec.tags": "a,b", "modelspec.license": "CC-BY-4.0",
        "modelspec.description": "shapes LoRA", "modelspec.trigger_phrase": "shp",
        "modelspec.usage_hint": "weight 0.8", "modelspec.merged_from": "x,y",
        "modelspec.resolution": "64x64"}  # the dataset's
    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(thumb.read_bytes()).decode()
    assert meta["ss_steps"] == "2" and meta["ss_v2"] == "False"


def test_no_metadata_keeps_kohyas_minimum_and_modelspec(setup, tmp_path):
    meta = _metadata(run_training(_config(setup, tmp_path / "run", "--no_metadata", "--training_comment",
                                          "c", "--network_args", "train_llm_adapter=False")).final_path)
    ss = {k for k in meta if k.startswith("ss_")}
    assert ss == set(MINIMUM_METADATA_KEYS)  # ss_v2, base model version, network module/dim/alpha/args
    assert meta["ss_network_args"] == '{"train_llm_adapter": "False", "dropout": null}'  # kohya's net_kwargs
    assert meta["modelspec.title"] == "demo_lora"  # default title: output_name
    # kohya keeps the modelspec block, and its save adds the sshs_* hashes (over the kept ss_* keys)
    assert set(meta) - ss - {"anima_trainer_version"} == {
        "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
        "modelspec.resolution", "modelspec.date", "modelspec.implementation_version",
        "modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash"}
    # without network_args kohya has no ss_network_args to keep
    meta = _metadata(run_training(_config(setup, tmp_path / "run2", "--no_metadata")).final_path)
    assert {k for k in meta if k.startswith("ss_")} == set(MINIMUM_METADATA_KEYS) - {"ss_network_args"}


def test_missing_thumbnail_is_an_error_at_start_up(setup, tmp_path):
    with pytest.raises(ConfigError, match="metadata_thumbnail: 'nope.png' is neither a data: URL nor an image file"):
        _config(setup, tmp_path / "run", "--metadata_thumbnail", "nope.png")


def test_save_n_epoch_ratio_gives_about_n_epoch_files(setup, tmp_path, monkeypatch):
    _seeds_per_step(monkeypatch)
    # 4 images, batch 4: one step per epoch; 7 epochs; ratio 3 → every floor(7 / 3) = 2 epochs: epochs 2, 4, 6
    cfg = _config(setup, tmp_path / "run", "--max_train_epochs", "7", "--save_n_epoch_ratio", "3",
                  "--save_every_n_epochs", "1")
    run_training(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "output").glob("demo_lora*.safetensors"))
    assert names == ["demo_lora-000002.safetensors", "demo_lora-000004.safetensors", "demo_lora-000006.safetensors",
                     "demo_lora.safetensors"]


def _seeds_per_step(monkeypatch) -> list:
    """Records the per-sample noise seeds of every step (they name epoch, item and occurrence of the data) and
    skips the DiT: these tests are about which data each step sees, and it is chosen before the loss."""
    seen: list = []

    def spy(dit, latents, context, cfg, seeds, mask=None, sample_weights=None):
        seen.append(tuple(seeds))
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(loop, "training_step", spy)
    return seen


def test_initial_step_with_skip_continues_the_data_and_step_numbers(setup, tmp_path, monkeypatch):
    seen = _seeds_per_step(monkeypatch)
    run_training(_config(setup, tmp_path / "a", steps=6, batch_size=1))  # 4 steps per epoch, 2 epochs
    full = list(seen)
    assert len(set(full)) == 6
    seen.clear()
    # kohya: skip the batches of 5 steps (epoch 1 whole, 1 of epoch 2); steps 6 and 7 train, numbered from 6
    run = run_training(_config(setup, tmp_path / "b", "--initial_step", "5", "--skip_until_initial_step",
                               "--save_every_n_steps", "1", steps=7, batch_size=1))
    assert seen[:1] == full[5:] and len(seen) == 2 and run.steps == 7
    files = sorted(p.name for p in (tmp_path / "b" / "output").glob("*.safetensors"))
    assert files == ["demo_lora-step00000006.safetensors", "demo_lora.safetensors"]
    assert _metadata(tmp_path / "b" / "output" / "demo_lora-step00000006.safetensors")["ss_steps"] == "6"
    seen.clear()
    # initial_epoch 2 = initial_step (2 - 1) * 4 = 4: the last two steps of the 6
    run_training(_config(setup, tmp_path / "c", "--initial_epoch", "2", "--skip_until_initial_step", steps=6,
                         batch_size=1))
    assert seen == full[4:]


def test_initial_step_with_accumulation_skips_micro_batches(setup, tmp_path, monkeypatch):
    seen = _seeds_per_step(monkeypatch)
    # batch 1, accumulation 2: 4 micro-batches = 2 steps per epoch; initial_step 3 = epoch 2, its micro-batches 3, 4
    run_training(_config(setup, tmp_path / "a", "--gradient_accumulation_steps", "2", steps=4, batch_size=1))
    full = list(seen)
    seen.clear()
    run = run_training(_config(setup, tmp_path / "b", "--gradient_accumulation_steps", "2", "--initial_step", "3",
                               "--skip_until_initial_step", steps=4, batch_size=1))
    assert len(full) == 8 and seen == full[6:] and run.steps == 4


def test_initial_step_without_skip_only_moves_the_epoch(setup, tmp_path, monkeypatch):
    seen = _seeds_per_step(monkeypatch)
    run_training(_config(setup, tmp_path / "a", steps=8, batch_size=2))  # 2 steps per epoch, 4 epochs
    full = list(seen)
    seen.clear()
    # kohya without skip_until_initial_step: epoch 3 // 2 + 1 = 2 starts, step counter from 0, epochs 2..4 train
    run = run_training(_config(setup, tmp_path / "b", "--initial_step", "3", steps=8, batch_size=2))
    assert seen == full[2:] and run.steps == 6


def test_initial_step_beyond_the_run_is_an_error(setup, tmp_path):
    with pytest.raises(ConfigError, match=r"initial_step: starts at step 10, but the run has 10 steps"):
        run_training(_config(setup, tmp_path / "a", "--initial_step", "10", steps=10, batch_size=1))


def test_output_config_writes_the_resolved_config_and_trains_nothing(setup, tmp_path):
    out = tmp_path / "run"
    train_toml = write_demo_configs(out, setup["models"], setup["images"], 2, seed=5)
    args = [f"--{k}={v}" for k, v in {"pretrained_model_name_or_path": setup["models"]["dit"],
                                      "qwen3": setup["models"]["qwen3"], "vae": setup["models"]["vae"],
                                      "dataset_config": out / "dataset.toml", "output_dir": out / "output",
                                      "learning_rate": "1e-4", "training_comment": "hi"}.items()]
    args += ["--network_args", "train_llm_adapter=True", "--optimizer_args", "weight_decay=0.01", "betas=(0.9,0.99)"]
    target = tmp_path / "written.toml"
    with pytest.raises(SystemExit) as e:
        parse_train_args([*args, "--output_config", "--config_file", str(target)])
    assert e.value.code == 0
    data = tomllib.loads(target.read_text())
    assert "output_config" not in data and data["learning_rate"] == 1e-4 and data["training_comment"] == "hi"
    assert data["network_args"] == ["train_llm_adapter=True"]
    assert parse_train_args(["--config_file", str(target)]) == parse_train_args(args)
    assert not (out / "output").exists()  # nothing trained
    # never over an existing file
    with pytest.raises(ConfigError, match=f"output_config: {target} already exists"):
        parse_train_args([*args, "--output_config", "--config_file", str(target)])
    with pytest.raises(ConfigError, match="output_config: needs --config_file"):
        parse_train_args([*args, "--output_config"])
    assert train_toml.exists()


@pytest.fixture
def fresh_console():
    from anima_trainer import console

    console.setup("INFO")
    yield console
    console.setup("INFO")  # removes (and closes) a log file handler again
    import logging

    for h in list(logging.getLogger().handlers):
        if getattr(h, "_anima_console", False):
            logging.getLogger().removeHandler(h)


def test_console_log_simple_and_file(fresh_console, tmp_path, capsys):
    import logging

    fresh_console.apply_training_settings(None, simple=True)
    logging.getLogger("anima_trainer.x").info("plain line")
    logging.getLogger("anima_trainer.x").warning("careful")
    assert capsys.readouterr().err.splitlines() == ["plain line", "WARNING: careful"]
    log = tmp_path / "run.log"
    log.write_text("earlier run\n")
    fresh_console.apply_training_settings("WARNING", log_file=log)
    logging.getLogger("anima_trainer.x").info("hidden at WARNING")
    logging.getLogger("anima_trainer.x").error("to the file")
    assert capsys.readouterr().err == ""  # instead of the console, as kohya
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier run" and len(lines) == 2  # appended, never truncated
    assert lines[1].endswith(" ERROR anima_trainer.x: to the file")


def test_console_log_file_from_the_train_command(fresh_console, setup, tmp_path, capsys):
    from anima_trainer.cli import main

    toml = write_demo_configs(tmp_path / "run", setup["models"], setup["images"], 1, seed=5)
    log = tmp_path / "train.log"
    assert main(["train", "--config_file", str(toml), "--console_log_file", str(log), "--console_log_simple"]) == 0
    text = log.read_text()
    assert "training 20 DiT lora modules" in text and "\nsaved " in text and "INFO" not in text
    assert "training 20 DiT lora modules" not in capsys.readouterr().err


def test_output_config_through_the_drop_in(setup, tmp_path):
    from anima_trainer.compat.dropin import translate_kohya_argv

    m = setup["models"]
    target = tmp_path / "kohya_args"  # kohya appends ".toml"
    argv, _ = translate_kohya_argv(["--pretrained_model_name_or_path", str(m["dit"]), "--qwen3", str(m["qwen3"]),
                                    "--vae", str(m["vae"]), "--dataset_config", str(tmp_path / "ds.toml"),
                                    "--output_dir", str(tmp_path / "out"), "--network_dim", "16",
                                    "--output_config", "--config_file", str(target)])
    with pytest.raises(SystemExit) as e:
        parse_train_args(argv)
    assert e.value.code == 0
    data = tomllib.loads((tmp_path / "kohya_args.toml").read_text())
    assert data["network_dim"] == 16 and data["vae"] == str(m["vae"])


def test_start_up_order_tokenizers_then_outputs_then_the_scan(setup, tmp_path, monkeypatch):
    import anima_trainer.data as data_pkg
    from anima_trainer.fileio import OutputExistsError

    def no_scan(*args, **kwargs):
        raise AssertionError("the dataset was scanned")

    monkeypatch.setattr(data_pkg, "build_dataset", no_scan)
    toml = write_demo_configs(tmp_path / "run", setup["models"], setup["images"], 1, seed=5)
    out = tmp_path / "run" / "output"
    out.mkdir()
    (out / "demo_lora.safetensors").write_bytes(b"an earlier run's file")
    with pytest.raises(OutputExistsError, match="demo_lora.safetensors already exists"):
        run_training(parse_train_args(["--config_file", str(toml), "--overwrite=false"]))
    # tokenizers come first: an unfilled tokenizer cache with auto-download off stops before the output check
    with pytest.raises(ConfigError, match="t5_tokenizer_path: not set, and the tokenizer cache folder"):
        run_training(parse_train_args(["--config_file", str(toml), "--overwrite=false", "--t5_tokenizer_path", "",
                                       "--tokenizer_cache_dir", str(tmp_path / "c"),
                                       "--no-auto_download_t5_tokenizer"]))


def test_bad_network_args_stop_before_the_dataset_scan(setup, tmp_path, monkeypatch):
    """Issue 14 item 4: network_args are checked after the output check and before the scan (on a DiT of the
    file's shape on the meta device), so a typo fails in a second, not after the scan and the model loads."""
    import anima_trainer.data as data_pkg
    from anima_trainer.networks import NetworkError

    def no_scan(*args, **kwargs):
        raise AssertionError("the dataset was scanned")

    monkeypatch.setattr(data_pkg, "build_dataset", no_scan)
    toml = write_demo_configs(tmp_path / "run", setup["models"], setup["images"], 1, seed=5)
    with pytest.raises(NetworkError, match=r"network_args: unknown network_args \['rank_dropuot'\]"):
        run_training(parse_train_args(["--config_file", str(toml), "--network_args", "rank_dropuot=0.1"]))
    with pytest.raises(NetworkError, match="target_modules"):
        run_training(parse_train_args(["--config_file", str(toml), "--network_args",
                                       "target_modules=['no_such_module']"]))
