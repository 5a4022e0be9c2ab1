"""Issue 13, items 9–11: output_name is a plain, short file name; sizes are bounded at start-up (resolution,
buckets, repeats, captions, tokens per step, memory, previews); prompt files are parsed fully at start-up and a
preview never costs a save nor ignores SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import anima_trainer.data.scan as scan
import anima_trainer.train.budget as budget
import anima_trainer.train.loop as loop
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.config.train import FILE_NAME_MAX_BYTES, OUTPUT_NAME_MAX_BYTES
from anima_trainer.data import DatasetConfigError, build_dataset, load_dataset_config
from anima_trainer.config.tomlw import toml_value
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml, write_shapes_dataset
from anima_trainer.sample.prompts import PromptFileError, load_sample_prompts
from anima_trainer.sample.sampler import SamplingCancelled, sample_euler, simple_schedule
from anima_trainer.train.loop import TrainingInterrupted, run_training
from tests.train.conftest import setup  # noqa: F401 - the demo's tiny models and 4 shapes (module fixture)

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors",
            "--vae", "vae.safetensors", "--output_dir", "out", "--dataset_config", "dataset.toml"]


def _argv(setup: dict, out: Path, *extra: str, steps: int = 2) -> list[str]:  # noqa: F811
    """The demo's training files with the user's default overwrite = false."""
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    return ["--config_file", str(toml), "--overwrite", "false", *extra]


def _events(out: Path, name: str = "demo_lora") -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.events.jsonl").read_text().splitlines()]


# --- item 9: output_name ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "reason"), [
    ("../../x", "contains a path separator"),
    ("sub/x", "contains a path separator"),
    ("a\\b", "contains a path separator"),
    ("/abs", "contains a path separator"),
    ("C:x", "is an absolute path"),
    ("..", "contains '..'"),
    ("x..y", "contains '..'"),
    ("", "is empty"),
    ("   ", "is empty"),
    ("bell\x07", "contains a control character"),
    ("new\nline", "contains a control character"),
    ("a" * (OUTPUT_NAME_MAX_BYTES + 1), f"at most {OUTPUT_NAME_MAX_BYTES} bytes fit"),
    ("é" * (OUTPUT_NAME_MAX_BYTES // 2 + 1), f"{OUTPUT_NAME_MAX_BYTES + 2} bytes long (UTF-8)"),
])
def test_output_name_must_be_a_plain_short_file_name(name, reason):
    with pytest.raises(ConfigError) as e:
        parse_train_args([*REQUIRED, "--output_name", name])
    msg = str(e.value)
    assert msg.startswith("output_name: ") and reason in msg and "\n" not in msg
    assert ("use a shorter name" in msg) if "bytes" in reason else ("use a plain file name" in msg)
    assert len(msg) < 500  # the value is shortened, not repeated whole


def test_a_path_in_output_name_writes_nothing_outside_output_dir(setup, tmp_path, capsys):  # noqa: F811
    from anima_trainer.cli import main

    work = tmp_path / "a" / "b"
    code = main(["train", *_argv(setup, work, "--output_name", "../../escaped")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "output_name: '../../escaped' contains a path separator" in err[0]
    assert not list(tmp_path.rglob("escaped*")) and not (work / "output").exists()


def test_the_longest_output_name_fits_every_file_the_run_writes(setup, tmp_path):  # noqa: F811
    # 2-byte characters up to the byte limit; a preview with the longest seed; states and epoch previews
    name = "é" * (OUTPUT_NAME_MAX_BYTES // 2)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a red circle --w 64 --h 64 --s 1 --d {2**64 - 1}\n", encoding="utf-8")
    run = run_training(parse_train_args(_argv(setup, tmp_path, "--output_name", name, "--save_every_n_steps", "1",
                                              "--save_state", "--sample_prompts", str(prompts),
                                              "--sample_every_n_epochs", "1")))
    out = tmp_path / "output"
    written = [p for p in out.rglob("*") if name in p.name]
    assert run.final_path == out / f"{name}.safetensors" and run.final_path.is_file()
    assert {"safetensors", "state", "png", "jsonl"} <= {p.name.rsplit("-", 1)[-1].rsplit(".", 1)[-1]
                                                        for p in written}
    assert (out / f"{name}-step00000001-state").is_dir()
    assert (out / "sample" / f"{name}_e000001_00_{2**64 - 1}.png").is_file()
    assert max(len(p.name.encode()) for p in written) <= FILE_NAME_MAX_BYTES - 14  # room for `.<name>.<8>.tmp`


# --- item 10: start-up budget -------------------------------------------------------------------------------

def _dataset_toml(tmp_path: Path, images: Path, general: str, subset: str = "") -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(f'[general]\ncaption_extension = ".txt"\n{general}\n[[datasets]]\n  [[datasets.subsets]]\n'
                    f"  image_dir = {toml_value(images)}\n  {subset}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("general", "subset", "message"), [
    ("resolution = 100000", "", r"'resolution' in \[general\]: \[100000, 100000\] has a side above the limit of "
                                r"4096 px; use at most 4096"),
    ("resolution = [1024, 8192]", "", r"'resolution' in \[general\]: \[1024, 8192\] has a side above the limit"),
    ("resolution = 1024\nenable_bucket = true\nmax_bucket_reso = 100000", "",
     r"'max_bucket_reso' in \[general\]: 100000 is above the limit of 8192 px"),
    ("resolution = 64", "num_repeats = 1000000000",
     r"'num_repeats' in \[\[datasets\]\] #1 > \[\[datasets.subsets\]\] #1: 1000000000 is above the limit of "
     r"10000; .* max_train_steps"),
])
def test_dataset_sizes_beyond_the_limits_are_refused_naming_file_and_table(
        setup, tmp_path, general, subset, message):  # noqa: F811
    path = _dataset_toml(tmp_path, setup["images"], general, subset)
    with pytest.raises(DatasetConfigError, match=message) as e:
        load_dataset_config(path)
    assert str(e.value).startswith(f"{path}: dataset option ")


def test_an_epoch_longer_than_the_limit_is_refused_before_its_plan_is_built(setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(scan, "MAX_EPOCH_ITEMS", 10)  # the real limit needs 10^6 items; the check is the same
    path = _dataset_toml(tmp_path, setup["images"], "resolution = 64", "num_repeats = 3")
    with pytest.raises(DatasetConfigError, match=r"num_repeats: one epoch would be 12 images × repeats \(4 images\), "
                                                 r"above the limit of 10; lower num_repeats"):
        build_dataset(load_dataset_config(path))


def test_a_one_megabyte_caption_is_refused_at_the_scan_naming_its_image(setup, tmp_path):  # noqa: F811
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    victim = sorted(images.glob("*.png"))[1]
    victim.with_suffix(".txt").write_text("tag, " * 200_000, encoding="utf-8")
    path = _dataset_toml(tmp_path, images, "resolution = 64")
    with pytest.raises(DatasetConfigError, match=rf"the caption of {victim} \(its .txt file\) is 999999 bytes, "
                                                 r"above the limit of 65536; shorten it"):
        build_dataset(load_dataset_config(path))


def test_a_caption_over_the_token_limit_stops_before_any_step(setup, tmp_path):  # noqa: F811
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    victim = sorted(images.glob("*.png"))[2]
    victim.with_suffix(".txt").write_text(" ".join(f"word{i}" for i in range(3000)), encoding="utf-8")
    argv = _argv(setup, tmp_path)
    write_demo_dataset_toml(tmp_path / "dataset.toml", images)
    with pytest.raises(ConfigError, match=rf"dataset_config: the caption of {victim} is \d+ Qwen / \d+ T5 tokens "
                                          r"long, above the limit of 2048 tokens; shorten it"):
        run_training(parse_train_args(argv))
    assert not list((tmp_path / "output").glob("*.safetensors"))


def test_a_preview_prompt_over_the_token_limit_stops_before_any_step(setup, tmp_path):  # noqa: F811
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 64 --h 64\n" + " ".join(f"word{i}" for i in range(3000)) + " --s 2\n",
                       encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"sample_prompts: {prompts} line 2: the prompt is \d+ tokens long, above "
                                          r"the limit of 2048; shorten it"):
        run_training(parse_train_args(_argv(setup, tmp_path, "--sample_prompts", str(prompts),
                                            "--sample_every_n_steps", "1")))
    assert not list((tmp_path / "output").glob("*.safetensors"))


def test_too_many_tokens_per_micro_batch_are_refused_before_models_load(tmp_path, setup, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loop, "load_models", lambda *a: pytest.fail("models loaded before the budget check"))
    argv = _argv(setup, tmp_path)
    images = write_shapes_dataset(tmp_path / "images", count=17, size=16)
    _dataset_toml(tmp_path, images, "resolution = 4096\nbatch_size = 17")  # no buckets: 17 × 4096² per batch
    with pytest.raises(ConfigError, match=r"resolution × batch_size: the largest micro-batch is 17 × 4096×4096 px "
                                          r"= 1114112 image tokens, above the limit of 1048576; lower batch_size"):
        run_training(parse_train_args(argv))


def test_a_step_that_cannot_fit_in_memory_is_refused_before_models_load(setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loop, "load_models", lambda *a: pytest.fail("models loaded before the budget check"))
    monkeypatch.setattr(budget, "available_memory", lambda device: (4096, "of RAM available"))
    with pytest.raises(ConfigError, match=r"resolution × batch_size: one training step needs about \d+\.\d GiB "
                                          r"\(largest bucket 64×64 px, batch 4, .*\) but cpu has 0\.0 GiB of RAM "
                                          r"available; lower resolution or batch_size in dataset_config, or set "
                                          r"gradient_checkpointing = true"):
        run_training(parse_train_args(_argv(setup, tmp_path)))


def test_the_memory_estimate_counts_the_models_and_grows_with_the_step(setup):  # noqa: F811
    # the check compares an estimate with the machine: it must count the tiny model's bytes and activations
    models = setup["models"]
    cfg = parse_train_args(["--pretrained_model_name_or_path", str(models["dit"]), "--qwen3", str(models["qwen3"]),
                            "--vae", str(models["vae"]), "--output_dir", "o", "--dataset_config", "d"])
    cpu = torch.device("cpu")
    one, est = budget.step_memory_gib(cfg, (64, 64), 1, cpu)
    four, _ = budget.step_memory_gib(cfg, (64, 64), 4, cpu)
    big, _ = budget.step_memory_gib(cfg, (1024, 1024), 4, cpu)
    files = sum(models[k].stat().st_size for k in ("dit", "qwen3", "vae")) / 2**30
    assert files * 0.5 < one < four < big and est["weights_gib"] > 0 and est["activations_gib"] > 0
    budget.check_step_memory(cfg, (64, 64), 4, cpu)  # this machine has room for the tiny model
    have, where = budget.available_memory(cpu)
    assert have is not None and have > big * 2**30 and "RAM" in where


def test_a_preview_larger_than_the_limit_is_refused_before_models_load(setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loop, "load_models", lambda *a: pytest.fail("models loaded before the budget check"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("# previews\na cat --w 8192 --h 8192\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"sample_prompts: {prompts} line 2: --w 8192 is larger than the "
                                              r"preview limit of 4096 px"):
        run_training(parse_train_args(_argv(setup, tmp_path, "--sample_prompts", str(prompts),
                                            "--sample_every_n_steps", "1")))


def test_the_sampler_stops_between_steps_when_cancelled():
    calls = []

    def velocity(x, sigma):
        calls.append(float(sigma))
        return torch.zeros_like(x)

    asked = iter([False, False, True])
    with pytest.raises(SamplingCancelled, match="cancelled before step 3 of 30"):
        sample_euler(velocity, torch.zeros(1, 4), simple_schedule(30), progress=False, cancel=lambda: next(asked))
    assert len(calls) == 2


def test_sigterm_during_a_preview_cancels_it_and_stops_with_a_state(setup, tmp_path, monkeypatch):  # noqa: F811
    real = loop.render_previews

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the preview runs
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "render_previews", signalled)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 1000\n", encoding="utf-8")
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 2; a state was saved"):
        run_training(parse_train_args(_argv(setup, tmp_path, "--sample_prompts", str(prompts),
                                            "--sample_every_n_steps", "2", steps=6)))
    out = tmp_path / "output"
    assert not (out / "sample").exists() or not list((out / "sample").glob("*.png"))  # not rendered to the end
    samples = [e for e in _events(out) if e["type"] == "sample"]
    assert [(e["step"], e["status"]) for e in samples] == [(2, "cancelled")]
    assert (out / "demo_lora-step00000002-state").is_dir()


# --- item 11: prompt files and previews -----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "content", "message"), [
    ("p.json", json.dumps([{"prompt": ["a", "b"]}]),
     r"p\.json \[0\]: prompt must be a string, got list \['a', 'b'\]; write prompt = \"text\""),
    ("p.json", "[1, 2]", r"p\.json \[0\]: expected a prompt string or an object with \"prompt\", got int 1"),
    ("p.json", '{"prompt": "x"}', r"p\.json: expected a JSON list of prompts"),
    ("p.json", '["ok",\n {"prompt": "x",}]', r"p\.json line 2 column 17: not valid JSON"),
    ("p.json", "[" * 100_000 + "]" * 100_000, r"p\.json is not usable JSON: nested too deeply"),
    ("p.json", json.dumps(["ok", {"prompt": "x", "width": "wide"}]),
     r"p\.json \[1\]: width must be an integer, got 'wide'; write e\.g\. width = 768"),
    ("p.txt", "ok\n\ncat --w 512 --l nan\n", r"p\.txt line 3: --l must be a finite number, got 'nan'"),
    ("p.txt", "cat --fs 0\n", r"p\.txt line 1: --fs must be > 0"),
    ("p.txt", "cat --d 1e3\n", r"p\.txt line 1: --d must be an integer, got '1e3'; write e\.g\. --d 42"),
    ("p.txt", "cat --q 3\n", r"p\.txt line 1: option --q is not known"),
    ("p.txt", b"ok\ncaf\xe9\n", r"p\.txt line 2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
    ("p.toml", '[prompt]\nwidth = 1.5\n[[prompt.subset]]\nprompt = "x"\n',
     r"p\.toml \[\[prompt\.subset\]\] #1: width must be an integer, got 1\.5"),
    ("p.toml", "[prompt\n", r"p\.toml is not valid TOML"),
    ("p.toml", '[prompt]\n[[prompt.subset]]\nwidth = 512\n', r"p\.toml \[\[prompt\.subset\]\] #1: has no \"prompt\""),
    ("missing.txt", None, r"missing\.txt does not exist"),
])
def test_prompt_file_mistakes_are_one_line_naming_file_place_and_fix(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=message) as e:
        load_sample_prompts(path)
    assert isinstance(e.value, ConfigError) and str(e.value).startswith(f"sample_prompts: {tmp_path}")
    assert "\n" not in str(e.value)


def test_a_bad_prompt_file_stops_the_run_before_models_load(setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loop, "load_models", lambda *a: pytest.fail("models loaded before the prompt check"))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["fine", {"prompt": ["a", "list"]}]), encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"sample_prompts: {prompts} \[1\]: prompt must be a string"):
        run_training(parse_train_args(_argv(setup, tmp_path, "--sample_prompts", str(prompts),
                                            "--sample_every_n_steps", "1")))


def test_a_failing_preview_never_costs_the_save_and_training_goes_on(
        setup, tmp_path, monkeypatch, caplog):  # noqa: F811
    def broken(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(loop, "render_previews", broken)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 1\n", encoding="utf-8")
    run = run_training(parse_train_args(_argv(setup, tmp_path, "--sample_prompts", str(prompts),
                                              "--sample_every_n_steps", "1", "--save_every_n_steps", "1",
                                              "--save_state", steps=2)))
    out = tmp_path / "output"
    assert run.steps == 2 and run.final_path.is_file()
    assert (out / "demo_lora-step00000001.safetensors").is_file() and (out / "demo_lora-step00000001-state").is_dir()
    events = _events(out)
    failed = [e for e in events if e["type"] == "sample"]
    assert [(e["step"], e["status"], e["error"]) for e in failed] == [(1, "failed", "OutOfMemoryError"),
                                                                      (2, "failed", "OutOfMemoryError")]
    saves = [e["step"] for e in events if e["type"] == "save"]
    assert 1 in saves and events[-1]["type"] == "end"
    assert "step 1: preview 000001 failed, training goes on: OutOfMemoryError" in caplog.text
