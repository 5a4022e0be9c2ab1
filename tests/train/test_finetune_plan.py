"""The memory levers of a fine-tune (issue 19 item 2): `vram_budget_gb` plans it over the levers that keep its
result (checkpointing, offloaded block inputs, swap of the frozen blocks, and of trained ones with
fused_backward_pass; numbers from train/finetune_memory.py
for the 2B model), names the user's optimizer levers when nothing fits, and the runs on the tiny model apply the
chosen levers; block swap of the frozen blocks trains bit-identical weights; fp8_base stores only frozen
Linears in fp8 and the saved checkpoint holds the base file's values for them."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.config import ConfigError, make_train_config
from anima_trainer.data import build_dataset, load_dataset_config
from anima_trainer.models import load_dit
from anima_trainer.models.fp8 import Fp8Linear
from anima_trainer.models.model_files import DitConfig
from anima_trainer.train.finetune_memory import trained_shapes
from anima_trainer.train import vram_plan
from anima_trainer.train.finetune_plan import finetune_candidates, finetune_patterns, finetune_peak_gib, user_levers
from anima_trainer.train.loop import run_training
from anima_trainer.train.vram_plan import plan_finetune_memory, resident_extras_gib
from tests.train.test_finetune import _config

PATHS = {"pretrained_model_name_or_path": "dit.safetensors", "qwen3": "q.safetensors", "vae": "v.safetensors",
         "output_dir": "out", "dataset_config": "dataset.toml", "mixed_precision": "bf16",
         "training_mode": "finetune", "cache_latents": True, "cache_text_encoder_outputs": True}
BLOCKS_14_18 = r"^blocks\.(1[4-8])\."
C = DitConfig()  # the 2B model: 28 blocks


def _plan(budget: float, **kw):
    cfg = make_train_config({**PATHS, **kw})
    return plan_finetune_memory(cfg, C, resolution=(1024, 1024), batch=1, budget_gib=budget,
                                extra_gib=resident_extras_gib(cfg))


def _peak(cfg_kw: dict, settings: dict, **levers) -> float:
    """The planner's prediction for one candidate, recomputed from its parts (plus the 1 GiB reserve)."""
    cfg = make_train_config({**PATHS, **cfg_kw})
    return 1.0 + finetune_peak_gib(C, settings, {**user_levers(cfg), **levers},
                                   patterns=finetune_patterns(cfg.trainable_patterns, False),
                                   resolution=(1024, 1024), batch=1, dtype="bf16")


def _chosen(plan) -> str:
    return plan.table[plan.chosen][0]


def test_full_finetune_plans_more_frugal_settings_as_the_budget_shrinks():
    assert resident_extras_gib(make_train_config(PATHS)) == 1.0  # outputs cached: the reserve only
    # mixed bf16: bf16 weights with compensated updates (train/optimizer_levers.py), 2 bytes more than plain bf16
    assert user_levers(make_train_config(PATHS))["weights"] == "bf16_compensated"
    assert _chosen(_plan(40)) == "checkpointing of 4 blocks"
    assert _chosen(_plan(32)) == "checkpointing of 20 blocks"
    assert _chosen(_plan(30)) == "checkpointing of all blocks"
    plan = _plan(24, optimizer_type="AdamW8bit")  # issue 19's target: the whole DiT at 1024² on a 24 GB card
    assert _chosen(plan) == "checkpointing of 16 blocks"
    assert plan.settings == {"gradient_checkpointing": True, "checkpoint_blocks": 16,
                             "cpu_offload_checkpointing": False, "blocks_to_swap": 0}
    assert all(g > 24 for _, g in plan.table[:-1]) and plan.estimate_gib <= 24
    assert plan.estimate_gib == pytest.approx(_peak({"optimizer_type": "AdamW8bit"}, plan.settings), abs=1e-9)
    assert 22.0 < plan.estimate_gib < 24.0  # 2.1 B × (bf16 weight + int16 remainder + grad + 8-bit state)
    assert "vram_budget_gb 24.0" in plan.describe() and "→ checkpointing of 16 blocks" in plan.describe()


