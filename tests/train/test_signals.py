"""SIGINT/SIGTERM: the first finishes the step, saves a state and stops; the second stops at once, cleanly."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.train import training_state as states
from anima_trainer.train.loop import TrainingInterrupted, run_training
from tests.train.test_resume import _config


def _signal_at(monkeypatch, micro_batch: int, signals: list[int]) -> None:
    real = loop.training_step
    count = {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if count["n"] == micro_batch:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", step)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_saves_a_state_and_the_resumed_run_is_exact(setup, tmp_path, monkeypatch, sig):
    reference = run_training(_config(setup, tmp_path / "ref", "--save_every_n_steps", "100", steps=6))
    _signal_at(monkeypatch, 3, [sig])
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 3; a state was saved to .*step00000003-state"):
        run_training(_config(setup, tmp_path / "cut", "--save_every_n_steps", "100", steps=6))
    monkeypatch.undo()
    out = tmp_path / "cut" / "output"
    assert states.read_progress(out / "demo_lora-step00000003-state").step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = run_training(_config(setup, tmp_path / "cut", "--save_every_n_steps", "100", "--resume", "latest",
                                   steps=6))
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_second_signal_stops_at_once_without_partial_files(setup, tmp_path, monkeypatch):
    _signal_at(monkeypatch, 3, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        run_training(_config(setup, tmp_path, steps=6))
    out = tmp_path / "output"
    # the step-2 network file and state are whole; nothing partial or hidden is left behind
    assert states.read_progress(out / "demo_lora-step00000002-state").step == 2
    assert load_file(out / "demo_lora-step00000002.safetensors")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert not (out / "demo_lora.safetensors").exists()
