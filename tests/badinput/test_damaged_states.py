"""Damaged, hand-edited and mismatched training states (issue 13, item 5): every one is refused with a
one-line ConfigError naming the state folder, the file and what is wrong — never a raw KeyError, TypeError,
IndexError, OverflowError or "[Errno 2]" — before anything is loaded; optimizer tensors of the wrong shape fail
at load, not at the first step; states carry checksums; a changed optimizer with resume_snapshot_strict =
false continues from a fresh optimizer state with a warning instead of crashing."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer.config import ConfigError
from anima_trainer.train import training_state as states
from anima_trainer.train.loop import run_training
from anima_trainer.train.optim import build_scheduler
from tests.support.cli_output import one_error_line
from tests.train.conftest import setup  # noqa: F401 (the shared tiny training setup fixture)
from tests.train.test_resume import _config

NAME = "demo_lora"


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory) -> dict:  # noqa: F811
    """A finished 2-step run: its final state and the live network/optimizer it was saved from."""
    root = tmp_path_factory.mktemp("damaged")
    run = run_training(_config(setup, root, steps=2))
    return {"root": root, "state": root / "output" / f"{NAME}-state", "run": run}


def _load(saved: dict, folder: Path, optimizer: torch.optim.Optimizer | None = None, **kwargs) -> states.Progress:
    optimizer = optimizer or saved["run"].optimizer
    return states.load_state(folder, network=saved["run"].network, optimizer=optimizer,
                             scheduler=build_scheduler(optimizer, "linear", 10),
                             scaler=torch.amp.GradScaler("cpu", enabled=False), **kwargs)


def _resign(folder: Path) -> None:
    """Update the checksums after an edit (a hand edit that also fixed the manifest): the content checks
    behind the checksum must catch the damage themselves."""
    record = json.loads((folder / states.TRAIN_STATE).read_text())
    record["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
                       if p.name != states.TRAIN_STATE}
    (folder / states.TRAIN_STATE).write_text(json.dumps(record))


def _edit_json(name: str, edit: Callable[[object], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        _resign(folder)
    return damage


def _train_state(text: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        record = json.loads((folder / states.TRAIN_STATE).read_text())
        body = json.dumps({k: v for k, v in record.items() if k != "files"})
        (folder / states.TRAIN_STATE).write_text(text.replace("<BODY>", body[1:-1]))
    return damage


def _wrong_shape_moment(folder: Path) -> None:
    tensors = load_file(folder / "optimizer.safetensors")
    layout = json.loads((folder / "optimizer.json").read_text())
    entry = dict(layout["__dict__"])["state"]["__dict__"][0][1]  # parameter 0's state
    key = dict(entry["__dict__"])["exp_avg"]["__tensor__"]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, folder / "optimizer.safetensors")
    _resign(folder)


def _drop_tensor(folder: Path) -> None:
    tensors = load_file(folder / "optimizer.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, folder / "optimizer.safetensors")
    _resign(folder)


def _flip_a_byte(folder: Path) -> None:
    path = folder / "network.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    # (id, damage, file named in the message, reason regex)
    ("missing-file", lambda f: (f / "optimizer.safetensors").unlink(), "optimizer.safetensors", "missing"),
    ("changed-bytes", _flip_a_byte, "network.safetensors", "does not match its checksum"),
    ("no-checksums-missing-file", lambda f: (_train_state("{<BODY>}")(f), (f / "scaler.json").unlink()),
     "scaler.json", "missing"),
    ("train-state-not-json", lambda f: (f / states.TRAIN_STATE).write_text("{step: 4"), states.TRAIN_STATE,
     "not readable JSON"),
    ("step-not-a-number", _train_state('{<BODY>, "step": "four"}'), states.TRAIN_STATE, "step is 'four'"),
    ("step-overflows", _train_state('{<BODY>, "step": 1e400}'), states.TRAIN_STATE, "step is 'inf'"),
    ("step-huge-int", _train_state('{<BODY>, "step": ' + str(2**70) + "}"), states.TRAIN_STATE, "not a whole number"),
    ("epoch-missing", _train_state('{"format": "' + states.STATE_FORMAT + '", "step": 2, "batch_in_epoch": 2}'),
     states.TRAIN_STATE, "epoch is 'None'"),
    ("scheduler-bad-json", _edit_json("scheduler.json", lambda d: "}{"), "scheduler.json",
     "not an object|does not fit"),
    ("scaler-wrong-type", _edit_json("scaler.json", lambda d: {"__dict__": 5}), "scaler.json",
     "not a tagged tensor, tuple or dict"),
    ("rng-wrong-types", _edit_json("rng.json", lambda d: {"__dict__": [["python", [1, 2]], ["numpy", 7]]}),
     "rng.json", "not a valid random-generator state"),
    ("optimizer-tensor-missing", _drop_tensor, "optimizer.json", "not in the .safetensors file"),
    ("optimizer-wrong-shape", _wrong_shape_moment, "optimizer.safetensors", r"'exp_avg' of parameter 0 has shape"),
    ("optimizer-not-a-state", _edit_json("optimizer.json", lambda d: [1, 2]), "optimizer.json",
     "not an optimizer state"),
]


@pytest.mark.parametrize(("damage", "file", "reason"), [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_state_is_refused_naming_folder_file_and_reason(saved, tmp_path, damage, file, reason):
    folder = tmp_path / f"{NAME}-state"
    shutil.copytree(saved["state"], folder)
    before = {k: v.clone() for k, v in saved["run"].network.state_dict().items()}
    damage(folder)
    with pytest.raises(ConfigError) as info:
        _load(saved, folder)
    message = str(info.value)
    assert str(folder / file) in message, message
    assert re.search(reason, message), message
    assert "\n" not in message
    # the live network is unchanged
    assert all(torch.equal(before[k], v) for k, v in saved["run"].network.state_dict().items())


def test_an_intact_state_loads_and_verifies(saved, tmp_path):
    folder = tmp_path / f"{NAME}-state"
    shutil.copytree(saved["state"], folder)
    assert _load(saved, folder) == states.Progress(step=2, epoch=1, batch_in_epoch=2)


def test_a_damaged_state_through_the_cli_is_one_error_line(saved, tmp_path, capsys):
    """The user's path: `anima-trainer train --resume <damaged>` exits 2 with one `error:` line."""
    from anima_trainer import cli

    folder = saved["root"] / "output" / f"{NAME}-step-copy"
    shutil.copytree(saved["state"], folder, dirs_exist_ok=True)
    _train_state('{<BODY>, "batch_in_epoch": [3]}')(folder)
    code = cli.main(["train", "--config_file", str(saved["root"] / "train.toml"), "--max_train_steps", "4",
                     "--resume", str(folder)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: ")
    assert str(folder / states.TRAIN_STATE) in line and "batch_in_epoch is '[3]'" in line


def test_a_changed_optimizer_with_strict_false_starts_a_fresh_optimizer_state(saved, tmp_path, caplog):
    """AdamW's state into SGD with momentum: strict refuses with the reason; not strict warns and continues
    from a fresh optimizer state (it crashed with KeyError: 'momentum' at the first step)."""
    folder = tmp_path / f"{NAME}-state"
    shutil.copytree(saved["state"], folder)
    params = [p for g in saved["run"].optimizer.param_groups for p in g["params"]]
    sgd = torch.optim.SGD([{"params": params, "name": "base"}], lr=1e-3, momentum=0.9, nesterov=True)
    with pytest.raises(ConfigError, match=r"optimizer state in .* does not fit this optimizer .*another optimizer"):
        _load(saved, folder, sgd)
    with caplog.at_level(logging.WARNING):
        _load(saved, folder, sgd, strict_optimizer=False)
    assert "continuing with a FRESH optimizer state" in caplog.text
    assert sgd.param_groups[0]["momentum"] == 0.9 and not sgd.state
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()  # no KeyError
    assert all("momentum_buffer" in sgd.state[p] for p in params)


def test_resume_with_another_optimizer_type_and_strict_false_trains_on(setup, saved, tmp_path, caplog):  # noqa: F811
    """The same through a whole resumed run (optimizer_type changed to SGDNesterov)."""
    root = tmp_path / "run"
    shutil.copytree(saved["root"] / "output", root / "output")
    with caplog.at_level(logging.WARNING):
        run = run_training(_config(setup, root, "--resume", "latest", "--optimizer_type",
                                   "SGDNesterov", "--resume_snapshot_strict=false", steps=3))
    assert run.steps == 3 and "FRESH optimizer state" in caplog.text
    assert all(torch.isfinite(v).all() for v in load_file(run.final_path).values())

