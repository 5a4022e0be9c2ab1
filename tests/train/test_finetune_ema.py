"""The EMA of a fine-tune's weights (training_mode = "finetune" with ema_decay, train/ema.py): it follows diffusers'
recurrence over exactly the trained DiT parameters, its `-ema` file is a whole DiT checkpoint that load_dit reads
back as the shadow, the host EMA (`ema_device = "cpu"`) computes the same numbers in host memory, the memory
model counts it, and an interrupted fine-tune with an EMA resumes bit-identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.config import ConfigError
from anima_trainer.models import load_dit
from anima_trainer.models.model_files import DitConfig
from anima_trainer.train.ema import HOST_SHARE, NetworkEMA, ema_on_host
from anima_trainer.train.finetune_memory import estimate_finetune_memory, trained_bytes
from anima_trainer.train.loop import run_training
from anima_trainer.train.memory_estimate import gib
from tests.support.killed_run import killed_after
from tests.train.conftest import hand_ema
from tests.train.test_finetune import _config


def _equal_files(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------- unit --

def _drift(params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def test_host_ema_equals_the_device_ema_bit_for_bit_and_lives_in_host_memory(tmp_path):
    torch.manual_seed(0)
    weights = [torch.randn(3, 4), torch.randn(5).bfloat16()]
    on_device = [torch.nn.Parameter(w.clone()) for w in weights]
    on_host = [torch.nn.Parameter(w.clone()) for w in weights]
    device, host = NetworkEMA(on_device, decay=0.7), NetworkEMA(on_host, decay=0.7, host=True)
    assert host.host and not device.host
    for step in range(4):
        _drift(on_device, step)
        _drift(on_host, step)
        device.update()
        host.update()
    assert host.updates == device.updates == 4
    assert all(torch.equal(a, b) for a, b in zip(host.shadow, device.shadow, strict=True))
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 and s.is_pinned() == torch.cuda.is_available()
               for s in host.shadow)
    # the swap: the EMA weights in, the training weights back bit for bit (kept in the host staging buffer)
    before = [p.detach().clone() for p in on_host]
    with host.swapped():
        assert torch.equal(on_host[0], host.shadow[0]) and torch.equal(on_host[1], host.shadow[1].bfloat16())
    assert all(torch.equal(p, b) and p.dtype == b.dtype for p, b in zip(on_host, before, strict=True))
    # a state written by either loads into either (placed where the loading EMA keeps its shadow)
    device.write_state(tmp_path)
    again = NetworkEMA(on_host, decay=0.7, host=True)
    again.load_state(tmp_path)
    assert again.updates == 4 and all(torch.equal(a, b) for a, b in zip(again.shadow, device.shadow, strict=True))
    assert all(s.is_pinned() == torch.cuda.is_available() for s in again.shadow)


def test_where_the_ema_lives():
    cpu = torch.device("cpu")
    assert ema_on_host("cpu", finetunes=False, shadow_bytes=1, device=cpu)  # asked for: also for LoRA
    assert not ema_on_host("device", finetunes=True, shadow_bytes=10**12, device=cpu, budget_bytes=1)
    assert not ema_on_host("auto", finetunes=False, shadow_bytes=10**12, device=cpu, budget_bytes=1)  # LoRA: as before
    budget = 24 * 2**30
    shadow_2b = 4 * 2_091_068_928  # the full 2B DiT: 7.8 GiB > a quarter of 24 GiB
    assert ema_on_host("auto", finetunes=True, shadow_bytes=shadow_2b, device=cpu, budget_bytes=budget)
    assert not ema_on_host("auto", finetunes=True, shadow_bytes=int(HOST_SHARE * budget), device=cpu,
                           budget_bytes=budget)
    assert not ema_on_host("auto", finetunes=True, shadow_bytes=shadow_2b, device=cpu)  # no card: weights on host


def test_options_are_checked(setup, tmp_path):
    cfg = _config(setup, tmp_path, "--ema_decay", "0.9", steps=2)  # no longer refused in a fine-tune
    assert cfg.finetunes and cfg.ema_decay == 0.9 and cfg.ema_device == "auto"
    with pytest.raises(ConfigError, match='ema_device = "cpu": places the EMA of the weights, but ema_decay is unset'):
        _config(setup, tmp_path, "--ema_device", "cpu", steps=2)
    with pytest.raises(ConfigError, match="ema_device"):
        _config(setup, tmp_path, "--ema_decay", "0.9", "--ema_device", "gpu", steps=2)


def test_the_memory_model_counts_the_shadow_where_it_lives():
    shapes = [(64, 32), (32,)]
    n = 64 * 32 + 32
    none, device, host = (trained_bytes(shapes, ema=e) for e in ("none", "device", "host"))
    assert (none.ema, device.ema, host.ema) == (0, 4 * n, 0)
    assert device.total == none.total + 4 * n and host.total == none.total and host.host == none.host + 4 * n
    with pytest.raises(ValueError, match="accepted are none, device, host"):
        trained_bytes(shapes, ema="gpu")
    dit = DitConfig()
    plain = estimate_finetune_memory(dit, patterns=[r"^blocks\.1[4-8]\."])
    with_ema = estimate_finetune_memory(dit, patterns=[r"^blocks\.1[4-8]\."], ema="device")
    assert with_ema["ema_gib"] == pytest.approx(gib(4 * plain["trained_params"])) and plain["ema_gib"] == 0
    assert with_ema["total_gib"] == pytest.approx(plain["total_gib"] + with_ema["ema_gib"])
    on_host = estimate_finetune_memory(dit, patterns=[r"^blocks\.1[4-8]\."], ema="host")
    assert on_host["total_gib"] == plain["total_gib"] and on_host["host_gib"] == with_ema["ema_gib"]


# ------------------------------------------------------------------------------------------ training --

def test_finetune_ema_follows_the_recurrence_and_its_checkpoint_reloads_as_the_shadow(setup, tmp_path, monkeypatch,
                                                                                     ema_inputs):
    """Host EMA (ema_device = "cpu"), a partial fine-tune saved in bf16, previews from the EMA, retention."""
    trajectory = ema_inputs  # the weights each update averages in
    seen: list[list[torch.Tensor]] = []
    real_render = loop.render_previews

    def render(dit, *args, **kwargs):  # the weights the preview is drawn with
        seen.append([p.detach().clone() for p in run_params])
        return real_render(dit, *args, **kwargs)

    run_params: list[torch.nn.Parameter] = []
    real_build = loop.build_ema

    def build(cfg, network):
        run_params.extend(network.trainable_parameters())
        return real_build(cfg, network)

    monkeypatch.setattr(loop, "render_previews", render)
    monkeypatch.setattr(loop, "build_ema", build)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 7\n")
    run = run_training(_config(setup, tmp_path, "--learning_rate", "1e-3", "--ema_decay", "0.3", "--ema_device",
                               "cpu", "--trainable_patterns", r"^blocks\.1\.", r"\.cross_attn\.",
                               "--save_precision", "bf16", "--save_every_n_steps", "1", "--save_last_n_steps", "1",
                               "--sample_use_ema", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
                               steps=3))
    ema = run.ema
    assert ema.host and all(s.device.type == "cpu" for s in ema.shadow)
    # exactly the trained DiT parameters, one update per optimizer step
    selected = dict(run.network.selected)
    assert [id(p) for p in ema.params] == [id(p) for p in selected.values()] == [id(p) for p in run_params]
    assert ema.updates == 3 and len(trajectory) == 3
    # diffusers' rule by hand: d_1 = 0 (a copy), then d = min(0.3, n / (9 + n))
    expected = hand_ema(trajectory, 0.3)
    for got, want in zip(ema.shadow, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(s, p.float()) for s, p in zip(ema.shadow, selected.values(), strict=True))
    # the -ema checkpoint: the base file's layout, the EMA metadata, the shadow rounded to bf16, the rest frozen
    out = tmp_path / "output"
    ema_file = out / "demo_lora-ema.safetensors"
    with safe_open(str(setup["models"]["dit"]), "pt") as base, safe_open(str(ema_file), "pt") as f:
        assert set(f.keys()) == set(base.keys())
        meta = f.metadata()
    assert (meta["ss_ema_decay"], meta["ss_ema_warmup"], meta["ss_ema_updates"]) == ("0.3", "True", "3")
    assert meta["anima_trainer_training_mode"] == "finetune" and meta["format"] == "pt"
    reloaded = load_dit(ema_file, dtype=torch.float32).state_dict()
    for (name, _), shadow in zip(selected.items(), ema.shadow, strict=True):
        assert torch.equal(reloaded[name], shadow.bfloat16().float()), name
    trained = run.dit.state_dict()
    assert all(torch.equal(reloaded[k], v.bfloat16().float()) for k, v in trained.items() if k not in selected)
    raw = load_dit(run.final_path, dtype=torch.float32).state_dict()  # the raw file: the training weights
    assert all(torch.equal(raw[k], v.bfloat16().float()) for k, v in trained.items())
    # the preview after the last step was drawn with the EMA weights, which were swapped back out
    assert len(seen) == 1 and all(torch.equal(a.float(), s) for a, s in zip(seen[0], ema.shadow, strict=True))
    # retention: the last step file (step 2; step 3 is the final save), each with its EMA file
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "demo_lora-ema.safetensors", "demo_lora-step00000002-ema.safetensors", "demo_lora-step00000002.safetensors",
        "demo_lora.safetensors"]


def test_interrupted_finetune_with_ema_resumes_bit_identically_with_default_options(setup, tmp_path, monkeypatch):
    extra = ("--save_every_n_steps", "2", "--save_state", "--learning_rate", "1e-3", "--lr_scheduler", "linear",
             "--ema_decay", "0.8")
    reference = run_training(_config(setup, tmp_path / "ref", *extra, steps=7, defaults=True))
    assert not reference.ema.host  # "auto" for a fine-tune on the CPU: beside the weights
    with killed_after(monkeypatch, 5):  # killed during micro-batch 6, after the step-4 state
        run_training(_config(setup, tmp_path / "cut", *extra, steps=7, defaults=True))
    out = tmp_path / "cut" / "output"
    assert {"ema.json", "ema.safetensors"} <= {p.name for p in (out / "demo_lora-step00000004-state").iterdir()}
    # resumed with the EMA on the host: the placement is not part of the arithmetic
    resumed = run_training(_config(setup, tmp_path / "cut", "--resume", "latest", *extra, "--ema_device", "cpu",
                                   steps=7, defaults=True))
    assert resumed.steps == 7 and resumed.ema.host and resumed.ema.updates == reference.ema.updates == 7
    for name in ("demo_lora.safetensors", "demo_lora-ema.safetensors", "demo_lora-step00000006-ema.safetensors",
                 "demo_lora-step00000006.safetensors"):
        assert _equal_files(tmp_path / "ref" / "output" / name, out / name), name
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow, reference.ema.shadow, strict=True))
