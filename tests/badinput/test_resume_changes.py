"""Resume honours what the user changed, or refuses it with the reason (issue 13, item 3): a new learning rate
or schedule is applied from the resume point (the restored scheduler used to bring the old rate back), the
batch size is part of the snapshot, and a max_train_steps at or below the state's step is refused instead of
silently writing a final file."""

from __future__ import annotations

import shutil

import pytest
import torch

from anima_trainer.config import ConfigError
from anima_trainer.demo import write_demo_dataset_toml
from anima_trainer.train.loop import run_training
from tests.train.conftest import setup  # noqa: F401 (the shared tiny training setup fixture)
from tests.train.test_resume import RANDOM_CAPTIONS_AND_FLIPS, _config

NAME = "demo_lora"


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):  # noqa: F811
    """A 2-step run (learning_rate 1e-2, linear schedule) and its final state."""
    root = tmp_path_factory.mktemp("changes")
    run_training(_config(setup, root, steps=2))
    return root / "output"


def _copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "output")
    return tmp_path / "output"


def _record_lrs(monkeypatch) -> list[list[float]]:
    """The learning rates each optimizer step is taken with."""
    seen: list[list[float]] = []
    real = torch.amp.GradScaler.step

    def step(self, optimizer, *args, **kwargs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return real(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    return seen


@pytest.mark.parametrize(("change", "expected"), [
    (("--learning_rate", "5e-3"), [5e-3 * (6 - 2) / 6, 5e-3 * (6 - 3) / 6]),
    (("--unet_lr", "5e-3"), [5e-3 * (6 - 2) / 6, 5e-3 * (6 - 3) / 6]),
    (("--lr_scheduler", "constant"), [1e-2, 1e-2]),
], ids=["learning_rate", "unet_lr", "lr_scheduler"])
def test_a_changed_learning_rate_or_schedule_applies_from_the_resume_point(setup, finished, tmp_path, monkeypatch,  # noqa: F811
                                                                           change, expected):
    """Resumed at step 2 with 6 steps instead of 2: step 3 uses the NEW schedule's lr at index 2 (kohya's linear
    over 6 steps: lr × (6 − 2)/6), not the old rate the saved scheduler carried."""
    _copy(finished, tmp_path)
    seen = _record_lrs(monkeypatch)
    run = run_training(_config(setup, tmp_path, "--resume", "latest", *change, steps=6))
    assert run.steps == 6 and len(seen) == 4
    for got, want in zip(seen[:2], expected, strict=True):
        assert got == pytest.approx([want] * len(got), rel=1e-12), (got, want)


@pytest.mark.parametrize(("steps", "state"), [(1, f"{NAME}-state"), (2, f"{NAME}-step00000002-state")],
                         ids=["below", "at-a-step-state"])
def test_max_train_steps_at_or_below_the_states_step_is_refused(setup, finished, tmp_path, steps, state):  # noqa: F811
    out = _copy(finished, tmp_path)
    if not (out / state).exists():  # a state at step 2 under a step name (as an interrupted run leaves)
        shutil.copytree(out / f"{NAME}-state", out / state)
    final = (out / f"{NAME}.safetensors").read_bytes()
    with pytest.raises(ConfigError) as info:
        run_training(_config(setup, tmp_path, "--resume", str(out / state), steps=steps))
    message = str(info.value)
    assert f"{state} is at step 2 and max_train_steps is {steps}" in message
    assert "raise max_train_steps" in message and "\n" not in message
    assert (out / f"{NAME}.safetensors").read_bytes() == final  # no final file written over


def test_resuming_a_run_that_had_already_ended_writes_nothing(setup, finished, tmp_path):  # noqa: F811
    """Killed after its final state and file were both written: the same command with --resume latest
    says there is nothing to do and leaves every file as it is."""
    out = _copy(finished, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    run = run_training(_config(setup, tmp_path, "--resume", "latest", steps=2))
    assert run.steps == 2 and run.final_path == out / f"{NAME}.safetensors"
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_changed_batch_size_is_a_critical_change(setup, finished, tmp_path):  # noqa: F811
    """The effective batch size (the dataset.toml's batch_size wins over train_batch_size) is in the snapshot."""
    _copy(finished, tmp_path)
    cfg = _config(setup, tmp_path, "--resume", "latest", steps=4)
    write_demo_dataset_toml(tmp_path / "dataset.toml", setup["images"], batch_size=2, num_repeats=2,
                            extra=RANDOM_CAPTIONS_AND_FLIPS)
    with pytest.raises(ConfigError, match=r"batch_size: \[1\] → \[2\]"):
        run_training(cfg)


def test_changed_optimizer_args_are_applied_and_a_changed_network_weights_is_listed_as_not_applied(
        setup, finished, tmp_path, caplog):  # noqa: F811
    """The loaded optimizer state carries the old group settings: a changed optimizer_args value is put back
    into the groups; network_weights cannot apply on a resume (the state's weights win) and is said so."""
    out = _copy(finished, tmp_path)
    with caplog.at_level("INFO"):
        run = run_training(_config(setup, tmp_path, "--resume", "latest", "--optimizer_args", "weight_decay=0.5",
                                   "--network_weights", str(out / f"{NAME}.safetensors"), steps=3))
    assert {g["weight_decay"] for g in run.optimizer.param_groups} == {0.5}
    assert "optimizer_args weight_decay = 0.5 applied" in caplog.text
    assert "changed settings NOT applied" in caplog.text and "network_weights: null →" in caplog.text


def test_a_setting_an_older_version_had_is_not_listed_as_changed(setup, finished, tmp_path, caplog):  # noqa: F811
    """States written before issue 16 hold fields that TrainConfig no longer has (save_model_as, fp8_scaled,
    fp8_base_unet, unsloth_offload_checkpointing are options of the kohya tables now): they resume without a
    "changed" line for them, while a real change is still listed."""
    import hashlib
    import json

    out = _copy(finished, tmp_path)
    state = out / f"{NAME}-state"
    record = json.loads((state / "config.json").read_text(encoding="utf-8"))
    record.update(save_model_as="safetensors", fp8_scaled=False, fp8_base_unet=False,
                  unsloth_offload_checkpointing=False)
    (state / "config.json").write_text(json.dumps(record), encoding="utf-8")
    meta = json.loads((state / "train_state.json").read_text(encoding="utf-8"))  # as that version wrote it
    meta["files"]["config.json"] = hashlib.sha256((state / "config.json").read_bytes()).hexdigest()
    (state / "train_state.json").write_text(json.dumps(meta), encoding="utf-8")
    with caplog.at_level("INFO"):
        run_training(_config(setup, tmp_path, "--resume", "latest", "--optimizer_args", "weight_decay=0.5",
                             steps=3))
    assert "optimizer_args weight_decay = 0.5 applied" in caplog.text
    for gone in ("save_model_as", "fp8_scaled", "fp8_base_unet", "unsloth_offload_checkpointing"):
        assert gone not in caplog.text
