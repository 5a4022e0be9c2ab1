"""Networks rebuilt from a file alone (dim_from_weights), kohya-named saves, DoRA and the optional targets."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anima_trainer.models import load_dit
from anima_trainer.networks import (
    NetworkError,
    apply_network_file,
    check_comfy_keys,
    create_network,
    create_network_from_weights,
)

X = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
SIGMA = torch.tensor([0.3, 0.8])


def ctx(dit):
    return torch.randn(2, 8, dit.config.crossattn_dim, generator=torch.Generator().manual_seed(1))


def perturb(net, seed: int = 0) -> None:
    """Move every factor away from its initialisation (a zero up factor would hide layout mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def layout(net) -> dict:
    """Everything structural about a network, per module."""
    out = {}
    for path, m in net.modules_by_name.items():
        out[path] = (type(m).__name__, m.dim, float(m.alpha), m.scale,
                     {s: tuple(t.shape) for s, t in m.tensors().items()})
    return {"modules": out, "norms": sorted(net.norms_by_name)}


CASES = {
    "lora": ("lora", 4, 2.0, {}),
    "lora-dora-norm": ("lora", 4, 2.0, {"dora_wd": "true", "train_norm": "true"}),
    "lora-mixed-dims-adaln-final": ("lora", 4, 2.0, {"network_reg_dims": ".*mlp.*=2,.*cross_attn.*=0",
                                                     "train_adaln": "1", "train_final_layer": "yes"}),
    "lora-embedders-llm-adapter": ("lora", 3, 3.0, {"train_embedders": "on", "train_llm_adapter": "true"}),
    "loha-norm": ("loha", 3, 1.5, {"train_norm": "true"}),
    "lokr-w2-lowrank": ("lokr", 2, 2.0, {}),
    "lokr-factor4-both": ("lokr", 2, 2.0, {"factor": "4", "decompose_both": "true"}),
    "lokr-sentinel": ("lokr", 100000, 2.0, {}),
    "lokr-full-matrix": ("lokr", 4, 2.0, {"full_matrix": "true"}),
}


@pytest.mark.parametrize("save_format", ["comfy", "kohya"])
@pytest.mark.parametrize("case", list(CASES))
def test_rebuilt_network_equals_the_saved_one(case, save_format, dit_file, tmp_path):
    algo, dim, alpha, args = CASES[case]
    dit = load_dit(dit_file, dtype=torch.float32)
    net = create_network(dit, algo, dim=dim, alpha=alpha, **args)
    perturb(net)
    with torch.no_grad():
        expected = dit(X, SIGMA, ctx(dit))
    path = net.save(tmp_path / "net.safetensors", save_format=save_format)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    prefix = "diffusion_model." if save_format == "comfy" else "lora_unet_"
    assert keys and all(k.startswith(prefix) for k in keys)
    check_comfy_keys(path, dit)

    fresh = load_dit(dit_file, dtype=torch.float32)
    rebuilt = create_network_from_weights(fresh, path)
    assert rebuilt.algo == algo
    assert layout(rebuilt) == layout(net)
    a, b = net.state_tensors(), rebuilt.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(fresh(X, SIGMA, ctx(fresh)), expected)
    # ComfyUI's merge of the same file agrees (within fp32 rounding of the merged weights)
    merged = load_dit(dit_file, dtype=torch.float32)
    report = apply_network_file(merged, path)
    assert not report["not_loaded"] and not report["errors"]
    with torch.no_grad():
        torch.testing.assert_close(merged(X, SIGMA, ctx(merged)), expected, atol=1e-5, rtol=1e-5)


def test_mixed_dims_are_dynamic_in_metadata(dit, tmp_path):
    net = create_network(dit, "lora", dim=4, alpha=2.0, network_reg_dims=".*mlp.*=2")
    with safe_open(str(net.save(tmp_path / "n.safetensors")), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "2.0")
    net.remove()
    same = create_network(dit, "lora", dim=4, alpha=2.0)
    assert same.metadata()["ss_network_dim"] == "4"


def test_peft_file_without_alpha_rebuilds_with_scale_one(dit, tmp_path):
    """PEFT/diffusers names (lora_A/lora_B, transformer_blocks.N.attn1.to_q) and no alpha: ComfyUI's scale 1."""
    gen = torch.Generator().manual_seed(3)
    sd = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(3, 64, generator=gen),
          "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, 3, generator=gen) * 0.1,
          "transformer.transformer_blocks.1.ff.net.2.lora_A.weight": torch.randn(2, 256, generator=gen),
          "transformer.transformer_blocks.1.ff.net.2.lora_B.weight": torch.randn(64, 2, generator=gen) * 0.1}
    path = tmp_path / "peft.safetensors"
    save_file(sd, str(path))
    net = create_network_from_weights(dit, path)
    assert {p: (m.dim, float(m.alpha)) for p, m in net.modules_by_name.items()} == {
        "blocks.0.self_attn.q_proj": (3, 3.0), "blocks.1.mlp.layer2": (2, 2.0)}
    with torch.no_grad():
        ours = dit(X, SIGMA, ctx(dit))
    net.remove()
    from anima_trainer.tools.convert import convert_network

    comfy = convert_network(path, tmp_path / "comfy.safetensors", "comfy", dit=dit)["written"]
    apply_network_file(dit, comfy)
    with torch.no_grad():
        torch.testing.assert_close(dit(X, SIGMA, ctx(dit)), ours, atol=1e-5, rtol=1e-5)


