"""Crash safety: SIGKILL at chosen and random moments (mid-write of a network file, a state, a cache entry),
resumed with `--resume latest` round after round, ends bit-identical to an uninterrupted run; disk full and
permission errors during a save stop the run with a clear error and leave the previous files intact.

The kill points are injected by a test-only wrapper (`_CHILD`) that the subprocess runs before the CLI: it
replaces the writers with versions that write half of their bytes to the path being written and then SIGKILL
their own process, so "killed while writing" is exercised deterministically, not by luck.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import anima_trainer.fileio as fileio
import anima_trainer.tensor_files as tensor_files
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml, write_demo_models, write_shapes_dataset
from anima_trainer.train import training_state as states
from tests.train.test_resume import RANDOM_CAPTIONS_AND_FLIPS
from anima_trainer.train.loop import run_training

STEPS, SAVE_EVERY, NAME = 24, 2, "demo_lora"  # 8 batches per epoch: 3 epochs, states every 2 steps
CHILD_TIMEOUT = 150

# Runs in the child before the CLI: ANIMA_CRASH_PLAN = {"target", "k", "after", "delay", "steps_file", "out"}.
_CHILD = r'''
import json, os, signal, sys, threading
plan = json.loads(os.environ["ANIMA_CRASH_PLAN"])

def die():
    os.kill(os.getpid(), signal.SIGKILL)
import anima_trainer.tensor_files as tensor_files
from anima_trainer.train.saving import Saver
import anima_trainer.train.training_state as training_state
from safetensors.torch import save as serialize
calls = {}
def hit(kind):
    calls[kind] = calls.get(kind, 0) + 1
    return plan["target"] == kind and calls[kind] == plan["k"]
def half_then_die(path, data):  # the process dies with half of the bytes at the name being written
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    die()
real_fileio_save, real_json, real_replace = tensor_files._write_safetensors, training_state._write_json, os.replace
def fileio_save(fd, tensors, metadata=None):  # fileio's one write path, writing its temporary
    where = os.readlink(f"/proc/self/fd/{fd}")
    if hit("cache" if ".anima_cache" in where else "state" if "-state.tmp-" in where else "network"):
        data = serialize(tensors, metadata)
        os.write(fd, data[: len(data) // 2])
        die()
    return real_fileio_save(fd, tensors, metadata)
def write_json(path, data):
    if hit("json"):
        half_then_die(path, json.dumps(data, indent=1).encode())
    return real_json(path, data)
def replace(src, dst, *args, **kwargs):
    if str(dst).startswith(plan["out"]) and hit("replace"):
        if plan["after"]:
            real_replace(src, dst, *args, **kwargs)
        die()
    return real_replace(src, dst, *args, **kwargs)
tensor_files._write_safetensors, training_state._write_json, os.replace = fileio_save, write_json, replace
real_at_step = Saver.at_step
steps = open(plan["steps_file"], "a", buffering=1)
def at_step(self, progress, last):
    steps.write(f"{progress.step}\n")  # optimizer step done (line-buffered: survives SIGKILL)
    if plan["target"] == "timer" and "timer" not in calls:
        calls["timer"] = 1
        threading.Timer(plan["delay"], die).start()
    return real_at_step(self, progress, last)
Saver.at_step = at_step
if plan["target"] == "startup_timer":
    threading.Timer(plan["delay"], die).start()
from anima_trainer.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
'''


def _write_setup(root: Path, models: dict, images: Path) -> list[str]:
    """A tiny demo run (4 images × 2 repeats, batch 1, flips and shuffled captions, dropout), as CLI args."""
    toml = write_demo_configs(root, models, images, STEPS, seed=5)
    write_demo_dataset_toml(root / "dataset.toml", images, batch_size=1, num_repeats=2,
                            extra=RANDOM_CAPTIONS_AND_FLIPS)
    return ["--config_file", str(toml), "--save_every_n_steps", str(SAVE_EVERY), "--save_state",
            "--learning_rate", "1e-2", "--lr_scheduler", "linear", "--network_dropout", "0.1",
            "--network_args", "rank_dropout=0.2", "module_dropout=0.1",
            "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"]


def _env() -> dict:
    # the same thread count in every child: CPU results are then bit-reproducible across processes
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1"}


def _start(root: Path, args: list[str], plan: dict, log_name: str) -> subprocess.Popen:
    log = open(root / log_name, "wb")  # noqa: SIM115 (closed by the caller through proc.stdout's owner)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=root, env={
        **_env(), "ANIMA_CRASH_PLAN": json.dumps(plan)}, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _wait(proc: subprocess.Popen) -> int:
    try:
        rc = proc.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.log.close()  # type: ignore[attr-defined]
    return rc


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _latest(out: Path) -> tuple[Path | None, int]:
    try:
        folder = states.find_latest_state(out, NAME)
    except ConfigError:
        return None, 0
    return folder, states.read_progress(folder).step


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _check_after_kill(out: Path, cache: Path, reference: dict, reached: int) -> int:
    """The invariants after a SIGKILL; returns the latest state's step."""
    # every network file under a final name is whole and has the network's keys
    for f in out.glob("*.safetensors"):
        if not f.name.startswith("."):
            assert _keys(f) == reference["network_keys"], f
            load_file(f)
    # every folder under a final state name is complete and readable
    for d in out.glob("*-state"):
        if d.name.startswith("."):
            continue
        assert (d / states.TRAIN_STATE).is_file(), f"{d} lacks {states.TRAIN_STATE}"
        assert {p.name for p in d.iterdir()} == reference["state_files"], d
        states.read_progress(d)
        for p in d.glob("*.json"):
            json.loads(p.read_text(encoding="utf-8"))
        for p in d.glob("*.safetensors"):
            assert _keys(p) == reference["state_keys"][p.name], p
            load_file(p)
    # every cache entry under its final name opens and is what it says
    for f in cache.glob("*.safetensors") if cache.is_dir() else []:
        if f.name.startswith("."):
            continue
        with safe_open(str(f), framework="pt") as g:
            assert (g.metadata() or {}).get("anima_cache_key"), f
            assert set(g.keys()) in ({"latent"}, {"latent", "mask"}, {"qwen_hidden"}), f
            for k in g.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                g.get_tensor(k)
    # the event log: every complete line parses; every state it reports as saved is there
    saved = 0
    log = out / f"{NAME}.events.jsonl"
    if log.exists():
        lines = log.read_bytes().split(b"\n")
        for line in lines[:-1]:
            if line.strip():
                event = json.loads(line)
                if event["type"] == "save_state":
                    saved = max(saved, event["step"])
    folder, step = _latest(out)
    assert step >= saved, f"the event log reports a state at step {saved}, the latest loadable one is {step}"
    # at most one save interval of progress is lost
    assert step <= reached and reached - step <= SAVE_EVERY, (reached, step)
    if folder is not None:
        for name in ("optimizer", "scheduler", "scaler", "rng"):
            states.read_nested(folder, name)
    return step


