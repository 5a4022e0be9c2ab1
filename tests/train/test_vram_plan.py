"""vram_budget_gb: the fastest memory settings that fit, from the calibrated estimate; printed; errors when
nothing fits."""

from __future__ import annotations

import logging

import pytest

from anima_trainer.config import ConfigError, make_train_config
from anima_trainer.models.model_files import DitConfig
from anima_trainer.train.vram_plan import candidates, plan_memory, resolve_budget

REQUIRED = {"pretrained_model_name_or_path": "dit.safetensors", "qwen3": "q.safetensors", "vae": "v.safetensors",
            "output_dir": "out", "dataset_config": "dataset.toml", "mixed_precision": "bf16", "network_dim": 32,
            "network_train_unet_only": True}


def _plan(budget: float, **kw):
    cfg = make_train_config({**REQUIRED, **kw})
    return plan_memory(cfg, DitConfig(), resolution=(1024, 1024), batch=1, budget_gib=budget, llm_adapter_trained=False)


def test_plans_get_more_frugal_as_the_budget_shrinks():
    roomy = _plan(40)
    assert roomy.settings["gradient_checkpointing"] is False and roomy.settings["cache_llm_adapter_outputs"]
    assert roomy.table[0][0] == "no checkpointing" and len(roomy.table) == 1
    consumer = _plan(16)  # a 16 GB card: partial checkpointing, no swap
    assert consumer.settings["gradient_checkpointing"] and consumer.settings["checkpoint_blocks"] is not None
    assert consumer.settings["blocks_to_swap"] == 0 and consumer.estimate_gib <= 16
    small = _plan(8)
    assert small.settings["checkpoint_blocks"] is None and small.settings["blocks_to_swap"] == 0
    tiny = _plan(5.0)  # needs block swap (2.8 GiB of it are the reserve, Qwen3 and the VAE)
    assert tiny.settings["blocks_to_swap"] > 0 and tiny.estimate_gib <= 5.0
    assert all(g > 5.0 for _, g in tiny.table[:-1])  # every faster candidate was tried and did not fit
    assert "→ " in tiny.describe() and "vram_budget_gb 5.0" in tiny.describe()


def test_cached_encoders_free_their_memory_and_nothing_fitting_is_an_error():
    uncached, cached = _plan(8), _plan(8, cache_latents=True, cache_text_encoder_outputs=True)
    assert cached.table[0][1] == pytest.approx(uncached.table[0][1] - 1.8, abs=1e-6)  # same candidate: −TE −VAE
    assert len(cached.table) <= len(uncached.table)  # so a faster setting fits
    with pytest.raises(ConfigError, match=r"vram_budget_gb 1.0: no memory setting fits; the most frugal one needs"):
        _plan(1.0)


def test_a_trained_text_encoder_counts_its_activations_and_keeps_the_llm_adapter_uncached():
    """Issue 15: kohya's default trains a Qwen3 LoRA: ~1 MiB per token × 512 tokens per image without
    checkpointing, 1/16 with it; the adapter's output then changes every step, so it is never cached."""
    from anima_trainer.train.vram_plan import llm_adapter_trained

    dit_only, both = _plan(40), _plan(40, network_train_unet_only=False)
    assert both.table[0][0] == "no checkpointing" and both.table[0][1] == pytest.approx(dit_only.table[0][1] + 0.5)
    ckpt = dict(_plan(8, network_train_unet_only=False).table)["checkpointing of all blocks"]
    assert ckpt == pytest.approx(dict(_plan(8).table)["checkpointing of all blocks"] + 0.5 / 16)
    assert llm_adapter_trained(make_train_config({**REQUIRED, "network_train_unet_only": False}))
    assert not llm_adapter_trained(make_train_config(REQUIRED))


def test_candidates_order_and_auto_budget_needs_cuda():
    names = [n for n, _ in candidates(28, True)]
    assert names[0] == "no checkpointing" and names[-1] == "… + block swap of 26 blocks"
    assert all(s["cache_llm_adapter_outputs"] for _, s in candidates(28, True))
    assert not any("cache_llm_adapter_outputs" in s for _, s in candidates(28, False))
    with pytest.raises(ConfigError, match="vram_budget_gb = auto needs a CUDA device"):
        resolve_budget("auto", "cpu")
    assert resolve_budget(12.5, "cpu") == 12.5


def test_a_run_with_a_budget_prints_its_plan_and_trains(setup, tmp_path, caplog):
    from anima_trainer.config import parse_train_args
    from anima_trainer.demo import write_demo_configs
    from anima_trainer.train.loop import run_training

    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=1)
    with caplog.at_level(logging.INFO):
        run = run_training(parse_train_args(["--config_file", str(toml), "--vram_budget_gb", "3.5"]))
    assert run.steps == 2 and "vram_budget_gb 3.5: estimated peak" in caplog.text


# ------------------------------------------------------------------------- expected step time (issue 18) --
CACHED = {"cache_latents": True, "cache_text_encoder_outputs": True}