def test_network_weights_load_peft_names_into_a_configured_network(dit, tmp_path):
    src = create_network(dit, "lora", dim=2, alpha=2.0)
    perturb(src)
    sd = {}
    for key, t in src.state_tensors().items():
        if key.endswith(".alpha"):
            continue  # alpha = rank: PEFT files carry none
        key = key.replace("diffusion_model.", "base_model.model.diffusion_model.")
        sd[key.replace(".lora_down.weight", ".lora_A.default.weight").replace(".lora_up.weight",
                                                                              ".lora_B.default.weight")] = t
    save_file(sd, str(tmp_path / "peft.safetensors"))
    src.remove()
    net = create_network(dit, "lora", dim=2, alpha=2.0)
    net.load_weights(tmp_path / "peft.safetensors")
    a, b = src.state_tensors(), net.state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_structural_args_are_ignored_with_a_warning(dit, tmp_path, caplog):
    src = create_network(dit, "lora", dim=2, alpha=2.0)
    path = src.save(tmp_path / "n.safetensors")
    src.remove()
    with caplog.at_level(logging.WARNING):
        net = create_network_from_weights(dit, path, train_adaln="true", dora_wd="true", rank_dropout="0.25")
    assert "['dora_wd', 'train_adaln'] are ignored" in caplog.text
    assert len(net.modules_by_name) == 20 and not any(m.dora_wd for m in net.lora_modules)
    assert all(m.rank_dropout == 0.25 for m in net.lora_modules)  # training-only args still apply


def _save(tmp_path, sd, name="bad.safetensors"):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / name))
    return tmp_path / name


def test_files_that_are_not_one_trainable_network_are_refused(dit, tmp_path):
    lora = create_network(dit, "lora", dim=2, alpha=2.0, train_norm="true")
    sd = lora.state_tensors()
    lora.remove()
    loha = create_network(dit, "loha", dim=2, alpha=2.0, include_patterns=[r"blocks\.0\.adaln_modulation_mlp\.1"])
    mixed = {**sd, **{k: v for k, v in loha.state_tensors().items() if "adaln" in k}}
    loha.remove()
    with pytest.raises(NetworkError, match=r"mixes algorithms \['loha', 'lora'\]"):
        create_network_from_weights(dit, _save(tmp_path, mixed))
    partial = {k: v for k, v in sd.items() if not k.endswith("blocks.0.self_attn.q_norm.w_norm")}
    with pytest.raises(NetworkError, match=r"w_norm for \d+ of the DiT's \d+ norm gains"):
        create_network_from_weights(dit, _save(tmp_path, partial))
    out_axis = dict(sd)
    out_axis["diffusion_model.blocks.0.self_attn.q_proj.dora_scale"] = torch.ones(64, 1)
    with pytest.raises(NetworkError, match=r"dora_scale \(64, 1\) is not input-axis DoRA"):
        create_network_from_weights(dit, _save(tmp_path, out_axis))
    diff = {"diffusion_model.blocks.0.self_attn.q_proj.diff": torch.zeros(64, 64)}
    with pytest.raises(NetworkError, match="cannot be trained further"):
        create_network_from_weights(dit, _save(tmp_path, diff))


# ------------------------------------------------------------------------------------------------ DoRA --