@pytest.fixture
def one_thread():
    """In-process runs on a shared 2-core machine: one thread (the subprocesses get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("crash")
    return {"root": root, "models": write_demo_models(root / "models", seed=3)}


def test_sigkill_at_random_moments_then_resume_ends_bit_identical(tiny, tmp_path):
    started = time.monotonic()
    rng = random.Random(20240611)
    # the uninterrupted reference, in its own folder (own images, own cache), beside the first round
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    ref_args = _write_setup(ref_root, tiny["models"], write_shapes_dataset(ref_root / "images", count=4, seed=3))
    images = write_shapes_dataset(cut_root / "images", count=4, seed=3)
    # the default overwrite = false (the demo config sets true): a resume must never need it (issue 13, item 2)
    args = [*_write_setup(cut_root, tiny["models"], images), "--overwrite=false"]
    out, cache = cut_root / "output", images / ".anima_cache"
    steps_file = cut_root / "steps.txt"
    base = {"k": 0, "after": False, "delay": 0.0, "steps_file": str(steps_file), "out": str(out)}
    ref_proc = _start(ref_root, ref_args, {**base, "target": "none", "steps_file": str(ref_root / "steps.txt"),
                                           "out": str(ref_root / "output")}, "ref.log")
    # kill points: a cache entry, a network file, a state's tensors, a state's JSON, a rename (before or after
    # it), then a random moment of the training and one of the whole process (start-up included)
    plans = [{"target": "cache", "k": rng.randint(1, 13)},
             {"target": "network", "k": rng.randint(1, 2)},
             {"target": "state", "k": rng.randint(1, 4)},
             {"target": "json", "k": rng.randint(1, 10)},
             {"target": "replace", "k": rng.randint(1, 4), "after": rng.random() < 0.5},
             {"target": "timer", "delay": rng.uniform(0.0, 0.4)},
             {"target": "startup_timer", "delay": rng.uniform(1.0, 8.0)}]
    kills, finished, reference = [], False, {}
    for i, plan in enumerate(plans):
        state, before = _latest(out)
        resume = ["--resume", "latest"] if state is not None else []  # `latest` with no state is an error
        proc = _start(cut_root, [*args, *resume], {**base, **plan}, f"round{i}.log")
        rc = _wait(proc)
        if rc == 0:  # a random moment after the end (only the timer rounds can finish)
            assert plan["target"].endswith("timer"), _tail(cut_root / f"round{i}.log")
            finished = True
            break
        assert rc == -9, f"round {i} {plan}: exit {rc}\n{_tail(cut_root / f'round{i}.log')}"
        lines = steps_file.read_text().split() if steps_file.exists() else []
        reached = max([before, *map(int, lines)])
        steps_file.unlink(missing_ok=True)
        if not reference:
            reference.update(_reference_shape(ref_proc, ref_root))
        step = _check_after_kill(out, cache, reference, reached)
        kills.append((plan["target"], reached, step))
    assert len(kills) >= 5, kills
    if not finished:
        proc = _start(cut_root, [*args, "--resume", "latest"], {**base, "target": "none"}, "final.log")
        assert _wait(proc) == 0, _tail(cut_root / "final.log")
    ref_out = ref_root / "output"
    # the final network, every intermediate network file and the final state equal the uninterrupted run's
    compared = 0
    for f in sorted(ref_out.glob(f"{NAME}*.safetensors")):
        a, b = load_file(f), load_file(out / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
        compared += 1
    assert compared == STEPS // SAVE_EVERY  # 11 step files + the final one
    a, b = (load_file(d / f"{NAME}-state" / "network.safetensors") for d in (ref_out, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert states.read_progress(out / f"{NAME}-state").step == STEPS
    # what the killed saves left (hidden temporaries, state folders being written) is removed at the next start
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # the killed cache write's too
    print(f"kills (target, reached step, resumed from): {kills}; {time.monotonic() - started:.1f} s")


def _reference_shape(proc: subprocess.Popen, root: Path) -> dict:
    """Key sets of the reference run's network file and state folder (waits for the reference run)."""
    assert _wait(proc) == 0, _tail(root / "ref.log")
    out = root / "output"
    state = out / f"{NAME}-state"
    return {"network_keys": _keys(out / f"{NAME}.safetensors"), "state_files": {p.name for p in state.iterdir()},
            "state_keys": {p.name: _keys(p) for p in state.glob("*.safetensors")}}


