"""A run owns its files (issue 13, items 1, 2, 4 and 6's NaN state): `latest` means this run's own states,
start-up clean-up touches only this run's temporaries, one lock per output_dir/output_name, a resumed run may
write its own files after its resume point again (with the DEFAULT overwrite = false), a new run that would
write over an earlier run's files refuses at start, and no state is ever written from NaN weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.train.saving import Saver
import anima_trainer.train.loop as loop
from anima_trainer.config import ConfigError
from anima_trainer.fileio import OutputExistsError
from anima_trainer.train import training_state as states
from anima_trainer.train.lock import RunLock, lock_path
from anima_trainer.train.loop import TrainingInterrupted, run_training
from tests.support.killed_run import Crash
from tests.train.conftest import setup  # noqa: F401 (the shared tiny training setup fixture)
from tests.train.test_resume import _config

NAME = "demo_lora"
DEFAULTS = ("--overwrite=false",)  # the demo config sets overwrite = true; users get false


def _state(out: Path, name: str, step: int) -> Path:
    folder = out / name
    folder.mkdir(parents=True)
    (folder / states.TRAIN_STATE).write_text(json.dumps({"format": states.STATE_FORMAT, "step": step, "epoch": 1,
                                                         "batch_in_epoch": step}))
    return folder


def test_latest_is_this_runs_own_newest_state(tmp_path):
    """`char`, `char_v2` and `char-lowlr` side by side: each resumes only its own states (item 1)."""
    for name, step in [("char-step00000004-state", 4), ("char-000001-state", 3), ("char_v2-state", 8),
                       ("char_v2-step00000002-state", 2), ("char-lowlr-state", 9), ("char-lowlr-step00000006-state", 6),
                       ("charX-step00000099-state", 99)]:
        _state(tmp_path, name, step)
    assert states.find_latest_state(tmp_path, "char").name == "char-step00000004-state"
    assert states.find_latest_state(tmp_path, "char_v2").name == "char_v2-state"
    assert states.find_latest_state(tmp_path, "char-lowlr").name == "char-lowlr-state"
    with pytest.raises(ConfigError, match="no state folder of output_name 'cha'"):
        states.find_latest_state(tmp_path, "cha")


def test_startup_clean_up_touches_only_this_runs_temporaries(tmp_path):
    """Another run's in-progress state (`.other-…-state.tmp-<pid>`) survives this run's start (item 4)."""
    others = [".char_v2-step00000002-state.tmp-77", ".char-lowlr-state.tmp-78", ".char_v2-state.old-79"]
    mine = [".char-step00000002-state.tmp-80", ".char-000001-state.tmp-81"]
    for name in [*others, *mine]:
        _state(tmp_path, name, 2)
    for name in (".char_v2.safetensors.ab12.tmp", ".char-lowlr-step00000002.safetensors.x.tmp",
                 ".char.safetensors.k2j4.tmp", ".char-step00000002.safetensors.q.tmp"):
        (tmp_path / name).write_bytes(b"x")
    states.remove_stale_temporaries(tmp_path, "char")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*others, ".char_v2.safetensors.ab12.tmp", ".char-lowlr-step00000002.safetensors.x.tmp"])


def test_run_lock_refuses_a_live_holder_and_recovers_a_dead_ones(tmp_path, caplog):
    lock = RunLock(tmp_path, "char")
    with lock:
        record = json.loads(lock_path(tmp_path, "char").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(ConfigError) as info:
            RunLock(tmp_path, "char").acquire()
        message = str(info.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and str(lock.path) in message
        assert "use another output_name" in message and "\n" not in message
        with RunLock(tmp_path, "char_v2"):  # another output_name in the same folder is another run
            pass
    assert not lock.path.exists()  # released
    # a lock left by a process that was killed (kill -9 leaves it behind) is taken over, with a message
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, "char") as again:
        assert json.loads(again.path.read_text())["pid"] == os.getpid()
    assert f"left by process {dead.pid}" in caplog.text and "no longer running" in caplog.text


def test_a_second_run_with_the_same_output_name_refuses_at_start(setup, tmp_path):  # noqa: F811
    out = tmp_path / "output"
    out.mkdir()
    other = _state(out, ".other-step00000002-state.tmp-999", 2)  # another run's save in progress
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(out, NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                    "started": "2026-01-01T00:00:00"}))
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on .*lock file"):
            run_training(_config(setup, tmp_path, *DEFAULTS, steps=2))
        assert sorted(p.name for p in out.iterdir()) == [f".{NAME}.lock", other.name]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    run = run_training(_config(setup, tmp_path, *DEFAULTS, steps=2))  # the holder is gone: its lock is recovered
    assert run.steps == 2 and other.is_dir() and not lock_path(out, NAME).exists()


# ------------------------------------------------ item 2: recovery with the default overwrite = false --

def _crash_when_writing(monkeypatch, what: str, name: str) -> None:
    """Raise (like a kill: every write is atomic) when the state folder or network file `name` is written."""
    if what == "state":
        real = states.save_state

        def save_state(folder, **kwargs):
            if Path(folder).name == name:
                raise Crash(f"killed writing {name}")
            return real(folder, **kwargs)

        monkeypatch.setattr(states, "save_state", save_state)
    else:
        real_files = Saver._network_files

        def network_files(self, path, step, epoch):
            if Path(path).name == name:
                raise Crash(f"killed writing {name}")
            return real_files(self, path, step, epoch)

        monkeypatch.setattr(Saver, "_network_files", network_files)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted 6-step run (network files and states every 2 steps), default overwrite."""
    root = tmp_path_factory.mktemp("reference")
    run_training(_config(setup, root, *DEFAULTS, steps=6))
    return root / "output"