def test_partial_finetune_swaps_only_its_frozen_blocks():
    kw = {"trainable_patterns": [BLOCKS_14_18]}
    assert _chosen(_plan(24, **kw)) == "no checkpointing"
    assert _chosen(_plan(16, **kw)) == "checkpointing of 16 blocks"
    assert _chosen(_plan(12, **kw)) == "checkpointing of all blocks"  # issue 19's 12 GB target
    plan = _plan(8, **kw)
    assert _chosen(plan) == "… + swap of 16 frozen blocks" and plan.settings["blocks_to_swap"] == 16
    names = [n for n, _ in plan.table]
    assert names[-5:] == ["all blocks + offloaded block inputs", "… + swap of 4 frozen blocks",
                          "… + swap of 8 frozen blocks", "… + swap of 12 frozen blocks", "… + swap of 16 frozen blocks"]
    # each swapped frozen block beyond the swapper's 3 in flight takes its bf16 weights off the device
    block = sum(math.prod(s) for n, s in trained_shapes(C).items() if n.startswith("blocks.0."))
    offloaded = dict(plan.table)["all blocks + offloaded block inputs"]
    assert plan.estimate_gib == pytest.approx(offloaded - (16 - 3) * 2 * block / 2**30, abs=1e-9)
    # the 23 frozen blocks are the most a plan swaps (blocks 14-18 stay on the device)
    assert finetune_candidates(28, 23)[-1] == ("… + swap of 23 frozen blocks", {
        "gradient_checkpointing": True, "checkpoint_blocks": None, "cpu_offload_checkpointing": True,
        "blocks_to_swap": 23})


def test_with_the_fused_pass_the_plan_swaps_trained_blocks_too():
    """fused_backward_pass lets trained blocks swap (models/offload.py copies their updates back): the candidates
    go on past the frozen blocks, and the whole DiT with AdaFactor fits 8 GiB by swapping 16 of its blocks."""
    assert [n for n, _ in finetune_candidates(28, 23, swap_trained=True)][-3:] == [
        "… + swap of 23 frozen blocks", "… + swap of 24 blocks, 1 of them trained", "… + swap of 28 blocks, 5 of them "
        "trained"]
    assert finetune_candidates(28, 23) == finetune_candidates(28, 23, swap_trained=True)[:-2]
    kw = {"optimizer_type": "AdaFactor", "fused_backward_pass": True}
    assert "swap of" not in _chosen(_plan(12, **kw))  # checkpointing is faster and enough
    plan = _plan(8, **kw)
    assert _chosen(plan) == "… + swap of 16 blocks, 16 of them trained" and plan.settings["blocks_to_swap"] == 16
    # each swapped block beyond the 3 in flight takes its bf16 weights off the device (grads and state stay)
    block = sum(math.prod(s) for n, s in trained_shapes(C).items() if n.startswith("blocks.0."))
    offloaded = dict(plan.table)["all blocks + offloaded block inputs"]
    assert plan.estimate_gib == pytest.approx(offloaded - (16 - 3) * 2 * block / 2**30, abs=1e-9)
    assert plan.estimate_gib == pytest.approx(_peak(kw, plan.settings), abs=1e-9)
    with pytest.raises(ConfigError, match=r"most frugal one \(… \+ swap of 28 blocks, 28 of them trained\)"):
        _plan(4, **kw)


def test_nothing_fitting_names_the_user_levers_that_would_with_their_predictions():
    frugal = finetune_candidates(28, 0)[-1][1]
    with pytest.raises(ConfigError) as err:
        _plan(20)
    msg = str(err.value)
    best = _peak({}, frugal)
    assert msg.startswith(f"vram_budget_gb 20.0: no memory setting fits this fine-tune; the most frugal one (all "
                          f"blocks + offloaded block inputs) is predicted at {best:.1f} GiB at 1024×1024 px, batch 1")
    for words, levers in (("optimizer_offload", {"optimizer_offload": True}),
                          ("optimizer_type = AdaFactor", {"optimizer": "adafactor"}),
                          ("optimizer_type = AdamW8bit", {"optimizer": "adamw8bit"})):
        assert f"{words}: {_peak({}, frugal, **levers):.1f} GiB predicted" in msg
    assert "fused_backward_pass +" not in msg  # one lever is enough at 20 GiB: no larger change is listed
    assert "swaps trained blocks" not in msg  # no listed lever lets the trained blocks swap
    with pytest.raises(ConfigError) as err:
        _plan(12)
    # with fused_backward_pass the most frugal setting swaps all 28 blocks, trained ones included
    swap_all = finetune_candidates(28, 0, swap_trained=True)[-1]
    assert swap_all == ("… + swap of 28 blocks, 28 of them trained", {**frugal, "blocks_to_swap": 28})
    peak = _peak({}, swap_all[1], fused_backward=True, optimizer="adafactor")
    assert peak < _peak({}, frugal, fused_backward=True, optimizer="adafactor") - 3  # 2 B bf16 weights, 3 in flight
    assert f"fused_backward_pass + optimizer_type = AdaFactor: {peak:.1f} GiB predicted" in str(err.value)
    assert "(with the most frugal memory setting, which with fused_backward_pass swaps trained blocks too)" in \
        str(err.value)
    assert peak <= 12
    with pytest.raises(ConfigError, match="fused_backward_pass \\+ optimizer_type = AdaFactor: 6.1 GiB predicted"):
        _plan(8)  # fitting only with the trained blocks swapped
    with pytest.raises(ConfigError, match="even the most frugal choice of them does not fit"):
        _plan(5)


