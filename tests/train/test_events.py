"""The JSON-lines event log (parses, survives a crash, appends across runs) and the resolved-config TOML
(reads back into an equal TrainConfig)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from anima_trainer.config import TrainConfig, parse_train_args
from anima_trainer.train.events import (
    EventLog,
    config_for_log,
    events_path,
    read_events,
    resolved_config_toml,
    write_resolved_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_lines_are_json_with_the_common_fields(tmp_path):
    path = events_path(tmp_path / "out", "my_lora")
    assert path == tmp_path / "out" / "my_lora.events.jsonl"
    with EventLog(path, run="r1") as events:
        events.write("start", step=0, epoch=1, max_train_steps=10)
        events.write("alert", step=3, epoch=1, alert="nonfinite_loss", loss=float("nan"), where=Path("/x"))
        events.write("save", step=5, epoch=1, path=tmp_path / "a.safetensors", sizes=(1, 2))
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [r["type"] for r in records] == ["start", "alert", "save"]
    assert all(set(r) >= {"time", "run", "type", "step", "epoch"} and r["run"] == "r1" for r in records)
    assert records[0]["max_train_steps"] == 10
    assert (records[1]["loss"], records[1]["where"]) == ("nan", "/x")  # strict JSON: no NaN literal
    assert (records[2]["path"], records[2]["sizes"]) == (str(tmp_path / "a.safetensors"), [1, 2])
    assert records == read_events(path)


def test_bad_event_type_and_reserved_fields(tmp_path):
    with EventLog(tmp_path / "e.jsonl") as events:
        with pytest.raises(ValueError, match="unknown event type 'oops'"):
            events.write("oops")
        with pytest.raises(ValueError, match=r"event fields \['time'\] are reserved"):
            events.write("end", time=3)


def test_disabled_log_writes_nothing(tmp_path):
    events = EventLog(None)
    record = events.write("start", step=0)
    assert not events.enabled and record["type"] == "start" and list(tmp_path.iterdir()) == []


def test_events_survive_a_crash(tmp_path):
    path = tmp_path / "crash.events.jsonl"
    code = (f"import os, signal; from anima_trainer.train.events import EventLog; e = EventLog({str(path)!r}); "
            "e.write('start', step=0); e.write('step', step=1, loss=0.5); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -9  # killed: nothing was closed or flushed at exit
    assert [(e["type"], e["step"]) for e in read_events(path)] == [("start", 0), ("step", 1)]


def test_a_resumed_run_appends_after_a_torn_line(tmp_path):
    path = tmp_path / "e.jsonl"
    with EventLog(path, run="first") as events:
        events.write("start", step=0)
    with path.open("ab") as f:
        f.write(b'{"time": "2026-01-01", "type": "st')  # the crash tore this line
    with EventLog(path, run="second") as events:
        events.write("start", step=40)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["run"] == "second"
    assert [(e["run"], e["step"]) for e in read_events(path)] == [("first", 0), ("second", 40)]


def _config(tmp_path: Path, *extra: str) -> TrainConfig:
    return parse_train_args(["--pretrained_model_name_or_path", str(tmp_path / "dit.safetensors"),
                             "--qwen3", str(tmp_path / "qwen"), "--vae", str(tmp_path / "vae.safetensors"),
                             "--output_dir", str(tmp_path / "out"), "--dataset_config", str(tmp_path / "ds.toml"),
                             *extra])


def test_resolved_config_reads_back_equal(tmp_path):
    # quotes, non-ASCII and a backslash survive the TOML round trip (a backslash is no longer valid in output_name)
    cfg = _config(tmp_path, "--output_name", 'my "lora" ü', "--wandb_run_name", 'run "one" ü\\x',
                  "--network_module", "lycoris.kohya",
                  "--network_args", "algo=lokr", "factor=8", "train_norm=True", "--optimizer_args",
                  "weight_decay=0.01", "betas=(0.9,0.99)", "--lr_scheduler", "cosine", "--lr_warmup_steps", "10%",
                  "--seed", "7", "--monitor_alert_policy", "raise", "--loss_spike_ratio", "2.5",
                  "--log_with", "wandb", "--wandb_api_key", "SECRET-KEY", "--gradient_checkpointing")
    (tmp_path / "state").mkdir()
    path = write_resolved_config(tmp_path / "state", cfg)  # a state folder: the file goes inside
    assert path == tmp_path / "state" / "train_config.toml"
    text = path.read_text(encoding="utf-8")
    assert "SECRET" not in text and "wandb_api_key" not in text
    assert 'network_module = "lokr"' in text and "algo" not in text  # resolved: lycoris + algo=lokr → lokr
    back = parse_train_args(["--config_file", str(path)])
    assert back == cfg.model_copy(update={"wandb_api_key": None})
    assert (back.network_args, back.optimizer_args) == ({"factor": "8", "train_norm": "True"},
                                                         {"weight_decay": 0.01, "betas": (0.9, 0.99)})
    assert back.nonfinite_loss_policy == "raise" and back.lr_warmup_steps == 0.1
    assert [p.name for p in path.parent.iterdir()] == ["train_config.toml"]  # atomic: no temporary left


def test_resolved_config_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(pretrained_model_name_or_path="m/dit.safetensors", qwen3="m/q", vae="m/v.safetensors",
                      output_dir="out", dataset_config="ds.toml", logging_dir="logs")
    path = write_resolved_config(tmp_path / "run.config.toml", cfg)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    back = parse_train_args(["--config_file", str(path)])  # read from another folder: same files
    assert back.pretrained_model_name_or_path == tmp_path / "m" / "dit.safetensors"
    assert back.logging_dir == tmp_path / "logs"
    assert back == cfg.model_copy(update={k: tmp_path / getattr(cfg, k) for k in (
        "pretrained_model_name_or_path", "qwen3", "vae", "output_dir", "dataset_config", "logging_dir")})


def test_resolved_config_quotes_literal_strings():
    # an optimizer_args string that looks like a number must stay a string (repr form), network_args stay bare
    cfg = TrainConfig(pretrained_model_name_or_path="/d", qwen3="/q", vae="/v", output_dir="/o", dataset_config="/ds",
                      optimizer_args={"weight_decay": 0.0, "foreach": False}, network_args={"dim": "1"})
    text = resolved_config_toml(cfg)
    assert 'optimizer_args = ["weight_decay=0.0", "foreach=False"]' in text and 'network_args = ["dim=1"]' in text


def test_config_for_log_is_json_without_secrets():
    cfg = TrainConfig(pretrained_model_name_or_path="/d", qwen3="/q", vae="/v", output_dir="/o", dataset_config="/ds",
                      wandb_api_key="SECRET")
    data = config_for_log(cfg)
    assert "wandb_api_key" not in data and data["output_dir"] == "/o" and data["nonfinite_loss_policy"] == "skip_step"
    json.dumps(data)
    assert "SECRET" not in repr(cfg)
