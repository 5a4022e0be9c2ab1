"""EMA of the network weights (ema_decay, train/ema.py): the average itself, its files, retention, states and an
exact resume, previews from it, and that nothing changes with it off."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.train import training_state as states
from anima_trainer.train.ema import NetworkEMA
from anima_trainer.train.loop import run_training
from anima_trainer.train.save_plan import SavePlan, ema_file_path
from tests.support.killed_run import killed_after
from tests.train.conftest import hand_ema


def _config(setup: dict, out: Path, *extra: str, steps: int = 4):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1, num_repeats=2,
                            extra="flip_aug = true\nshuffle_caption = true\n")
    return parse_train_args(["--config_file", str(toml), "--learning_rate", "1e-2", "--network_dropout", "0.1",
                             *extra])


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _equal_files(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------- unit --

def test_swap_puts_the_training_weights_back_bit_for_bit_and_the_state_round_trips(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5).bfloat16())]
    ema = NetworkEMA(params, decay=0.5, warmup=False)
    assert [s.dtype for s in ema.shadow] == [torch.float32, torch.float32]  # fp32 also for bf16 weights
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape).to(p.dtype))
        ema.update()
    assert ema.updates == 3 and [ema.decay_at(n) for n in (1, 2, 3)] == [0.0, 0.5, 0.5]
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="inside"), ema.swapped():
        assert torch.equal(params[0], ema.shadow[0]) and torch.equal(params[1], ema.shadow[1].bfloat16())
        assert not torch.equal(params[0], before[0])
        raise RuntimeError("inside")
    assert all(torch.equal(p, b) and p.dtype == b.dtype for p, b in zip(params, before, strict=True))
    # the state: written like the optimizer's (JSON + safetensors), read back exactly
    ema.write_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.json", "ema.safetensors"]
    again = NetworkEMA(params, decay=0.5, warmup=False)
    again.load_state(tmp_path)
    assert again.updates == 3 and all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow, strict=True))
    other = NetworkEMA([torch.nn.Parameter(torch.zeros(3, 5)), params[1]], decay=0.5)
    with pytest.raises(states.StateError, match=r"ema\.safetensors: holds 2 tensors that do not match"):
        other.load_state(tmp_path)


def test_save_plan_keeps_ema_files_with_their_network_file(tmp_path):
    plan = SavePlan(tmp_path, "x", every_n_steps=1, keep_last_n_steps=2, ema=True)
    assert ema_file_path(plan.step_path(3)).name == "x-step00000003-ema.safetensors"
    for step in (1, 2, 3):
        files = plan.with_ema(plan.step_path(step))
        for p in files:
            p.write_bytes(b"x")
        plan.record_step(step, *files)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x-step00000002-ema.safetensors", "x-step00000002.safetensors",
        "x-step00000003-ema.safetensors", "x-step00000003.safetensors"]
    # a new run would write over an EMA file of the same name (even without its network file)
    (tmp_path / "x-step00000002.safetensors").unlink()
    assert [p.name for p in plan.collisions(5, 1)] == ["x-step00000002-ema.safetensors",
                                                       "x-step00000003-ema.safetensors", "x-step00000003.safetensors"]
    assert SavePlan(tmp_path, "x", every_n_steps=1).collisions(5, 1) == [tmp_path / "x-step00000003.safetensors"]
    ema_file_path(plan.final_path).write_bytes(b"x")
    assert plan.collisions(5, 1)[0].name == "x-ema.safetensors"
    assert SavePlan(tmp_path, "x", every_n_steps=1).collisions(5, 1) == [
        tmp_path / "x-step00000003.safetensors"]  # without the EMA, EMA files are not this run's
    # a resumed run: an EMA file without its network file is a save cut short (the EMA file is written first)
    plan.check_start()


def test_options_are_checked(setup, tmp_path):
    with pytest.raises(ConfigError, match="sample_use_ema: previews from the EMA weights need ema_decay"):
        _config(setup, tmp_path, "--sample_use_ema")
    with pytest.raises(ConfigError, match="ema_decay: must be < 1"):
        _config(setup, tmp_path, "--ema_decay", "1")
    cfg = _config(setup, tmp_path)
    assert cfg.ema_decay is None and cfg.ema_warmup is True and cfg.sample_use_ema is False


# ------------------------------------------------------------------------------------------ training --

def test_ema_follows_the_weights_is_what_its_file_holds_and_is_pruned_with_it(setup, tmp_path, ema_inputs):
    trajectory = ema_inputs  # the weights each update averages in
    run = run_training(_config(setup, tmp_path / "e", "--ema_decay", "0.2", "--save_every_n_steps", "1",
                               "--save_last_n_steps", "2", "--gradient_accumulation_steps", "2", steps=4))
    # one update per optimizer step, not per micro-batch
    assert run.steps == 4 and run.ema.updates == 4 and len(trajectory) == 4
    # the EMA computed independently: d_1 = 0, then min(0.2, n / (9 + n)) (warm-up: 2/11, then 0.2)
    expected = hand_ema(trajectory, 0.2)
    for got, want, raw, last in zip(run.ema.shadow, expected, run.network.trainable_parameters(), trajectory[-1],
                                    strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert torch.equal(raw, last)  # the last update saw the final weights
    assert any(not torch.equal(s, p) for s, p in zip(run.ema.shadow, run.network.trainable_parameters(),
                                                    strict=True))  # the EMA is not the raw weights
    # the EMA file holds exactly the EMA weights, in the network file's layout; the raw file the raw ones
    out = tmp_path / "e" / "output"
    with run.ema.swapped():
        ema_tensors = {k: v.clone() for k, v in run.network.state_tensors().items()}  # (fp32 on CPU: views)
    saved_ema, saved_raw = load_file(out / "demo_lora-ema.safetensors"), load_file(run.final_path)
    assert saved_ema.keys() == ema_tensors.keys() == saved_raw.keys()
    assert all(torch.equal(saved_ema[k], ema_tensors[k]) for k in ema_tensors)
    assert all(torch.equal(saved_raw[k], v) for k, v in run.network.state_tensors().items())
    assert any(not torch.equal(saved_ema[k], saved_raw[k]) for k in saved_raw if not k.endswith(".alpha"))
    meta, raw_meta = _metadata(out / "demo_lora-ema.safetensors"), _metadata(run.final_path)
    assert (meta["ss_ema_decay"], meta["ss_ema_warmup"], meta["ss_ema_updates"]) == ("0.2", "True", "4")
    assert not any(k.startswith("ss_ema") for k in raw_meta) and meta["ss_steps"] == raw_meta["ss_steps"] == "4"
    from anima_trainer.tools.inspect import inspect_network  # `inspect` says which file is the EMA

    shown = inspect_network(out / "demo_lora-ema.safetensors")["metadata"]
    assert (shown["ss_ema_decay"], shown["ss_ema_updates"]) == ("0.2", "4")
    assert "ss_ema_decay" not in inspect_network(run.final_path)["metadata"]
    # retention: step files of the last 2 steps (step 4 is the final save), each with its EMA file
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "demo_lora-ema.safetensors", "demo_lora-step00000002-ema.safetensors", "demo_lora-step00000002.safetensors",
        "demo_lora-step00000003-ema.safetensors", "demo_lora-step00000003.safetensors", "demo_lora.safetensors"]
    saves = [json.loads(line) for line in (out / "demo_lora.events.jsonl").read_text().splitlines()]
    saves = [(e["step"], Path(e["path"]).name, e.get("ema", False)) for e in saves if e["type"] == "save"]
    assert saves[:2] == [(1, "demo_lora-step00000001-ema.safetensors", True), (1, "demo_lora-step00000001.safetensors",
                                                                               False)]


def test_previews_from_the_ema_leave_training_as_it_was_and_ema_off_writes_nothing_more(setup, tmp_path,
                                                                                         monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 7\n")
    plain = run_training(_config(setup, tmp_path / "p", "--save_every_n_steps", "2", "--save_state"))
    seen: list[list[torch.Tensor]] = []
    real = loop.render_previews

    def render(dit, *args, **kwargs):  # the weights the preview is drawn with
        seen.append([p.detach().clone() for p in network[0].trainable_parameters()])
        return real(dit, *args, **kwargs)

    network: list = []
    real_build = loop.build_ema
    monkeypatch.setattr(loop, "build_ema", lambda cfg, net: network.append(net) or real_build(cfg, net))
    monkeypatch.setattr(loop, "render_previews", render)
    ema = run_training(_config(setup, tmp_path / "q", "--save_every_n_steps", "2", "--save_state", "--ema_decay",
                               "0.5", "--sample_use_ema", "--sample_prompts", str(prompts), "--sample_every_n_steps",
                               "2"))
    # the EMA, its saves and its previews change nothing of the training: the raw files are bit-identical
    for name in ("demo_lora.safetensors", "demo_lora-step00000002.safetensors"):
        assert _equal_files(tmp_path / "p" / "output" / name, tmp_path / "q" / "output" / name)
    # the last preview (after the last step) was drawn with the EMA weights, and they were swapped back out
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen[-1], ema.ema.shadow, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[-1], ema.network.trainable_parameters(), strict=True))
    # with the EMA off: no EMA file, and states hold exactly what they held before (no ema.*)
    off, on = tmp_path / "p" / "output", tmp_path / "q" / "output"
    assert not list(off.glob("*-ema.safetensors")) and len(list(on.glob("*-ema.safetensors"))) == 2
    plain_state = {p.name for p in (off / "demo_lora-state").iterdir()}
    assert plain_state == {"network.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                           "scaler.json", "rng.json", "rng.safetensors", "train_state.json", "resume_snapshot.json",
                           "config.json", "train_config.toml"}
    assert {p.name for p in (on / "demo_lora-state").iterdir()} == plain_state | {"ema.json", "ema.safetensors"}
    assert set(json.loads((on / "demo_lora-state" / "train_state.json").read_text())["files"]) >= {
        "ema.json", "ema.safetensors"}  # checksummed like the rest
    assert plain.steps == 4


def test_resume_with_ema_is_bit_identical(setup, tmp_path, monkeypatch):
    args = ("--ema_decay", "0.8", "--save_every_n_steps", "2", "--save_state", "--network_args", "rank_dropout=0.2")
    reference = run_training(_config(setup, tmp_path / "ref", *args, steps=7))
    with killed_after(monkeypatch, 5):
        run_training(_config(setup, tmp_path / "cut", *args, steps=7))
    out = tmp_path / "cut" / "output"
    assert states.read_progress(states.find_latest_state(out, "demo_lora")).step == 4
    resumed = run_training(_config(setup, tmp_path / "cut", *args, "--resume", "latest", steps=7))
    assert resumed.steps == 7 and resumed.ema.updates == reference.ema.updates == 7
    for name in ("demo_lora.safetensors", "demo_lora-ema.safetensors", "demo_lora-step00000006-ema.safetensors"):
        assert _equal_files(tmp_path / "ref" / "output" / name, out / name), name
    assert _metadata(out / "demo_lora-ema.safetensors")["ss_ema_updates"] == "7"
    # killed between the final EMA file and the final network file: the resume writes both from the final state
    (out / "demo_lora.safetensors").unlink()
    again = run_training(_config(setup, tmp_path / "cut", *args, "--resume", "latest", steps=7))
    assert again.steps == 7 and _equal_files(tmp_path / "ref" / "output" / "demo_lora.safetensors", out /
                                              "demo_lora.safetensors")
    assert _equal_files(tmp_path / "ref" / "output" / "demo_lora-ema.safetensors", out / "demo_lora-ema.safetensors")


def _as_written_before_ema(folder: Path) -> None:
    """A state as a version without the EMA settings wrote it: config.json lacks them (manifest updated)."""
    config = json.loads((folder / "config.json").read_text())
    for key in ("ema_decay", "ema_warmup", "sample_use_ema"):
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    record = json.loads((folder / states.TRAIN_STATE).read_text())
    record["files"]["config.json"] = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    (folder / states.TRAIN_STATE).write_text(json.dumps(record))


def test_resume_without_ema_in_the_state_and_with_a_changed_decay(setup, tmp_path, caplog):
    run_training(_config(setup, tmp_path / "s", "--save_state", steps=2))
    out = tmp_path / "s" / "output"
    state = str(out / "demo_lora-state")
    _as_written_before_ema(out / "demo_lora-state")
    with caplog.at_level(logging.INFO):
        run = run_training(_config(setup, tmp_path / "s", "--save_state", "--ema_decay", "0.9", "--resume", state,
                                   steps=4))
    assert "has no EMA of the weights (saved without ema_decay): the EMA starts from the state's weights at step 2" \
        in caplog.text
    assert "ema_decay: null → 0.9" in caplog.text  # a changed setting, logged as applied
    assert "ema_warmup" not in caplog.text and "sample_use_ema" not in caplog.text  # new, at their default
    assert run.ema.updates == 2 and _metadata(out / "demo_lora-ema.safetensors")["ss_ema_updates"] == "2"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run = run_training(_config(setup, tmp_path / "s", "--save_state", "--ema_decay", "0.95", "--resume", state,
                                   "--overwrite", steps=6))
    assert "ema_decay: 0.9 → 0.95" in caplog.text and "has no EMA" not in caplog.text
    assert run.ema.updates == 4 and run.ema.decay_at(4) == min(0.95, 4 / 13)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run = run_training(_config(setup, tmp_path / "s", "--save_state", "--resume", state, "--overwrite", steps=8))
    assert "holds an EMA of the weights; ema_decay is unset, so it is not used" in caplog.text and run.ema is None
    assert not (out / "demo_lora-state" / "ema.json").exists()