# ------------------------------------------------------------------------------ runs on the tiny model --
def test_swapping_the_frozen_blocks_trains_bit_identical_weights(setup, tmp_path):
    """blocks_to_swap = 1 in a fine-tune of block 1 (of 2): block 0 (frozen) swaps, block 1 stays on the device;
    the trained model equals the run without swap bit for bit (fp32).  Swapping trained blocks too:
    tests/models/test_trained_block_swap.py."""
    args = ("--learning_rate", "1e-3", "--trainable_patterns", r"^blocks\.1\.", "--gradient_checkpointing")
    plain = run_training(_config(setup, tmp_path / "plain", *args, steps=3))
    swapped = run_training(_config(setup, tmp_path / "swap", *args, "--blocks_to_swap", "1", steps=3))
    assert plain.dit.runner.swapper is None and swapped.dit.runner.swapper.swapped == [0]
    assert swapped.dit.runner.swapper.updated == {} and swapped.dit.runner.swapper.stats.writebacks == 0
    a, b = plain.dit.state_dict(), swapped.dit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].cpu()) for k in a)
    base = load_dit(setup["models"]["dit"], dtype=torch.float32).state_dict()
    assert not torch.equal(base["blocks.1.cross_attn.q_proj.weight"], b["blocks.1.cross_attn.q_proj.weight"])
    assert all(torch.equal(base[k], b[k]) for k in b if k.startswith("blocks.0."))  # the swapped block: unchanged


def test_fp8_storage_of_frozen_linears_and_the_saved_checkpoint(setup, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run = run_training(_config(setup, tmp_path, "--learning_rate", "1e-3", "--trainable_patterns",
                                   r"^blocks\.1\.", "--fp8_base", steps=3))
    fp8 = [p for p, m in run.dit.named_modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(p.startswith("blocks.0.") for p in fp8)
    assert {p.dtype for p in run.network.trainable_parameters()} == {torch.float32}
    notices = [r.getMessage() for r in caplog.records if "fp8_base:" in r.getMessage()]
    assert len(notices) == 1 and f"{len(fp8)} frozen attention/MLP Linears are stored in fp8" in notices[0]
    saved = load_file(str(run.final_path))
    base = load_file(str(setup["models"]["dit"]))
    assert not any(k.endswith("weight_scale") for k in saved)
    assert all(torch.equal(saved[f"net.{p}.weight"], base[f"net.{p}.weight"]) for p in fp8)  # the base's values
    trained = run.dit.state_dict()
    assert torch.equal(saved["net.blocks.1.mlp.layer1.weight"], trained["blocks.1.mlp.layer1.weight"])


def test_the_planned_levers_are_applied_to_the_run(setup, tmp_path, caplog, monkeypatch):
    """A budget between the 'no checkpointing' and 'checkpointing of all blocks' predictions (the tiny model, the
    demo dataset's largest bucket and batch) turns checkpointing on; with one candidate that swaps (the tiny
    model's 2 blocks are too few for swap to save memory in the model: 3 blocks are in flight) the run swaps."""
    cfg = _config(setup, tmp_path, "--trainable_patterns", r"^blocks\.1\.", steps=1)
    dataset = build_dataset(load_dataset_config(cfg.dataset_config), default_batch_size=cfg.train_batch_size)
    width, height = max(((w, h) for w, h, *_ in dataset.bucket_table()), key=lambda wh: wh[0] * wh[1])
    batch = max(len(b) for b in dataset.batch_plan(0))
    config = load_dit(setup["models"]["dit"], dtype=torch.float32).config
    candidates = dict(finetune_candidates(config.num_blocks, 1))

    def peak(name: str) -> float:
        return resident_extras_gib(cfg) + finetune_peak_gib(
            config, candidates[name], user_levers(cfg), patterns=finetune_patterns(cfg.trainable_patterns, False),
            resolution=(height, width), batch=batch, dtype="no")

    low, high = peak("checkpointing of all blocks"), peak("no checkpointing")
    assert low < high
    with caplog.at_level(logging.INFO):
        run = run_training(_config(setup, tmp_path / "a", "--trainable_patterns", r"^blocks\.1\.",
                                   "--vram_budget_gb", repr((low + high) / 2), steps=1))
    assert run.dit.runner.gradient_checkpointing and run.dit.runner.swapper is None
    assert any("→ checkpointing of all blocks" in r.getMessage() for r in caplog.records)
    swap = "… + swap of 1 frozen blocks"
    monkeypatch.setattr(vram_plan, "finetune_candidates", lambda *_, **__: [(swap, candidates[swap])])
    run = run_training(_config(setup, tmp_path / "b", "--trainable_patterns", r"^blocks\.1\.", "--vram_budget_gb",
                               "100", steps=1))
    runner = run.dit.runner
    assert runner.gradient_checkpointing and runner.offloader is not None and runner.swapper.swapped == [0]