@pytest.mark.parametrize("killed", ["state", "network"])
def test_resume_after_a_kill_between_a_step_file_and_its_state_with_default_overwrite(
        setup, reference, tmp_path, monkeypatch, killed):  # noqa: F811
    """Killed while saving step 4 (its state or its file): `--resume latest` finishes without "already exists"
    and every file equals the uninterrupted run's."""
    _crash_when_writing(monkeypatch, killed, f"{NAME}-step00000004-state" if killed == "state"
                        else f"{NAME}-step00000004.safetensors")
    with pytest.raises(Crash):
        run_training(_config(setup, tmp_path, *DEFAULTS, steps=6))
    monkeypatch.undo()
    out = tmp_path / "output"
    resumed = run_training(_config(setup, tmp_path, *DEFAULTS, "--resume", "latest", steps=6))
    assert resumed.steps == 6
    for name in (f"{NAME}-step00000002.safetensors", f"{NAME}-step00000004.safetensors", f"{NAME}.safetensors"):
        a, b = load_file(reference / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_resumed_run_rewrites_its_own_files_after_the_resume_point(setup, reference, tmp_path):  # noqa: F811
    """Resuming from an older state of the run (here step 2 while files of step 4 exist) re-trains and writes
    step 4 again, with overwrite = false: they are this run's own files after its resume point."""
    out = tmp_path / "output"
    shutil.copytree(reference, out)
    (out / f"{NAME}.safetensors").unlink()
    shutil.rmtree(out / f"{NAME}-state")
    (out / f"{NAME}-step00000004.safetensors").write_bytes(b"stale")  # proves it is written again
    run_training(_config(setup, tmp_path, *DEFAULTS, "--resume", str(out / f"{NAME}-step00000002-state"), steps=6))
    name = f"{NAME}-step00000004.safetensors"
    a, b = load_file(reference / name), load_file(out / name)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_over_an_earlier_runs_files_fails_at_start(setup, reference, tmp_path, monkeypatch):  # noqa: F811
    """Without --resume, a run that would write over the step files and states of an earlier run of the same
    name stops before the first step (check_start looked only at the final file), naming files and fixes."""
    out = tmp_path / "output"
    shutil.copytree(reference, out)
    (out / f"{NAME}.safetensors").unlink()  # the final file gone: only the intermediate saves collide
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_step(*args, **kwargs):
        raise AssertionError("trained although the start-up check should have refused")

    monkeypatch.setattr(loop, "training_step", no_step)
    with pytest.raises(OutputExistsError) as info:
        run_training(_config(setup, tmp_path, *DEFAULTS, steps=6))
    message = str(info.value)
    assert f"{NAME}-step00000002.safetensors" in message and f"{NAME}-step00000004.safetensors" in message
    assert f"{NAME}-step00000002-state" in message
    assert "--resume latest" in message and "another output_name" in message and "overwrite = true" in message
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resuming_from_the_final_state_whose_file_is_missing_writes_it(setup, reference, tmp_path):  # noqa: F811
    """Killed between the final state and the final file: --resume latest writes the file and ends."""
    out = tmp_path / "output"
    shutil.copytree(reference, out)
    (out / f"{NAME}.safetensors").unlink()
    run = run_training(_config(setup, tmp_path, *DEFAULTS, "--resume", "latest", steps=6))
    assert run.steps == 6
    a, b = load_file(reference / f"{NAME}.safetensors"), load_file(out / f"{NAME}.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------- item 6: SIGTERM under nonfinite_loss_policy = warn --

def test_sigterm_after_nan_weights_saves_no_state_and_names_the_last_good_one(
        setup, tmp_path, monkeypatch):  # noqa: F811
    real = loop.training_step
    count = {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        loss = real(*args, **kwargs)
        if count["n"] == 3:  # step 3: a NaN loss that `warn` lets through to the weights, then SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            return loss * float("nan")
        return loss

    monkeypatch.setattr(loop, "training_step", step)
    with pytest.raises(TrainingInterrupted) as info:
        run_training(_config(setup, tmp_path, *DEFAULTS, "--nonfinite_loss_policy", "warn", steps=6))
    out = tmp_path / "output"
    good = out / f"{NAME}-step00000002-state"
    assert info.value.state is None and info.value.last_good == good
    message = str(info.value)
    assert "NO state was saved" in message and str(good) in message and "lower learning rate" in message
    assert not (out / f"{NAME}-step00000003-state").exists()
    assert states.find_latest_state(out, NAME) == good
