"""ComfyUI's adapter names and math: the seven golden fixtures plus the name/quirk rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer.demo import TINY_DIT_CONFIG
from anima_trainer.models.dit import AnimaDiT, load_dit
from anima_trainer.networks import (
    NetworkError,
    apply_network_file,
    check_comfy_keys,
    comfy_key_map,
    create_network,
    create_network_from_weights,
)
from anima_trainer.networks.formats import delta_weight

CASES = ["lora_generic_updown_alpha", "lora_peft_AB_noalpha", "lora_kohya_updown_alpha_diffb", "loha",
         "lokr_w1full_w2lowrank", "lokr_both_full_alpha_ignored", "diff_diffb_wnorm_setweight"]


@pytest.fixture(scope="module")
def fixture_dit(tiny_dit_path):
    """The 630 MB fixture DiT, loaded once; `restore()` puts the original weights back between cases."""
    dit = load_dit(tiny_dit_path, dtype=torch.float32)
    original = {k: v.clone() for k, v in dit.state_dict().items()}

    def restore():
        dit.load_state_dict(original)

    yield dit, restore
    restore()


@pytest.fixture(scope="module")
def index(fixture_dir):
    return {c["case"]: c for c in json.loads((fixture_dir / "lora_examples" / "index.json").read_text())}


def run(dit, dit_io):
    with torch.no_grad():
        ctx = dit.encode_context(dit_io["qwen_hidden"], dit_io["t5_ids"], qwen_mask=dit_io["qwen_mask"],
                                 t5_mask=dit_io["t5_mask"], t5_weights=dit_io["t5_weights"])
        return dit(dit_io["x"], dit_io["sigma"], ctx), ctx


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", CASES)
def test_fixture_matches_comfyui(case, fixture_dit, dit_io, fixture_dir, index):
    dit, restore = fixture_dit
    restore()
    report = apply_network_file(dit, fixture_dir / "lora_examples" / f"{case}.safetensors")
    expected = index[case]
    assert report["patched"] == sorted(k[len("diffusion_model."):] for k in expected["patched_weights"])
    assert report["not_loaded"] == expected["lora_keys_not_loaded"] == []
    assert report["errors"] == {} and report["not_in_model"] == []
    out, ctx = run(dit, dit_io)
    ref = load_file(fixture_dir / "lora_examples" / f"{case}.comfy_out.safetensors")
    assert max_rel(out, ref["model_output"]) <= 1e-5
    rows = ref["c_crossattn_valid"].shape[1]
    assert max_rel(ctx[:, :rows], ref["c_crossattn_valid"]) <= 1e-5
    assert ctx[:, rows:].abs().max() == 0
    restore()


def test_fixture_negative_control(fixture_dit, dit_io, fixture_dir):
    """Half strength (or no adapter) is far from ComfyUI's output: the comparison above has teeth."""
    dit, restore = fixture_dit
    restore()
    ref = load_file(fixture_dir / "lora_examples" / "lokr_both_full_alpha_ignored.comfy_out.safetensors")
    assert max_rel(run(dit, dit_io)[0], ref["model_output"]) > 1e-4
    apply_network_file(dit, fixture_dir / "lora_examples" / "lokr_both_full_alpha_ignored.safetensors", 0.5)
    assert max_rel(run(dit, dit_io)[0], ref["model_output"]) > 1e-4
    restore()


def test_fixture_dit_default_targets(fixture_dit):
    dit, _ = fixture_dit
    net = create_network(dit, dim=2)
    assert len(net.modules_by_name) == 100
    net.remove()


@pytest.fixture(scope="module")
def full_meta_dit():
    with torch.device("meta"):
        return AnimaDiT()


def test_key_map_full_model(full_meta_dit):
    dit = full_meta_dit
    key_map = comfy_key_map(dit)
    sd = dit.state_dict()
    assert sum(v.dim() == 2 for v in sd.values()) == 516 and len(sd) == 685
    for name in ("blocks.0.cross_attn.k_proj", "llm_adapter.blocks.2.self_attn.o_proj", "t_embedder.1.linear_1",
                 "final_layer.adaln_modulation.1", "llm_adapter.embed", "llm_adapter.norm"):
        assert key_map["diffusion_model." + name] == name + ".weight"
        assert key_map["lora_unet_" + name.replace(".", "_")] == name + ".weight"
    assert key_map["diffusion_model.llm_adapter.out_proj.bias"] == "llm_adapter.out_proj.bias"
    keys = list(key_map)  # ComfyUI order: the kohya name first, so the diffusion_model. patch wins
    assert keys.index("lora_unet_blocks_0_mlp_layer1") < keys.index("diffusion_model.blocks.0.mlp.layer1")


