"""Issue-6 options seen through a whole training run: validation in the loop, non-finite steps, schedule-free
optimizers around saves, previews in TensorBoard, and the event log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.config import parse_train_args
from anima_trainer.config.tomlw import toml_value
from anima_trainer.demo import write_demo_configs
from anima_trainer.train.loop import run_training
from anima_trainer.train.monitor import NonFiniteLossError


def _config(setup: dict, out: Path, *extra: str, steps: int = 4, split: float | None = None):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    if split is not None:
        (out / "dataset.toml").write_text(f"""[general]
caption_extension = ".txt"
resolution = 64
batch_size = 1
validation_split = {split}

[[datasets]]
  [[datasets.subsets]]
  image_dir = {toml_value(setup["images"])}
""", encoding="utf-8")
    return parse_train_args(["--config_file", str(toml), *extra])


def _events(out: Path, name: str = "demo_lora") -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.events.jsonl").read_text().splitlines()]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_validation_loss_is_logged_during_training(setup, tmp_path):
    run = run_training(_config(setup, tmp_path, "--validate_every_n_steps", "2", split=0.5, steps=4))
    scalars = _scalars(tmp_path / "output" / "logs")
    assert [s for s, _ in scalars["val/loss"]] == [2, 4]  # every 2 steps; epoch ends coincide, not repeated
    assert {"val/loss_sigma_0.2", "val/loss_sigma_0.8", "loss/current", "lr/base"} <= set(scalars)
    assert scalars["val/loss"][0][1] != scalars["val/loss"][1][1]  # the network moved between the two
    validations = [e for e in _events(tmp_path / "output") if e["type"] == "validation"]
    assert [e["step"] for e in validations] == [2, 4] and run.steps == 4


def test_a_nonfinite_loss_skips_the_update_and_never_reaches_a_file(setup, tmp_path, monkeypatch):
    real = loop.training_step
    calls = {"n": 0}

    def nan_at_two(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(loop, "training_step", nan_at_two)
    run = run_training(_config(setup, tmp_path / "skip", steps=4))
    weights = load_file(run.final_path)
    assert all(torch.isfinite(t).all() for t in weights.values())
    alerts = [e for e in _events(tmp_path / "skip" / "output") if e["type"] == "alert"]
    assert [a["step"] for a in alerts] == [2] and alerts[0]["alert"] == "nonfinite_loss"
    assert _events(tmp_path / "skip" / "output")[-1]["skipped_steps"] == 1
    # policy raise: the run stops at that step, with the event log saying why
    calls["n"] = 0
    with pytest.raises(NonFiniteLossError, match="step 2"):
        run_training(_config(setup, tmp_path / "raise", "--nonfinite_loss_policy", "raise", steps=4))
    assert _events(tmp_path / "raise" / "output")[-1]["type"] == "error"
    assert not (tmp_path / "raise" / "output" / "demo_lora.safetensors").exists()


def test_schedule_free_weights_are_saved_in_eval_mode(setup, tmp_path):
    run = run_training(_config(setup, tmp_path, "--optimizer_type", "adamw_schedulefree", "--learning_rate", "1e-2",
                               steps=3))
    saved = load_file(run.final_path)
    live = run.network.state_tensors()
    # after the save the optimizer is back in train mode: the live weights (y) differ from the saved x
    assert any(not torch.equal(saved[k], live[k]) for k in saved if not k.endswith(".alpha"))
    from anima_trainer.train.optim import set_optimizer_train_mode

    set_optimizer_train_mode(run.optimizer, False)  # x again (train → eval round trip: rounding only)
    live = run.network.state_tensors()
    for k in saved:
        torch.testing.assert_close(saved[k], live[k], atol=1e-6, rtol=1e-5)


def test_previews_go_to_tensorboard_and_the_event_log_records_the_run(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2\n")
    run_training(_config(setup, tmp_path, "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", steps=2))
    files = list((tmp_path / "output" / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[0]), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["sample/00"] and [e.step for e in acc.Images("sample/00")] == [2]
    kinds = [e["type"] for e in _events(tmp_path / "output")]
    assert kinds[0] == "config" and kinds[-1] == "end" and "save" in kinds


def test_the_nonfinite_stop_message_offers_the_last_good_state(setup, tmp_path, monkeypatch, capsys):
    from anima_trainer.cli import main

    real = loop.training_step
    calls = {"n": 0}

    def nan_from_three(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(loop, "training_step", nan_from_three)
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 6, seed=5)
    code = main(["train", "--config_file", str(toml), "--save_state", "--save_every_n_steps", "2",
                 "--nonfinite_loss_policy", "raise"])
    err = capsys.readouterr().err
    assert code == 1 and "monitor stopped training at step 3" in err
    assert "the last good state is" in err and "demo_lora-step00000002-state" in err and "--resume" in err