# ------------------------------------------------------------------ disk full / no permission during a save --

def _disk_full_network(monkeypatch, out: Path) -> str:
    real = tensor_files._write_safetensors

    def write(fd, tensors, metadata=None):  # a write() that fails half-way: the OS names no file
        where = os.readlink(f"/proc/self/fd/{fd}")
        if where.startswith(str(out)) and "-state.tmp-" not in where:  # the network file, not the state's
            os.write(fd, b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, tensors, metadata)

    monkeypatch.setattr(tensor_files, "_write_safetensors", write)
    return os.strerror(errno.ENOSPC)


def _disk_full_state(monkeypatch, out: Path) -> str:
    def write_json(path, data):  # a write() that fails: the OS names no file
        Path(path).write_text(json.dumps(data)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(states, "_write_json", write_json)
    return os.strerror(errno.ENOSPC)


def _no_permission(monkeypatch, out: Path) -> str:
    real = fileio._create_temp

    def create_temp(path):
        if str(path).startswith(str(out)):  # an output folder that is not writable
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path.parent / ".x.1-ab.tmp"))
        return real(path)

    monkeypatch.setattr(fileio, "_create_temp", create_temp)
    return os.strerror(errno.EACCES)


def _no_permission_state(monkeypatch, out: Path) -> str:
    real = os.replace

    def replace(src, dst, *args, **kwargs):  # the new state cannot take its name (after the old one moved aside)
        if Path(src).name.startswith(f".{NAME}-state.tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return os.strerror(errno.EACCES)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.endswith(".jsonl") and "logs" not in p.parts}


@pytest.fixture(scope="module")
def saved_run(tiny) -> dict:
    """A finished 2-step run with its final network file and state (copied by each case)."""
    root = tiny["root"] / "saved"
    args = _write_setup(root, tiny["models"], write_shapes_dataset(root / "images", count=4, seed=3))
    run_training(parse_train_args([*args, "--max_train_steps", "2"]))
    return {"root": root, "args": args}


# a save writes the state first, then the network file: a folder without write permission fails at the state
@pytest.mark.parametrize(("fault", "saving"), [(_disk_full_network, f"{NAME}.safetensors"),
                                               (_disk_full_state, f"{NAME}-state"),
                                               (_no_permission, f"{NAME}-state"),
                                               (_no_permission_state, f"{NAME}-state")],
                         ids=["disk-full-network", "disk-full-state", "no-permission-folder", "no-permission-state"])
def test_a_failing_save_stops_with_a_clear_error_and_keeps_the_previous_files(saved_run, tmp_path, monkeypatch,
                                                                               fault, saving, one_thread):
    out = tmp_path / "output"
    shutil.copytree(saved_run["root"] / "output", out)
    before = _snapshot(out)
    args = [*saved_run["args"], "--output_dir", str(out), "--max_train_steps", "4", "--resume", "latest"]
    reason = fault(monkeypatch, out)
    with pytest.raises(OSError) as info:
        run_training(parse_train_args(args))  # the final save at step 4 replaces the step-2 files and fails
    monkeypatch.undo()
    message = str(info.value)
    assert reason in message and str(out) in message and saving in message, message
    # the file or state being replaced is byte-identical to before; nothing half-written is left behind
    after = _snapshot(out)
    for name, data in before.items():
        if name.startswith(saving):
            assert after[name] == data, name
    assert set(after) == set(before)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # the state is written before the network file: a failing network save leaves the new state (the resume
    # writes the file from it), a failing state save leaves the previous state and network file
    load_file(out / f"{NAME}.safetensors")
    assert states.read_progress(states.find_latest_state(out, NAME)).step == (4 if saving.endswith(".safetensors")
                                                                              else 2)
    # the run stopped, and the event log says why
    events = [json.loads(line) for line in (out / f"{NAME}.events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "error" and events[-1]["step"] == 4 and reason in events[-1]["message"]
    # once the disk has room again, the same command resumes from the intact state and finishes
    run = run_training(parse_train_args(args))
    assert run.steps == 4 and states.read_progress(out / f"{NAME}-state").step == 4
    with safe_open(str(out / f"{NAME}.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "4"


def test_stale_temporaries_of_killed_saves_are_cleaned_up_and_a_state_moved_aside_is_put_back(tmp_path):
    out = tmp_path
    for name in (f".{NAME}-step00000004-state.tmp-77", f".{NAME}-state.old-78", f".{NAME}-step00000002-state.old-79",
                 f"{NAME}-step00000002-state"):
        (out / name).mkdir()
        (out / name / states.TRAIN_STATE).write_text(json.dumps({"format": states.STATE_FORMAT, "step": 2,
                                                                 "epoch": 1, "batch_in_epoch": 2}))
    for name in (f".{NAME}.safetensors.k2j4.tmp", f"..{NAME}-step00000004.safetensors.check.tmp.x1.tmp",
                 f".{NAME}-step00000004.safetensors.check.tmp", ".other.safetensors.ab.tmp", f"{NAME}.safetensors"):
        (out / name).write_bytes(b"x")
    states.remove_stale_temporaries(out, NAME)
    # killed between moving the final state aside and renaming the new one in: the old one is back
    assert sorted(p.name for p in out.iterdir()) == [".other.safetensors.ab.tmp", f"{NAME}-state",
                                                     f"{NAME}-step00000002-state", f"{NAME}.safetensors"]
    assert states.read_progress(out / f"{NAME}-state").step == 2
