"""kohya's network options in a real (tiny) run (issue 14): base_weights merged before training, component
learning rates in the optimizer, full_bf16 weights and Adam state, scale_weight_norms applied and logged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.cache import model_fingerprint
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_configs
from anima_trainer.models import load_dit
from anima_trainer.train.resume import CRITICAL, snapshot_fields
from anima_trainer.train.events import events_path
from anima_trainer.train.loop import run_training
from anima_trainer.train.training_state import check_snapshot
from tests.support.networks import random_network


def test_kohya_network_options_in_a_run(setup, tmp_path):
    dit_path = setup["models"]["dit"]
    base = tmp_path / "base_lora.safetensors"
    random_network(load_dit(dit_path, dtype=torch.float32), seed=4, dim=2, alpha=2.0).save(base)
    toml = write_demo_configs(tmp_path / "run", setup["models"], setup["images"], 2, seed=5)
    max_norm = 0.01
    cfg = parse_train_args(["--config_file", str(toml), "--mixed_precision", "bf16", "--full_bf16",
                            "--scale_weight_norms", str(max_norm), "--base_weights", str(base),
                            "--base_weights_multiplier", "0.5", "--self_attn_lr", "4e-3", "--mlp_lr", "0"])
    run = run_training(cfg)
    assert run.steps == 2
    # base_weights: W + 0.5·(alpha/dim)·up@down, computed in fp32 and stored in the DiT's bf16
    key = "blocks.0.cross_attn.output_proj"
    sd = load_file(base)
    up, down = sd[f"diffusion_model.{key}.lora_up.weight"], sd[f"diffusion_model.{key}.lora_down.weight"]
    w0 = load_dit(dit_path, dtype=torch.bfloat16).state_dict()[key + ".weight"]
    expected = (w0.float() + 0.5 * (2.0 / 2) * (up @ down)).to(torch.bfloat16)
    assert torch.equal(run.dit.state_dict()[key + ".weight"], expected)
    # component lrs: self_attn in its own group at 4e-3, mlp frozen (its zero-initialised up factor stays 0)
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert set(groups) == {"base", "self_attn"} and groups["self_attn"]["initial_lr"] == 4e-3
    for path, m in run.network.modules_by_name.items():
        if ".mlp." in path:
            assert not m.lora_up.weight.requires_grad and not m.lora_up.weight.any()
    # full_bf16: the trained tensors and Adam's state are bf16
    assert {p.dtype for p in run.network.trainable_parameters()} == {torch.bfloat16}
    states = [s for s in run.optimizer.state.values() if s]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.bfloat16}
    # scale_weight_norms: no module above the max after training, kohya's values logged
    assert max(m.delta_norm().item() for m in run.network.lora_modules) <= max_norm * (1 + 1e-2)
    steps = [json.loads(line) for line in events_path(cfg.output_dir, cfg.output_name).read_text().splitlines()]
    last = [e for e in steps if e.get("type") == "step"][-1]
    assert last["max_norm/keys_scaled"] >= 1
    assert last["max_norm/max_key_norm"] == pytest.approx(max_norm, rel=1e-2)
    assert 0 < last["norm/avg_key_norm"] <= last["max_norm/max_key_norm"]
    # a resume with other base_weights would continue on another base model: a critical snapshot change
    snap = snapshot_fields(cfg, run.network, _NoData())
    assert snap["base_weights"] == [[model_fingerprint(base), 0.5]]
    changed = {**snap, "base_weights": [[model_fingerprint(base), 1.0]]}
    with pytest.raises(ConfigError, match="base_weights"):
        check_snapshot(changed, snap, strict=True, critical=CRITICAL)


class _NoData:
    """The dataset fields snapshot_fields reads, empty."""

    items: list = []
    params: list = []

    def bucket_table(self) -> list:
        return []

    def __len__(self) -> int:
        return 0
