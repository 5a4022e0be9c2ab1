"""Exact resume: a run interrupted after a saved state and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.train import training_state as states
from anima_trainer.train.loop import run_training
from tests.support.killed_run import killed_after


RANDOM_CAPTIONS_AND_FLIPS = "flip_aug = true\nshuffle_caption = true\ncaption_tag_dropout_rate = 0.2\n"

def _config(setup: dict, out: Path, *extra: str, steps: int = 7, accum: int = 1, cache: bool = False):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    # 4 images × 2 repeats, batch 1 → 8 batches per epoch; flips and shuffled captions depend on the epoch
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1, num_repeats=2,
                            extra=RANDOM_CAPTIONS_AND_FLIPS)
    args = ["--config_file", str(toml), "--save_every_n_steps", "2", "--save_state",
            "--gradient_accumulation_steps", str(accum), "--learning_rate", "1e-2", "--lr_scheduler", "linear",
            "--network_dropout", "0.1", "--network_args", "rank_dropout=0.2", "module_dropout=0.1", *extra]
    if cache:
        args += ["--cache_latents", "--cache_text_encoder_outputs"]
    return parse_train_args(args)


@pytest.mark.parametrize(("accum", "cache", "crash_at"), [(1, False, 5), (3, True, 7)], ids=["images", "cached-accum3"])
def test_interrupted_and_resumed_run_is_bit_identical(setup, tmp_path, monkeypatch, accum, cache, crash_at):
    reference = run_training(_config(setup, tmp_path / "ref", accum=accum, cache=cache))
    # the same run, killed by an exception during micro-batch `crash_at + 1`
    with killed_after(monkeypatch, crash_at):
        run_training(_config(setup, tmp_path / "cut", accum=accum, cache=cache))
    out = tmp_path / "cut" / "output"
    saved = sorted(p.name for p in out.glob("*-state"))
    assert saved and not list(out.glob(".*tmp*"))
    resumed = run_training(_config(setup, tmp_path / "cut", "--resume", "latest", accum=accum, cache=cache))
    assert resumed.steps == reference.steps == 7
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # the end-of-training state exists and records where the run ended
    assert states.read_progress(out / "demo_lora-state").step == 7


def _as_old_state(folder: Path) -> None:
    """Rewrite a state as states were written before issue 16: its RNG streams also hold the loop's shared noise
    generator (created, saved and restored, never drawn from), with the manifest updated to match."""
    rng = states.read_nested(folder, "rng")
    assert "generator" not in rng  # new states no longer hold it
    for name in ("rng.json", "rng.safetensors"):
        (folder / name).unlink()
    states.write_nested(folder, "rng", {**rng, "generator": torch.Generator().manual_seed(5).get_state(),
                                        "generator_device": "cpu"})
    record = json.loads((folder / states.TRAIN_STATE).read_text())
    record["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
                       if p.is_file() and p.name != states.TRAIN_STATE}
    (folder / states.TRAIN_STATE).write_text(json.dumps(record))


def test_a_state_written_with_the_old_generator_still_resumes_bit_identically(setup, tmp_path, monkeypatch):
    reference = run_training(_config(setup, tmp_path / "ref", steps=5))
    with killed_after(monkeypatch, 3):  # dies after the step-2 state
        run_training(_config(setup, tmp_path / "cut", steps=5))
    state = tmp_path / "cut" / "output" / "demo_lora-step00000002-state"
    _as_old_state(state)
    assert "generator" in states.read_nested(state, "rng")
    resumed = run_training(_config(setup, tmp_path / "cut", "--resume", str(state), steps=5))
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert resumed.steps == 5 and all(torch.equal(ref[k], got[k]) for k in ref)


def test_state_contents_retention_and_latest(setup, tmp_path):
    cfg = _config(setup, tmp_path / "r", "--save_last_n_steps_state", "2", steps=6)
    run_training(cfg)
    out = tmp_path / "r" / "output"
    # states at steps 2, 4 (6 is the last step: the final state instead); a window of 2 steps drops 2 at step 4
    assert sorted(p.name for p in out.glob("*-state")) == ["demo_lora-state", "demo_lora-step00000004-state"]
    state = out / "demo_lora-step00000004-state"
    assert {p.name for p in state.iterdir()} >= {"network.safetensors", "optimizer.json", "optimizer.safetensors",
                                                 "scheduler.json", "scaler.json", "rng.json", "rng.safetensors",
                                                 "train_state.json", "resume_snapshot.json", "config.json"}
    record = json.loads((state / "train_state.json").read_text())
    checksums = record.pop("files")  # the manifest: every other file of the state with its sha256
    assert record == {"format": states.STATE_FORMAT, "step": 4, "epoch": 1, "batch_in_epoch": 4}
    assert set(checksums) == {p.name for p in state.iterdir()} - {"train_state.json"}
    assert checksums["network.safetensors"] == hashlib.sha256((state / "network.safetensors").read_bytes()).hexdigest()
    snapshot = json.loads((state / "resume_snapshot.json").read_text())["fields"]
    assert snapshot["network_dim"] == 8 and snapshot["batches_per_epoch"] == 8 and len(snapshot["dit"]) == 64
    assert states.find_latest_state(out, "demo_lora").name == "demo_lora-state"
    # nothing in a state is a pickle: every file is JSON, safetensors or the resolved config TOML
    assert all(p.suffix in (".json", ".safetensors", ".toml") for p in state.iterdir())
    again = parse_train_args(["--config_file", str(state / "train_config.toml")])
    assert again.model_dump() == cfg.model_dump()


def test_resume_refuses_changed_critical_settings(setup, tmp_path, caplog):
    run_training(_config(setup, tmp_path / "s", steps=2))
    state = str(tmp_path / "s" / "output" / "demo_lora-state")
    with pytest.raises(ConfigError, match=r"network_dim: 8 → 4(.|\n)*seed: 5 → 6"):
        run_training(_config(setup, tmp_path / "s", "--resume", state, "--network_dim", "4", "--seed", "6", steps=4))
    # not strict: a warning, and the run goes on; a non-critical change (steps, lr) is only logged
    with caplog.at_level("INFO"):
        run = run_training(_config(setup, tmp_path / "s", "--resume", state, "--seed", "6",
                                   "--resume_snapshot_strict=false", "--learning_rate", "5e-3", steps=4))
    assert run.steps == 4
    assert "seed: 5 → 6" in caplog.text and "continuing because resume_snapshot_strict = false" in caplog.text
    assert "learning_rate: 0.01 → 0.005" in caplog.text and "max_train_steps: 2 → 4" in caplog.text
    with pytest.raises(ConfigError, match="resume = latest: no state folder"):
        run_training(_config(setup, tmp_path / "t", "--resume", "latest", steps=2))
    with pytest.raises(ConfigError, match="is not a folder"):
        run_training(_config(setup, tmp_path / "t", "--resume", str(tmp_path / "nope"), steps=2))


def test_a_crash_while_saving_leaves_the_previous_state_valid(setup, tmp_path, monkeypatch):
    run_training(_config(setup, tmp_path / "c", steps=2))
    out = tmp_path / "c" / "output"
    before = (out / "demo_lora-state" / "network.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(states, "_write_json", broken)  # fails half-way through the state folder
    with pytest.raises(OSError, match="disk full"):
        run_training(_config(setup, tmp_path / "c", "--resume", "latest", steps=4))
    monkeypatch.undo()
    assert (out / "demo_lora-state" / "network.safetensors").read_bytes() == before
    assert states.read_progress(out / "demo_lora-state").step == 2
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".*old*"))


def test_nested_state_round_trip_keeps_types():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "name": "base", "x": None}]}
    tensors: dict = {}
    back = states.unflatten(json.loads(json.dumps(states.flatten(state, tensors))), tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.99) and isinstance(back["param_groups"][0]["betas"], tuple)
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert list(back["state"]) == [0]  # int keys stay ints (optimizer state is keyed by parameter index)
    with pytest.raises(TypeError, match="cannot store a object"):
        states.flatten({"x": object()}, {})


def test_sampling_during_training_does_not_touch_the_training_rng(setup, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 7\n# comment\na blue square --w 64 --h 48 --s 2\n")
    plain = run_training(_config(setup, tmp_path / "p", steps=4))
    sampled = run_training(_config(setup, tmp_path / "q", "--sample_prompts", str(prompts), "--sample_every_n_steps",
                                   "2", "--sample_at_first", steps=4))
    a, b = load_file(plain.final_path), load_file(sampled.final_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in (tmp_path / "q" / "output" / "sample").glob("*.png"))
    assert len(names) == 6 and names[0].startswith("demo_lora_000000_00")  # at first, step 2, step 4 × 2 prompts


@pytest.mark.parametrize(("batches", "processes", "accum", "epochs", "expected"), [
    (10, 1, 1, 3, 30), (10, 1, 3, 3, 12), (10, 2, 1, 2, 10), (10, 2, 3, 2, 4), (9, 4, 2, 1, 2), (1, 1, 4, 5, 5)])
def test_total_steps_with_accumulation_and_processes(setup, tmp_path, batches, processes, accum, epochs, expected):
    cfg = _config(setup, tmp_path, "--max_train_epochs", str(epochs), accum=accum)
    assert loop.total_steps(cfg, batches, processes) == (expected, epochs)
    steps_cfg = _config(setup, tmp_path, steps=expected + 1, accum=accum)  # one step into another epoch
    assert loop.total_steps(steps_cfg, batches, processes) == (expected + 1, epochs + 1)


def test_resume_from_an_epoch_end_state(setup, tmp_path, monkeypatch):
    """A state written at an epoch's end continues with the next epoch's first batch."""
    extra = ("--save_every_n_epochs", "1")
    reference = run_training(_config(setup, tmp_path / "ref", *extra, steps=10))
    with killed_after(monkeypatch, 9):  # dies in epoch 2, after the epoch-1 state (step 8)
        run_training(_config(setup, tmp_path / "cut", *extra, steps=10))
    state = tmp_path / "cut" / "output" / "demo_lora-000001-state"
    assert states.read_progress(state) == states.Progress(step=8, epoch=1, batch_in_epoch=8)
    resumed = run_training(_config(setup, tmp_path / "cut", *extra, "--resume", str(state), steps=10))
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


NOISE_OPTIONS = ("--noise_offset", "0.05", "--noise_offset_random_strength", "--adaptive_noise_scale", "0.01",
                 "--multires_noise_iterations", "4", "--multires_noise_discount", "0.3", "--ip_noise_gamma", "0.1",
                 "--ip_noise_gamma_random_strength", "--min_timestep", "100", "--max_timestep", "900",
                 "--min_snr_gamma", "5")


def test_noise_and_timestep_options_train_and_resume_bit_identically(setup, tmp_path, monkeypatch, caplog):
    """Issue 14: with every noise/timestep option on, a run resumed after step 1 ends bit-identical (all their
    randomness comes from each sample's own generator); the options without effect get their notice."""
    extra = (*NOISE_OPTIONS, "--save_every_n_steps", "1")
    with caplog.at_level("WARNING", logger="anima_trainer.train.loop"):
        reference = run_training(_config(setup, tmp_path / "ref", *extra, steps=2))
    assert any(r.getMessage().startswith("notice: min_snr_gamma = 5.0: no effect for Anima") for r in caplog.records)
    with killed_after(monkeypatch, 1):
        run_training(_config(setup, tmp_path / "cut", *extra, steps=2))
    resumed = run_training(_config(setup, tmp_path / "cut", *extra, "--resume", "latest", steps=2))
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert resumed.steps == 2 and all(torch.equal(ref[k], got[k]) for k in ref)
