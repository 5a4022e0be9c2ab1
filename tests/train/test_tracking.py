"""Tracker setup (TensorBoard by default, run folder naming, wandb options and errors), previews into
TensorBoard, and the TensorBoard server's port fallback and lifetime."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.train.tracking import (
    TensorBoardServer,
    log_images,
    pick_port,
    port_is_free,
    resolve_tracking,
    run_folder,
    sanitize_name,
    start_tensorboard,
    start_trackers,
    tensorboard_command,
)

NOW = datetime(2026, 1, 2, 3, 4, 5)


def cfg(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir=tmp_path / "out",
                       dataset_config="ds", **kw)


def only(*names: str):
    return lambda module: module in names


@pytest.mark.parametrize("name, expected", [
    ("my_lora", "my_lora"), ("my lora/v2 (final)!", "my_lora_v2_final"), ("__a__b..", "a_b"), ("../..", "train"),
    ("ünï", "n"), ("☃", "train"), ("v1.5-x", "v1.5-x"),
])
def test_sanitize_name(name, expected):
    assert sanitize_name(name) == expected


def test_tensorboard_by_default_under_the_output_folder(tmp_path):
    plan = resolve_tracking(cfg(tmp_path, output_name="my lora"), NOW, installed=only("tensorboard"))
    assert plan.log_with == ["tensorboard"] and plan.logging_dir == tmp_path / "out" / "logs"
    assert plan.run_dir == tmp_path / "out" / "logs" / "my_lora_20260102_030405"
    assert plan.run_name == "my_lora_20260102_030405" and plan.tracker_name == "network_train"
    assert plan.accelerator_kwargs() == {"log_with": ["tensorboard"], "project_dir": str(plan.run_dir)}
    assert not (tmp_path / "out").exists()  # resolving creates nothing


def test_run_folder_is_unique_and_prefix_is_kept_as_given(tmp_path):
    (tmp_path / "logs" / "exp-20260102_030405").mkdir(parents=True)
    (tmp_path / "logs" / "exp-20260102_030405_2").mkdir()
    assert run_folder(tmp_path / "logs", "exp-", NOW) == tmp_path / "logs" / "exp-20260102_030405_3"
    plan = resolve_tracking(cfg(tmp_path, logging_dir=tmp_path / "logs", log_prefix="exp-", log_with="tensorboard",
                                log_tracker_name="anima"), NOW, installed=only("tensorboard"))
    assert plan.run_dir == tmp_path / "logs" / "exp-20260102_030405_3" and plan.tracker_name == "anima"


def test_default_without_tensorboard_installed_only_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        plan = resolve_tracking(cfg(tmp_path), NOW, installed=only())
    assert plan.log_with == [] and plan.accelerator_kwargs() == {"log_with": None, "project_dir": None}
    assert "TensorBoard is not installed, so this run logs no curves" in caplog.text


def test_none_turns_trackers_off(tmp_path):
    plan = resolve_tracking(cfg(tmp_path, log_with="none"), NOW, installed=only("tensorboard", "wandb"))
    assert plan.log_with == [] and plan.run_dir is None


def test_missing_packages_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_tracking(cfg(tmp_path, log_with="wandb"), NOW, installed=only("tensorboard"))
    assert str(e.value) == ("log_with: 'wandb' needs the wandb package, which is not installed (pip install wandb, "
                            "or pip install anima-trainer[wandb])")
    with pytest.raises(ConfigError, match="log_with: 'tensorboard' needs the tensorboard package"):
        resolve_tracking(cfg(tmp_path, log_with="tensorboard", logging_dir=tmp_path), NOW, installed=only())
    with pytest.raises(ConfigError, match="log_with: 'all' needs tensorboard or wandb installed"):
        resolve_tracking(cfg(tmp_path, log_with="all", logging_dir=tmp_path), NOW, installed=only())


def test_wandb_names_and_tracker_config(tmp_path):
    plan = resolve_tracking(cfg(tmp_path, log_with="all", logging_dir=tmp_path / "logs"), NOW,
                            installed=only("tensorboard", "wandb"))
    assert plan.log_with == ["tensorboard", "wandb"]
    assert plan.init_kwargs == {"wandb": {"name": "last_20260102_030405"}}  # same name as the TensorBoard run
    toml = tmp_path / "trackers.toml"
    toml.write_text('[wandb]\ntags = ["anima"]\nentity = "me"\n', encoding="utf-8")
    plan = resolve_tracking(cfg(tmp_path, log_with="wandb", wandb_run_name="try-3", log_tracker_config=toml), NOW,
                            installed=only("wandb"))
    assert plan.init_kwargs == {"wandb": {"tags": ["anima"], "entity": "me", "name": "try-3"}}
    assert plan.run_dir is None and plan.run_name == "last_20260102_030405"  # wandb needs no folder
    toml.write_text("tags = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"log_tracker_config: top-level keys must be tracker tables .* got tags"):
        resolve_tracking(cfg(tmp_path, log_with="wandb", log_tracker_config=toml), NOW, installed=only("wandb"))
    with pytest.raises(ConfigError, match="log_tracker_config: .* not found"):
        resolve_tracking(cfg(tmp_path, log_with="wandb", log_tracker_config=tmp_path / "no.toml"), NOW,
                         installed=only("wandb"))


class FakeAccelerator:
    def __init__(self, trackers=()) -> None:
        self.trackers, self.calls = list(trackers), []

    def init_trackers(self, name, config=None, init_kwargs=None) -> None:
        self.calls.append((name, config, init_kwargs))


def test_start_trackers_passes_the_plan(tmp_path):
    plan = resolve_tracking(cfg(tmp_path), NOW, installed=only("tensorboard"))
    acc = FakeAccelerator()
    start_trackers(acc, plan, cfg(tmp_path), {"max_train_steps": 100, "resume": None, "dir": tmp_path})
    assert acc.calls == [("network_train", {"max_train_steps": 100, "dir": str(tmp_path)}, {})]
    acc = FakeAccelerator()
    start_trackers(acc, resolve_tracking(cfg(tmp_path, log_with="none"), NOW), cfg(tmp_path))
    assert acc.calls == []


def _event_tags(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_accelerator_writes_into_the_run_folder(tmp_path):
    from accelerate import Accelerator

    plan = resolve_tracking(cfg(tmp_path), NOW, installed=only("tensorboard"))
    accelerator = Accelerator(**plan.accelerator_kwargs())
    start_trackers(accelerator, plan, cfg(tmp_path), {"max_train_steps": 3})
    accelerator.log({"loss/current": 0.5, "lr/base": 1e-4}, step=1)
    assert log_images(accelerator, "sample", [Image.new("RGB", (8, 6), (255, 0, 0))], step=1) == 1
    accelerator.end_training()
    events = _event_tags(plan.run_dir / "network_train")
    assert {"loss/current", "lr/base"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("loss/current")] == [0.5]
    assert events.Tags()["images"] == ["sample/00"]


def test_log_images_into_tensorboard(tmp_path):
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker("network_train", tmp_path)
    tracker.start()
    png = tmp_path / "p.png"
    Image.new("RGB", (4, 4), (0, 0, 255)).save(png)
    images = [Image.new("RGB", (8, 6), (255, 0, 0)), np.zeros((5, 7, 3), np.uint8), torch.ones(3, 2, 3), png]
    assert log_images(FakeAccelerator([tracker]), "sample/e000002", images, step=7) == 4
    tracker.finish()
    events = _event_tags(tmp_path / "network_train")
    assert sorted(events.Tags()["images"]) == [f"sample/e000002/{i:02d}" for i in range(4)]
    first = events.Images("sample/e000002/00")[0]
    assert (first.step, first.width, first.height) == (7, 8, 6)
    assert (events.Images("sample/e000002/02")[0].width, events.Images("sample/e000002/02")[0].height) == (3, 2)
    assert log_images(FakeAccelerator(), "sample", images, step=1) == 0  # no trackers: nothing sent


# --- TensorBoard server ---------------------------------------------------------------------------------------
def test_pick_port_falls_back_to_the_next_free_one():
    busy = {6006, 6007}
    free = lambda host, port: port not in busy  # noqa: E731
    assert pick_port("127.0.0.1", 6006, is_free=free) == (6008, [6006, 6007])
    assert pick_port("127.0.0.1", 6010, is_free=free) == (6010, [])
    assert pick_port("127.0.0.1", 6006, is_free=lambda h, p: False) == (None, list(range(6006, 6027)))
    port, busy_list = pick_port("127.0.0.1", 0)
    assert port > 0 and busy_list == []


def test_port_is_free_sees_a_bound_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port_is_free("127.0.0.1", taken)
        port, busy = pick_port("127.0.0.1", taken)
        assert busy == [taken] and port != taken and port_is_free("127.0.0.1", port)


class FakeProcess:
    def __init__(self, cmd, **kw) -> None:
        self.cmd, self.kw, self.returncode, self.terminated = cmd, kw, None, False

    def poll(self):
        return self.returncode

    def terminate(self) -> None:
        self.terminated, self.returncode = True, -15

    def wait(self, timeout=None) -> int:
        return self.returncode

    def kill(self) -> None:  # pragma: no cover - only when terminate does not work
        self.returncode = -9


def test_start_tensorboard_command_fallback_and_stop(tmp_path, caplog):
    c = cfg(tmp_path, auto_start_tensorboard=True, tensorboard_port=6006)
    plan = resolve_tracking(c, NOW, installed=only("tensorboard"))
    started = []
    popen = lambda cmd, **kw: started.append(FakeProcess(cmd, **kw)) or started[-1]  # noqa: E731
    with caplog.at_level(logging.WARNING):
        with start_tensorboard(c, plan, popen=popen, is_free=lambda h, p: p != 6006) as server:
            assert server.url == "http://127.0.0.1:6007" and server.port == 6007 and server.running
    assert "TensorBoard port 6006 is busy; falling back to available port 6007" in caplog.text
    (proc,) = started
    assert proc.cmd == [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "out" / "logs"),
                        "--host", "127.0.0.1", "--port", "6007"]
    assert proc.kw["stdout"] == subprocess.DEVNULL and proc.terminated  # stopped when the block ends
    assert (tmp_path / "out" / "logs").is_dir()
    server.stop()  # twice is fine


def test_start_tensorboard_skips_without_failing(tmp_path, caplog):
    popen = lambda *a, **k: pytest.fail("no server should start")  # noqa: E731
    on = cfg(tmp_path, auto_start_tensorboard=True)
    plan = resolve_tracking(on, NOW, installed=only("tensorboard"))
    assert start_tensorboard(cfg(tmp_path), plan, popen=popen).url is None  # not asked for
    assert start_tensorboard(on, plan, popen=popen, is_main_process=False).url is None
    with caplog.at_level(logging.WARNING):
        off = cfg(tmp_path, auto_start_tensorboard=True, log_with="none")
        assert start_tensorboard(off, resolve_tracking(off, NOW), popen=popen).url is None
        assert start_tensorboard(on, plan, popen=popen, installed=only()).url is None
        assert start_tensorboard(on, plan, popen=popen, is_free=lambda h, p: False).url is None
    assert "TensorBoard logging is off for this run" in caplog.text
    assert "tensorboard is not installed" in caplog.text
    assert "ports 6006-6026 on 127.0.0.1 are all busy; no TensorBoard server started" in caplog.text


def test_a_real_tensorboard_process_is_stopped(tmp_path):
    c = cfg(tmp_path, auto_start_tensorboard=True, tensorboard_port=0, tensorboard_logdir=tmp_path / "tb")
    server = start_tensorboard(c, resolve_tracking(c, NOW))
    try:
        assert server.port > 0 and server.process.args == tensorboard_command(tmp_path / "tb", "127.0.0.1",
                                                                              server.port)
        process = server.process
    finally:
        server.stop()
    assert process.poll() is not None and not server.running and server.process is None
    assert TensorBoardServer().url is None
