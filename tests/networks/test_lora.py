"""LoRA network on the tiny demo DiT: targets, math, gradients, save/load, removal, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from anima_trainer.demo import TINY_DIT_CONFIG
from anima_trainer.fileio import OutputExistsError
from anima_trainer.models.dit import AnimaDiT, load_dit
from anima_trainer.networks import NetworkError, comfy_key_map, create_network

DEFAULT_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj",
                    "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.output_proj",
                    "mlp.layer1", "mlp.layer2")


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = TINY_DIT_CONFIG
    x = torch.randn(batch, c.in_channels, 1, 8, 8, generator=g)
    sigma = torch.rand(batch, generator=g)
    ctx = torch.randn(batch, 512, c.crossattn_dim, generator=g)
    return x, sigma, ctx


def randomize(net, seed: int = 1, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_default_targets_and_counts(dit):
    net = create_network(dit, dim=4)
    expected = [f"blocks.{i}.{s}" for i in range(TINY_DIT_CONFIG.num_blocks) for s in DEFAULT_SUFFIXES]
    assert list(net.modules_by_name) == expected
    with torch.device("meta"):
        full = AnimaDiT()
    for args, count in (({}, 280), ({"train_llm_adapter": "true"}, 340),
                        ({"exclude_patterns": '[".*mlp.*"]'}, 224),
                        ({"include_patterns": [r".*adaln_modulation.*", r"final_layer\.linear"]},
                         280 + 28 * 6 + 2 + 1)):
        net = create_network(full, dim=4, **args)
        assert len(net.modules_by_name) == count, args
        net.remove()


def test_module_tree_and_names_unchanged(dit):
    before = {k: (v.shape, v.dtype) for k, v in dit.state_dict().items()}
    mods = [n for n, _ in dit.named_modules()]
    net = create_network(dit, dim=4)
    assert {k: (v.shape, v.dtype) for k, v in dit.state_dict().items()} == before
    assert [n for n, _ in dit.named_modules()] == mods
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters())
    assert len(net.trainable_parameters()) == 2 * len(net.modules_by_name)
    assert set(net.state_dict()) == {f"lora_modules.{i}.{t}" for i in range(len(net.lora_modules))
                                     for t in ("lora_down.weight", "lora_up.weight", "alpha")}
    groups = net.param_groups(1e-4)
    assert groups[0]["lr"] == 1e-4 and len(groups[0]["params"]) == len(net.trainable_parameters())


def test_bad_network_args(dit):
    with pytest.raises(NetworkError, match="down_lr_weight"):
        create_network(dit, dim=4, down_lr_weight="0.1")
    with pytest.raises(NetworkError, match="exclude_patterns"):
        create_network(dit, dim=4, exclude_patterns="[.*mlp")
    with pytest.raises(NetworkError, match="no DiT module"):
        create_network(dit, dim=4, exclude_patterns=[".*"])
    with pytest.raises(NetworkError, match="glora"):
        create_network(dit, algo="glora")
    with pytest.raises(NetworkError, match="train_norm must be true or false"):
        create_network(dit, dim=4, train_norm="maybe")
    create_network(dit, dim=4)
    with pytest.raises(NetworkError, match="already has a network"):
        create_network(dit, dim=4)


def test_init_is_identity_and_remove_restores(dit):
    x, sigma, ctx = inputs()
    with torch.no_grad():
        ref = dit(x, sigma, ctx)
        net = create_network(dit, dim=4, alpha=2.0)
        assert net.modules_by_name["blocks.0.mlp.layer1"].lora_up.weight.abs().max() == 0
        assert torch.equal(dit(x, sigma, ctx), ref)
        randomize(net)
        assert not torch.allclose(dit(x, sigma, ctx), ref)
        net.remove()
        assert torch.equal(dit(x, sigma, ctx), ref)
        assert all("forward" not in m.__dict__ for m in dit.modules())
        create_network(dit, dim=4).remove()  # a removed network frees the DiT for another one


def test_forward_equals_hand_merge(dit):
    x, sigma, ctx = inputs()
    net = create_network(dit, dim=4, alpha=2.0)
    randomize(net)
    net.set_multiplier(0.7)
    with torch.no_grad():
        out = dit(x, sigma, ctx)
        net.remove()
        for path, m in net.modules_by_name.items():
            w = dit.get_submodule(path).weight
            w += 0.7 * (2.0 / 4) * (m.lora_up.weight @ m.lora_down.weight)
        merged = dit(x, sigma, ctx)
    assert (out - merged).abs().max() <= 1e-5 * merged.abs().max()


def test_gradients_reach_down_and_up(dit):
    x, sigma, ctx = inputs()
    net = create_network(dit, dim=4)
    dit(x, sigma, ctx).square().mean().backward()
    for m in net.lora_modules:  # up starts at zero: up gets a gradient, down not yet
        assert m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().max() > 0
    net.zero_grad(set_to_none=True)
    randomize(net)
    dit(x, sigma, ctx).square().mean().backward()
    for m in net.lora_modules:
        assert m.lora_down.weight.grad is not None and m.lora_down.weight.grad.abs().max() > 0
        assert m.lora_up.weight.grad.abs().max() > 0
    assert all(not p.requires_grad for p in dit.parameters())


def test_checkpointing_gives_same_gradients(dit):
    """Non-reentrant checkpointing (the DiT's own flag, else per block by hand) gives the same LoRA grads."""
    net = create_network(dit, dim=4)
    randomize(net)
    x, sigma, ctx = inputs()

    def run(use_ckpt: bool):
        net.zero_grad(set_to_none=True)
        if hasattr(dit, "runner"):
            dit.runner.gradient_checkpointing = use_ckpt
            out = dit(x, sigma, ctx)
        else:
            tokens, emb, adaln = dit.embed(x, sigma)
            rope = dit.rope(1, 4, 4, x.device)
            for block in dit.blocks:
                tokens = (checkpoint(block, tokens, emb, adaln, ctx, rope, use_reentrant=False) if use_ckpt
                          else block(tokens, emb, adaln, ctx, rope))
            out = tokens
        out.square().mean().backward()
        return [p.grad.clone() for p in net.trainable_parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b)


def test_dropout_only_in_training(dit):
    x, sigma, ctx = inputs()
    net = create_network(dit, dim=4, dropout=0.5)
    randomize(net)
    net.eval()
    with torch.no_grad():
        a, b = dit(x, sigma, ctx), dit(x, sigma, ctx)
        assert torch.equal(a, b)  # network in eval mode → no dropout
        net.train()
        assert not torch.equal(dit(x, sigma, ctx), a)


def test_bf16_dit_with_fp32_lora(dit_file):
    dit = load_dit(dit_file, dtype=torch.bfloat16)
    net = create_network(dit, dim=4)
    randomize(net)
    x, sigma, ctx = inputs()
    out = dit(x, sigma, ctx)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for p in net.trainable_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    assert dit.blocks[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_saved_keys_are_comfy_names(dit, tmp_path):
    net = create_network(dit, dim=4, alpha=2.0, exclude_patterns='[".*layer2"]')
    randomize(net)
    path = net.save(tmp_path / "lora.safetensors", dtype=torch.bfloat16,
                    metadata={"ss_seed": "7", "ss_network_dim": "99", "ss_network_module": "networks.lora_anima"})
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q_proj.alpha").dtype == torch.float32
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q_proj.alpha").shape == ()
        down = f.get_tensor("diffusion_model.blocks.1.mlp.layer1.lora_down.weight")
        up = f.get_tensor("diffusion_model.blocks.1.mlp.layer1.lora_up.weight")
    assert down.dtype == up.dtype == torch.bfloat16
    c = TINY_DIT_CONFIG
    assert down.shape == (4, c.model_channels) and up.shape == (c.mlp_dim, 4)
    expected = {f"diffusion_model.{p}.{s}" for p in net.modules_by_name
                for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected and not any("layer2" in k for k in keys)
    key_map = comfy_key_map(dit)
    assert all(key_map[f"diffusion_model.{p}"] == p + ".weight" for p in net.modules_by_name)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_seed"] == "7"
    assert meta["ss_network_module"] == "networks.lora_anima" and "anima_trainer_version" in meta
    assert json.loads(meta["ss_network_args"]) == {"exclude_patterns": '[".*layer2"]'}
    assert not any(k.startswith("modelspec") for k in meta)
    with pytest.raises(NetworkError, match="ss_steps"):
        net.save(tmp_path / "other.safetensors", metadata={"ss_steps": 3})
    assert meta_of(net.save(tmp_path / "plain.safetensors"))["ss_network_module"] == "anima_trainer.networks.lora"


def meta_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_save_check_rejects_unknown_key(dit, tmp_path, monkeypatch):
    net = create_network(dit, dim=4)
    real = net.state_tensors

    def wrong(dtype=None, save_format="comfy"):
        out = real(dtype, save_format)
        out["net.blocks.0.self_attn.q_proj.lora_up.weight"] = out.pop("diffusion_model.blocks.0.self_attn.q_proj."
                                                                      "lora_up.weight")
        return out

    monkeypatch.setattr(net, "state_tensors", wrong)
    with pytest.raises(NetworkError, match=r"net\.blocks\.0\.self_attn\.q_proj\.lora_up\.weight"):
        net.save(tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_never_overwrite_without_flag(dit, tmp_path):
    net = create_network(dit, dim=4)
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"user file")
    with pytest.raises(OutputExistsError):
        net.save(path)
    assert path.read_bytes() == b"user file"
    net.save(path, overwrite=True)
    with safe_open(str(path), "pt") as f:
        assert len(list(f.keys())) == 3 * len(net.modules_by_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_save_then_load_into_fresh_dit(dit, dit_file, tmp_path):
    x, sigma, ctx = inputs()
    net = create_network(dit, dim=4, alpha=2.0)
    randomize(net)
    path = net.save(tmp_path / "lora.safetensors")
    with torch.no_grad():
        ref = dit(x, sigma, ctx)
    fresh = load_dit(dit_file, dtype=torch.float32)
    net2 = create_network(fresh, dim=4, alpha=2.0)
    net2.load_weights(path)
    with torch.no_grad():
        assert torch.equal(fresh(x, sigma, ctx), ref)


def test_kohya_named_file_loads(dit, dit_file, tmp_path):
    net = create_network(dit, dim=4, alpha=2.0)
    randomize(net)
    kohya = {}
    for k, v in net.state_tensors().items():
        module, _, suffix = k[len("diffusion_model."):].partition(".lora_") if ".lora_" in k else \
            (k[len("diffusion_model."):-len(".alpha")], "", "alpha")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{suffix}" if suffix != "alpha" else f"{name}.alpha"] = v
    assert "lora_unet_blocks_1_cross_attn_k_proj.lora_down.weight" in kohya
    save_file(kohya, tmp_path / "kohya.safetensors")
    fresh = load_dit(dit_file, dtype=torch.float32)
    net2 = create_network(fresh, dim=4, alpha=2.0)
    net2.load_weights(tmp_path / "kohya.safetensors")
    for p, m in net.modules_by_name.items():
        assert torch.equal(net2.modules_by_name[p].lora_down.weight, m.lora_down.weight)
        assert torch.equal(net2.modules_by_name[p].lora_up.weight, m.lora_up.weight)


def test_load_mismatches_are_named(dit, dit_file, tmp_path):
    net = create_network(dit, dim=4, alpha=2.0)
    path = net.save(tmp_path / "lora.safetensors")
    net.remove()
    fresh = load_dit(dit_file, dtype=torch.float32)
    wrong_dim = create_network(fresh, dim=8, alpha=2.0)
    with pytest.raises(NetworkError, match=r"blocks\.0\.self_attn\.q_proj: file has dim \(rank\) 4, network has "
                                           r"dim 8"):
        wrong_dim.load_weights(path)
    wrong_dim.remove()
    wrong_alpha = create_network(fresh, dim=4, alpha=1.0)
    with pytest.raises(NetworkError, match=r"blocks\.0\.self_attn\.q_proj: file has alpha 2, network has alpha 1"):
        wrong_alpha.load_weights(path)
    wrong_alpha.remove()
    fewer = create_network(fresh, dim=4, alpha=2.0, exclude_patterns=[".*mlp.*"])
    with pytest.raises(NetworkError, match="mlp.layer1"):
        fewer.load_weights(path)
    fewer.remove()
    with pytest.raises(NetworkError, match="does not exist"):
        create_network(fresh, dim=4).load_weights(tmp_path / "missing.safetensors")