@pytest.mark.parametrize("bad", [
    "net.blocks.0.self_attn.q_proj.lora_up.weight", "blocks.0.self_attn.q_proj.lora_up.weight",
    "transformer.blocks.0.self_attn.q_proj.lora_up.weight",
    "model.diffusion_model.blocks.0.self_attn.q_proj.lora_up.weight",
    "diffusion_model.net.blocks.0.self_attn.q_proj.lora_up.weight",
    "base_model.model.blocks.0.self_attn.q_proj.lora_B.weight", "lycoris_blocks_0_self_attn_q_proj.lokr_w1",
    "lora_transformer_blocks_0_self_attn_q_proj.lora_up.weight", "lora_unet_blocks.0.self_attn.q_proj.lora_up.weight",
    "diffusion_model.blocks.99.self_attn.q_proj.lora_up.weight",
    "diffusion_model.blocks.0.self_attn.q_proj.lora_up.weights",
    "lora_te_layers_0_self_attn_q_proj.lora_up.weight"])
def test_check_rejects_names_comfyui_ignores(bad, full_meta_dit):
    dit = full_meta_dit
    good = ["diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight", "lora_unet_blocks_27_mlp_layer2.alpha",
            "diffusion_model.llm_adapter.blocks.5.mlp.0.lora_A.weight", "diffusion_model.llm_adapter.norm.w_norm",
            "lora_unet_llm_adapter_out_proj.diff_b", "diffusion_model.blocks.3.cross_attn.v_proj.hada_w2_b"]
    check_comfy_keys(good, dit)
    with pytest.raises(NetworkError, match=bad.replace(".", r"\.")):
        check_comfy_keys(good + [bad], dit)


def small_dit():
    torch.manual_seed(0)
    return AnimaDiT(TINY_DIT_CONFIG)


def test_quirks_loaded_keys_and_precedence(tmp_path):
    dit = small_dit()
    w0 = dit.blocks[0].mlp.layer1.weight.detach().clone()
    out, inner = w0.shape
    g = torch.Generator().manual_seed(0)
    t = {  # down without up: not loaded, but its alpha is consumed
        "diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight": torch.randn(2, inner, generator=g),
        "diffusion_model.blocks.0.self_attn.q_proj.alpha": torch.tensor(1.0),
        # the same module under both names: the diffusion_model. one survives
        "lora_unet_blocks_0_mlp_layer1.diff": torch.ones(out, inner),
        "diffusion_model.blocks.0.mlp.layer1.diff": torch.full((out, inner), 2.0),
        # set_weight ignores strength; b_norm of a bias-less norm is loaded but patches nothing
        "diffusion_model.blocks.1.mlp.layer2.set_weight": torch.full(dit.blocks[1].mlp.layer2.weight.shape, 3.0),
        "diffusion_model.llm_adapter.norm.w_norm": torch.ones(dit.llm_adapter.norm.weight.shape),
        "diffusion_model.llm_adapter.norm.b_norm": torch.ones(dit.llm_adapter.norm.weight.shape),
        "net.blocks.0.mlp.layer1.diff": torch.ones(out, inner),
        # wrong shape: counted as loaded, weight left alone
        "diffusion_model.blocks.1.mlp.layer1.diff": torch.ones(3, 3),
    }
    save_file(t, tmp_path / "q.safetensors")
    norm0 = dit.llm_adapter.norm.weight.detach().clone()
    l1 = dit.blocks[1].mlp.layer1.weight.detach().clone()
    report = apply_network_file(dit, tmp_path / "q.safetensors", multiplier=0.5)
    assert report["not_loaded"] == ["diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight",
                                    "net.blocks.0.mlp.layer1.diff"]
    assert report["not_in_model"] == ["llm_adapter.norm.bias"]
    assert list(report["errors"]) == ["blocks.1.mlp.layer1.weight"]
    assert torch.equal(dit.blocks[1].mlp.layer1.weight, l1)
    torch.testing.assert_close(dit.blocks[0].mlp.layer1.weight, w0 + 1.0)
    assert (dit.blocks[1].mlp.layer2.weight == 3.0).all()
    torch.testing.assert_close(dit.llm_adapter.norm.weight, norm0 + 0.5)


