"""kohya's network options (issue 14): scale_weight_norms (max-norm), base_weights, the v0.11 component learning
rates and full_bf16 / full_fp16, each against hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.networks import NetworkError, create_network
from anima_trainer.networks.base import anima_component
from anima_trainer.networks.merge import base_weight_multipliers, merge_base_weights
from anima_trainer.train.optim import build_optimizer, component_lrs, use_full_half
from tests.support.networks import random_network

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors",
            "--vae", "vae.safetensors", "--output_dir", "out", "--dataset_config", "dataset.toml"]


def _zero(net) -> None:
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.zero_()


# --- scale_weight_norms ----------------------------------------------------------------------------------------
def test_max_norm_lora_scales_a_module_at_twice_the_max_to_exactly_the_max(dit):
    net = create_network(dit, dim=1, alpha=0.5)  # scale = alpha/dim = 0.5
    _zero(net)
    big, small = net.lora_modules[0], net.lora_modules[1]
    with torch.no_grad():
        big.lora_up.weight.fill_(2.0)
        big.lora_down.weight.fill_(3.0)  # ΔW = 0.5 · 2 · 3 · ones(out, in): ‖ΔW‖ = 3 √(out·in)
        small.lora_up.weight.fill_(1.0)
        small.lora_down.weight.fill_(1.0)  # ‖ΔW‖ = 0.5 √(out·in)
    norm_big = 3.0 * math.sqrt(big.out_features * big.in_features)
    norm_small = 0.5 * math.sqrt(small.out_features * small.in_features)
    max_norm = norm_big / 2
    assert norm_small < max_norm
    small_before = [t.clone() for t in (small.lora_up.weight, small.lora_down.weight)]
    keys, mean, top = net.apply_max_norm_regularization(max_norm)
    assert keys == 1
    # kohya: up and down each × √(1/2), so ΔW × 1/2 and its norm is exactly the max
    torch.testing.assert_close(big.lora_up.weight, torch.full_like(big.lora_up.weight, 2.0 * math.sqrt(0.5)))
    torch.testing.assert_close(big.lora_down.weight, torch.full_like(big.lora_down.weight, 3.0 * math.sqrt(0.5)))
    assert big.delta_weight().norm().item() == pytest.approx(max_norm, rel=1e-6)
    assert torch.equal(small.lora_up.weight, small_before[0]) and torch.equal(small.lora_down.weight,
                                                                              small_before[1])
    n = len(net.lora_modules)  # kohya's logged values: mean and max of the norms after scaling
    assert top == pytest.approx(max_norm, rel=1e-6)
    assert mean == pytest.approx((max_norm + norm_small) / n, rel=1e-6)
    # a second pass changes nothing more (the norm is now at the max, not above it)
    assert net.apply_max_norm_regularization(max_norm * (1 + 1e-5))[0] == 0


@pytest.mark.parametrize(("algo", "kw", "factors"), [("lokr", {"dim": 2}, 3), ("lokr", {"dim": 100000}, 2),
                                                      ("loha", {"dim": 2}, 4)])
def test_max_norm_lokr_loha_scale_every_factor_equally(dit, algo, kw, factors):
    net = create_network(dit, algo=algo, alpha=2.0, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    m = net.lora_modules[0]
    assert len(m.norm_factors()) == factors
    norm = m.delta_weight().norm().item()
    assert m.delta_norm().item() == pytest.approx(norm, rel=1e-5)
    before = [t.clone() for t in m.norm_factors()]
    max_norm = norm / 2
    net.apply_max_norm_regularization(max_norm)
    assert m.delta_weight().norm().item() == pytest.approx(max_norm, rel=1e-5)
    for b, t in zip(before, m.norm_factors(), strict=True):  # LyCORIS: each factor × ratio^(1/n)
        torch.testing.assert_close(t, b * 0.5 ** (1 / factors))
    assert "kohya's networks." + algo in net.max_norm_notice()


def test_max_norm_lora_norm_matches_the_full_product(dit):
    net = random_network(dit, dim=3, alpha=1.5)
    for m in net.lora_modules:
        assert m.delta_norm().item() == pytest.approx(m.delta_weight().norm().item(), rel=1e-5)
    assert net.max_norm_notice() is None


# --- base_weights -------------------------------------------------------------------------------------------
def test_base_weights_merge_w_plus_m_delta(dit, dit_file, tmp_path):
    from anima_trainer.models import load_dit

    first = tmp_path / "a.safetensors"
    random_network(load_dit(dit_file, dtype=torch.float32), seed=1, dim=2, alpha=3.0).save(first)
    second = tmp_path / "b.safetensors"
    random_network(load_dit(dit_file, dtype=torch.float32), seed=2, dim=4, alpha=1.0).save(second)
    w0 = {k: v.clone() for k, v in dit.state_dict().items()}
    done = merge_base_weights(dit, [first, second], [0.5])  # the second file: kohya's default 1.0
    assert [(p.name, m) for p, m, _ in done] == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    sd_a, sd_b = load_file(first), load_file(second)
    key = "blocks.1.mlp.layer2"
    expected = w0[key + ".weight"].clone()
    for sd, m, scale in ((sd_a, 0.5, 3.0 / 2), (sd_b, 1.0, 1.0 / 4)):
        up, down = sd[f"diffusion_model.{key}.lora_up.weight"], sd[f"diffusion_model.{key}.lora_down.weight"]
        expected = expected + m * scale * (up @ down)
    torch.testing.assert_close(dit.state_dict()[key + ".weight"], expected, rtol=1e-6, atol=1e-6)
    assert base_weight_multipliers(["x", "y", "z"], [0.25, 2.0]) == [0.25, 2.0, 1.0]


def test_base_weights_with_text_encoder_keys_and_no_text_encoder_is_an_error(dit, tmp_path):
    path = tmp_path / "te.safetensors"
    sd = random_network(dit).state_tensors()
    sd["lora_te_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 8)
    save_file(sd, path)
    with pytest.raises(NetworkError, match=r"base_weights: .*te\.safetensors: 1 text-encoder key\(s\) and no text "
                                           r"encoder to merge them into .*lora_te_layers_0_self_attn_q_proj"):
        merge_base_weights(dit, [path])


def test_base_weights_options(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    cfg = parse_train_args([*REQUIRED, "--base_weights", str(f), str(f), "--base_weights_multiplier", "0.5"])
    assert cfg.base_weights == [f, f] and cfg.base_weights_multiplier == [0.5]
    toml = tmp_path / "train.toml"
    toml.write_text(f"base_weights = '{f}'\nbase_weights_multiplier = 0.25\n")  # kohya TOMLs: one value
    cfg = parse_train_args([*REQUIRED, "--config_file", str(toml)])
    assert cfg.base_weights == [f] and cfg.base_weights_multiplier == [0.25]
    with pytest.raises(ConfigError, match="base_weights.*does not exist"):
        parse_train_args([*REQUIRED, "--base_weights", str(tmp_path / "missing.safetensors")])


# --- component learning rates -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "component"), [
    ("blocks.0.self_attn.q_proj", "self_attn"), ("blocks.3.cross_attn.k_proj", "cross_attn"),
    ("blocks.0.mlp.layer1", "mlp"), ("blocks.0.adaln_modulation_self_attn.1", "mod"),
    ("blocks.0.adaln_modulation_mlp.1", "mod"), ("final_layer.adaln_modulation.1", "mod"),
    ("llm_adapter.blocks.0.self_attn.q_proj", "llm_adapter"), ("llm_adapter.blocks.1.mlp.0", "llm_adapter"),
    ("final_layer.linear", "base"), ("t_embedder.1.linear_1", "base"), ("blocks.0.self_attn.q_norm", "self_attn"),
])
def test_anima_component_follows_kohya_names(path, component):
    assert anima_component(path) == component


def test_component_lrs_param_groups(dit):
    net = create_network(dit, dim=2, train_llm_adapter="true", include_patterns="['.*adaln_modulation.*']",
                         loraplus_lr_ratio="4", network_reg_lrs="blocks\\.1\\.self_attn\\.q_proj=7e-4")
    cfg = parse_train_args([*REQUIRED, "--self_attn_lr", "2e-3", "--mlp_lr", "0", "--llm_adapter_lr", "5e-4",
                            "--mod_lr", "3e-3"])
    groups = net.param_groups(1e-3, component_lrs(cfg))
    lr_of = {id(p): (g["name"], g["lr"]) for g in groups for p in g["params"]}

    def check(path: str, name: str, lr: float) -> None:
        m = net.modules_by_name[path]
        up, down = m.lora_up.weight, m.lora_down.weight
        assert lr_of[id(down)] == (name, lr)
        assert lr_of[id(up)] == (name + "/plus", lr * 4)  # LoRA+ still applies

    check("blocks.0.self_attn.q_proj", "self_attn", 2e-3)
    check("blocks.0.cross_attn.q_proj", "base", 1e-3)  # cross_attn_lr unset: the base lr
    check("blocks.0.adaln_modulation_cross_attn.1", "mod", 3e-3)
    check("llm_adapter.blocks.0.cross_attn.k_proj", "llm_adapter", 5e-4)
    check("blocks.1.self_attn.q_proj", "reg_lr=0.0007", 7e-4)  # network_reg_lrs wins over the component
    mlp = net.modules_by_name["blocks.0.mlp.layer1"]
    for p in (mlp.lora_up.weight, mlp.lora_down.weight):  # 0 = frozen, as kohya's get_anima_param_groups
        assert id(p) not in lr_of and not p.requires_grad
    opt = build_optimizer(groups, 1e-3)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["self_attn/plus"] == pytest.approx(8e-3)


def test_component_lr_without_a_trained_module_warns(dit, caplog):
    net = create_network(dit, dim=2)  # default targets: no LLM-adapter and no modulation modules
    groups = net.param_groups(1e-3, {"llm_adapter": 5e-4, "mod": 0})
    assert {g["name"] for g in groups} == {"base"}
    assert "llm_adapter_lr = 0.0005: no trained module belongs to llm_adapter" in caplog.text
    assert "train_llm_adapter=true" in caplog.text and "mod_lr = 0: no trained module" in caplog.text


# --- full_bf16 / full_fp16 -------------------------------------------------------------------------------------
def test_full_bf16_weights_and_adam_state_are_bf16(dit):
    net = create_network(dit, dim=2)
    use_full_half(net, torch.bfloat16)
    assert {p.dtype for p in net.trainable_parameters()} == {torch.bfloat16}
    assert net.lora_modules[0].alpha.dtype == torch.float32  # only the trained tensors change
    opt = build_optimizer(net.param_groups(1e-3), 1e-3)
    x = torch.randn(1, 16, 1, 8, 8)
    dit(x, torch.tensor([0.5]), torch.randn(1, 512, 64)).float().square().mean().backward()
    opt.step()
    states = [s for s in opt.state.values() if s]
    assert states and {s["exp_avg"].dtype for s in states} == {s["exp_avg_sq"].dtype for s in states} == \
        {torch.bfloat16}


def test_full_fp16_unscales_fp16_gradients(dit):
    net = create_network(dit, dim=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    use_full_half(net, torch.float16, scaler)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.1)
    up = net.lora_modules[0].lora_up.weight
    scaler.scale(up.float().sum()).backward()  # a scaled fp16 gradient: 1024 per element
    assert up.grad.dtype == torch.float16 and torch.equal(up.grad, torch.full_like(up, 1024.0))
    scaler.unscale_(opt)  # torch alone: "Attempting to unscale FP16 gradients"
    assert up.dtype == torch.float16 and torch.equal(up.grad, torch.ones_like(up))


def test_full_half_refuses_full_matrix_lokr(dit):
    net = create_network(dit, algo="lokr", dim=100000)
    with pytest.raises(ConfigError, match="full_bf16: LoKr with a full-matrix w2 .* remove full_bf16"):
        use_full_half(net, torch.bfloat16)


@pytest.mark.parametrize(("argv", "message"), [
    (["--full_fp16"], 'full_fp16 requires mixed_precision = "fp16"'),
    (["--full_bf16", "--mixed_precision", "fp16"], 'full_bf16 requires mixed_precision = "bf16"'),
    (["--full_bf16", "--full_fp16", "--mixed_precision", "bf16"], "full_fp16 and full_bf16 are both set"),
])
def test_full_half_needs_the_matching_mixed_precision(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_train_args([*REQUIRED, *argv])
    assert parse_train_args([*REQUIRED, "--full_bf16", "--mixed_precision", "bf16"]).full_bf16