@pytest.mark.parametrize("compiled", [True, False])
def test_expected_step_times_grow_with_frugality_and_match_the_h200_anchors(compiled):
    """Every candidate down to the most frugal (a 3.3 GiB budget tries them all): times never fall along the
    order; the anchors are the H200 measurements the model is calibrated on."""
    plan = plan_memory(make_train_config({**REQUIRED, **CACHED, "compile_blocks": compiled}),
                       DitConfig(has_llm_adapter=False), resolution=(1024, 1024), batch=1, budget_gib=3.3,
                       llm_adapter_trained=False)
    assert len(plan.step_ms) == len(plan.table) == len(candidates(28, False)) - 1  # swap of 26 not needed
    assert all(a <= b for a, b in zip(plan.step_ms, plan.step_ms[1:])), plan.step_ms
    times = dict(zip((n for n, _ in plan.table), plan.step_ms))
    assert times["no checkpointing"] == pytest.approx(115.9 if compiled else 184.4)
    assert times["checkpointing of all blocks"] == pytest.approx(164.8 if compiled else 318.6)
    assert times["all blocks + offloaded block inputs"] == pytest.approx((164.8 if compiled else 318.6) + 193.0)
    assert times["checkpointing of 4 blocks"] < times["checkpointing of 24 blocks"]
    assert plan.expected_ms == plan.step_ms[-1] and plan.compiled == [compiled] * len(plan.table)


def test_expected_step_time_scales_with_the_step_flops():
    from anima_trainer.train.step_time import expected_step_ms, lora_step_flops

    c, block = DitConfig(has_llm_adapter=False), 140e6
    one = expected_step_ms(c, tokens=4096, batch=1, compiled=True, block_bytes=block)
    four = expected_step_ms(c, tokens=4096, batch=4, compiled=True, block_bytes=block)
    assert four == pytest.approx(4 * one)
    portrait = expected_step_ms(c, tokens=(832 // 16) * (1216 // 16), batch=1, compiled=True, block_bytes=block)
    assert portrait < one and portrait == pytest.approx(one * lora_step_flops(c, 3952, 1) / lora_step_flops(c, 4096, 1))
    # block swap costs nothing while a block's copies hide behind its compute, and grows once they do not
    eager_ckpt = {"compiled": False, "gradient_checkpointing": True, "block_bytes": block}
    assert expected_step_ms(c, tokens=4096, batch=1, blocks_to_swap=26, **eager_ckpt) == pytest.approx(
        expected_step_ms(c, tokens=4096, batch=1, **eager_ckpt))
    small = expected_step_ms(c, tokens=1024, batch=1, compiled=True, block_bytes=block)
    assert expected_step_ms(c, tokens=1024, batch=1, compiled=True, block_bytes=block, blocks_to_swap=8) > small


def test_the_printed_plan_gives_the_expected_time_as_an_h200_estimate():
    plan = _plan(8, **CACHED)
    first, *rows = plan.describe().splitlines()
    assert f"expected step time ~{plan.expected_ms:.0f} ms (an estimate for an H200, eager blocks" in first
    assert "other cards differ" in first
    assert len(rows) == len(plan.table) and all(r.rstrip().endswith("ms/step (eager)") for r in rows)
    assert rows[-1].startswith("  → ") and f"~{plan.step_ms[-1]:5.0f} ms/step" in rows[-1]
    compiled = _plan(8, **CACHED, compile_blocks=True)
    assert all(compiled.compiled) and "compiled blocks" in compiled.describe()
    assert compiled.expected_ms < plan.expected_ms


def test_auto_budget_plans_for_free_memory_when_another_process_holds_part_of_the_card(monkeypatch, caplog):
    import torch

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(15.5 * gib), 16 * gib))  # a free card
    assert resolve_budget("auto", torch.device("cuda", 0)) == pytest.approx(16 * 0.92)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(9.5 * gib), 16 * gib))  # a desktop
    with caplog.at_level(logging.INFO):
        assert resolve_budget("auto", torch.device("cuda", 0)) == pytest.approx(9.5)
    assert "9.5 GiB free of the card's 16.0 GiB" in caplog.text
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)  # our own allocator's reserve
    assert resolve_budget("auto", torch.device("cuda", 0)) == pytest.approx(11.5)


def test_the_plan_resolves_compile_blocks_per_candidate(monkeypatch):
    """The step times follow what prepare_dit will run (train/model_setup.py compile_choice, the one resolver):
    "auto" on the CPU is eager; on an sm90 card with triton it compiles, except the block-swap candidates, which
    "auto" runs eager (not measured compiled)."""
    import torch

    from anima_trainer.models import compile as compile_module

    auto = {**REQUIRED, **CACHED, "compile_blocks": "auto"}
    cfg = make_train_config(auto)
    args = dict(resolution=(1024, 1024), batch=1, budget_gib=3.3, llm_adapter_trained=False)  # tries them all
    cpu = plan_memory(cfg, DitConfig(has_llm_adapter=False), **args)
    assert not any(cpu.compiled)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(compile_module, "triton_available", lambda: True)
    gpu = plan_memory(cfg, DitConfig(has_llm_adapter=False), **args, device=torch.device("cuda", 0))
    swap = ["block swap" in name for name, _ in gpu.table]
    assert any(swap) and gpu.compiled == [not s for s in swap]
    assert "(eager)" in gpu.describe().splitlines()[-1] and "(compiled)" in gpu.describe().splitlines()[1]