def test_dora_starts_as_identity_and_every_factor_learns(dit):
    with torch.no_grad():
        base = dit(X, SIGMA, ctx(dit))
    net = create_network(dit, "lora", dim=2, alpha=2.0, dora_wd="yes")
    assert all(m.dora_scale.shape == (1, m.in_features) for m in net.lora_modules)
    with torch.no_grad():
        assert torch.equal(dit(X, SIGMA, ctx(dit)), base)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        dit(X, SIGMA, ctx(dit)).square().mean().backward()
        grads = {s: all(m.tensors()[s].grad is not None and m.tensors()[s].grad.abs().sum() > 0
                        for m in net.lora_modules) for s in net.lora_modules[0].tensors()}
        if step == 0:  # lora_up starts at zero, so lora_down has no gradient yet
            assert grads == {".lora_down.weight": False, ".lora_up.weight": True, ".dora_scale": True}
        opt.step()
    assert all(grads.values()), grads


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_dora_matches_comfyui_at_any_strength(dit_file, tmp_path, multiplier):
    dit = load_dit(dit_file, dtype=torch.float32)
    net = create_network(dit, "lora", dim=4, alpha=2.0, dora_wd="true")
    perturb(net, seed=4)
    with torch.no_grad():
        for m in net.lora_modules:
            m.dora_scale.mul_(1.2)  # a magnitude that differs from W's norms
    net.set_multiplier(multiplier)
    with torch.no_grad():
        ours = dit(X, SIGMA, ctx(dit))
    path = net.save(tmp_path / "dora.safetensors")
    assert load_file(path)["diffusion_model.blocks.0.mlp.layer1.dora_scale"].shape == (1, 64)
    merged = load_dit(dit_file, dtype=torch.float32)
    apply_network_file(merged, path, multiplier)
    with torch.no_grad():
        ref = merged(X, SIGMA, ctx(merged))
    assert ((ours - ref).abs().max() / ref.abs().max()) <= 1e-5
    net.remove()
    with torch.no_grad():
        assert ((dit(X, SIGMA, ctx(dit)) - ref).abs().max() / ref.abs().max()) > 1e-3  # the check has teeth


def test_dora_runs_on_a_bf16_dit(dit_file):
    dit = load_dit(dit_file, dtype=torch.bfloat16)
    net = create_network(dit, "lora", dim=2, alpha=2.0, dora_wd="true")
    perturb(net)
    out = dit(X.bfloat16(), SIGMA, ctx(dit).bfloat16())
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and all(m.dora_scale.grad is not None for m in net.lora_modules)


def test_dora_option_errors(dit, tmp_path):
    with pytest.raises(NetworkError, match=r"dora_wd must be true or false .* got 'maybe'"):
        create_network(dit, "lora", dim=2, dora_wd="maybe")
    with pytest.raises(NetworkError, match=r"unknown network_args \['dora_wd'\]"):
        create_network(dit, "lokr", dim=2, dora_wd="true")
    net = create_network(dit, "lora", dim=2, alpha=2.0, dora_wd="true")
    path = net.save(tmp_path / "d.safetensors")
    net.remove()
    plain = create_network(dit, "lora", dim=2, alpha=2.0)
    with pytest.raises(NetworkError, match=r"file has \['\.dora_scale'\].*dora_wd"):
        plain.load_weights(path)


# ------------------------------------------------------------------------------------- optional targets --

@pytest.mark.parametrize(("option", "added"), [
    ("train_adaln", {f"blocks.{b}.adaln_modulation_{k}.{i}" for b in (0, 1) for k in ("self_attn", "cross_attn", "mlp")
                     for i in (1, 2)}),
    ("train_final_layer", {"final_layer.linear", "final_layer.adaln_modulation.1", "final_layer.adaln_modulation.2"}),
    ("train_embedders", {"x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2"}),
])
@pytest.mark.parametrize("algo", ["lora", "lokr", "loha"])
def test_optional_targets(dit, tmp_path, option, added, algo):
    default = create_network(dit, algo, dim=2)
    default_paths = set(default.modules_by_name)
    default.remove()
    net = create_network(dit, algo, dim=2, **{option: "true"})
    assert set(net.modules_by_name) == default_paths | added
    perturb(net)
    path = net.save(tmp_path / "n.safetensors")  # the save-time check passes for every new target
    assert load_file(path).keys() >= {f"diffusion_model.{p}.alpha" for p in added}
    with pytest.raises(NetworkError, match="must be true or false"):
        create_network(dit, algo, dim=2, **{option: "sometimes"})