def test_delta_math_rules():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g)
    up, down = torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g)
    torch.testing.assert_close(delta_weight(("lora", up, down, 3.0, None, None, None), w, 0.5),
                               w + 0.5 * 1.5 * up @ down)
    torch.testing.assert_close(delta_weight(("lora", up, down, None, None, None, None), w, 1.0), w + up @ down)
    w1, w2 = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    both_full = ("lokr", w1, w2, None, None, None, None, None, 7.0, None)
    torch.testing.assert_close(delta_weight(both_full, w, 1.0), w + torch.kron(w1, w2))  # alpha ignored
    a, b = torch.randn(4, 1, generator=g), torch.randn(1, 2, generator=g)
    low = ("lokr", w1, None, None, None, a, b, None, 3.0, None)
    torch.testing.assert_close(delta_weight(low, w, 1.0), w + 3.0 * torch.kron(w1, a @ b))
    h = [torch.randn(s, generator=g) for s in ((8, 3), (3, 6), (8, 3), (3, 6))]
    loha = ("loha", *h, None, None, 6.0, None)
    torch.testing.assert_close(delta_weight(loha, w, 1.0), w + 2.0 * (h[0] @ h[1]) * (h[2] @ h[3]))
    dora = torch.rand(8, 1, generator=g) + 0.5  # output axis: normalised by the original W's rows
    merged = w + up @ down
    want = merged * dora / (w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(delta_weight(("lora", up, down, None, None, dora, None), w, 1.0), want)


def test_bf16_weights_computed_in_fp32(tmp_path):
    dit = small_dit().to(torch.bfloat16)
    p = dit.blocks[0].self_attn.q_proj.weight
    w0 = p.detach().float().clone()
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(p.shape[0], 4, generator=g), torch.randn(4, p.shape[1], generator=g)
    save_file({"lora_unet_blocks_0_self_attn_q_proj.lora_up.weight": up,
               "lora_unet_blocks_0_self_attn_q_proj.lora_down.weight": down,
               "lora_unet_blocks_0_self_attn_q_proj.alpha": torch.tensor(2.0)}, tmp_path / "k.safetensors")
    report = apply_network_file(dit, tmp_path / "k.safetensors")
    assert report["patched"] == ["blocks.0.self_attn.q_proj.weight"]
    assert p.dtype == torch.bfloat16
    assert torch.equal(p, (w0 + 0.5 * up @ down).to(torch.bfloat16))


def test_apply_missing_file(tmp_path):
    with pytest.raises(NetworkError, match="does not exist"):
        apply_network_file(small_dit(), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("diff_", "lora_kohya_updown_alpha_diffb"))])
def test_fixture_rebuilt_as_a_trainable_network_matches_comfyui(case, fixture_dit, dit_io, fixture_dir):
    """create_network_from_weights (dim_from_weights) builds the file's network; patched in, not merged, the DiT
    gives ComfyUI's output for the file."""
    dit, restore = fixture_dit
    restore()
    net = create_network_from_weights(dit, fixture_dir / "lora_examples" / f"{case}.safetensors")
    try:
        ref = load_file(fixture_dir / "lora_examples" / f"{case}.comfy_out.safetensors")
        assert max_rel(run(dit, dit_io)[0], ref["model_output"]) <= 1e-5
    finally:
        net.remove()


def test_fixture_with_bias_diffs_cannot_be_trained_further(fixture_dit, fixture_dir):
    dit, _ = fixture_dit
    with pytest.raises(NetworkError, match=r"diff.* cannot be trained further"):
        create_network_from_weights(dit, fixture_dir / "lora_examples" / "lora_kohya_updown_alpha_diffb.safetensors")
