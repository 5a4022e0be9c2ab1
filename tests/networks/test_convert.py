"""File tools: `convert-network` (ComfyUI ↔ kohya ↔ PEFT/diffusers names), `merge`, `inspect` for networks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from anima_trainer.cli import main
from anima_trainer.demo import TINY_DIT_CONFIG, write_tiny_dit
from anima_trainer.models.dit import load_dit
from anima_trainer.networks import apply_network_file, check_comfy_keys, create_network
from anima_trainer.networks.convert import LORA_AB_META
from anima_trainer.tools.convert import parse_network_arg

CASES = ["lora_generic_updown_alpha", "lora_peft_AB_noalpha", "lora_kohya_updown_alpha_diffb", "loha",
         "lokr_w1full_w2lowrank", "lokr_both_full_alpha_ignored", "diff_diffb_wnorm_setweight"]


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def assert_identical(a, b):
    (ta, ma), (tb, mb) = read(a), read(b)
    assert sorted(ta) == sorted(tb) and ma == mb
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def convert(src, dst, to, *extra):
    assert main(["convert-network", str(src), str(dst), "--to", to, *extra]) == 0
    return dst


@pytest.fixture(scope="module")
def dit(dit_file):
    return load_dit(dit_file, dtype=torch.float32)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = TINY_DIT_CONFIG
    return (torch.randn(1, c.in_channels, 1, 8, 8, generator=g), torch.rand(1, generator=g),
            torch.randn(1, 512, c.crossattn_dim, generator=g))


# ------------------------------------------------------------------------------------------- convert --

@pytest.mark.parametrize("case", CASES)
def test_fixture_round_trip_is_bit_identical(case, fixture_dir, tmp_path):
    """Module paths come from the default 2B layout on the meta device (names are the same at every size)."""
    src = fixture_dir / "lora_examples" / f"{case}.safetensors"
    if case.startswith("lora_kohya"):  # a kohya file: its ComfyUI form is the starting point
        comfy = convert(src, tmp_path / "comfy.safetensors", "comfy")
        assert_identical(convert(comfy, tmp_path / "back.safetensors", "kohya"), src)
        src = comfy
    kohya = convert(src, tmp_path / "kohya.safetensors", "kohya")
    keys = list(read(kohya)[0])
    assert all(k.startswith("lora_unet_") or ".bias." in k for k in keys), keys
    assert not any(".lora_A." in k or ".lora_B." in k for k in keys)  # kohya loaders read lora_down/lora_up
    back = convert(kohya, tmp_path / "back_comfy.safetensors", "comfy")
    assert_identical(back, src)


def test_kohya_names_keep_underscored_module_names(fixture_dir, tmp_path):
    src = fixture_dir / "lora_examples" / "lora_kohya_updown_alpha_diffb.safetensors"
    keys = list(read(convert(src, tmp_path / "c.safetensors", "comfy"))[0])
    assert "diffusion_model.blocks.1.adaln_modulation_cross_attn.1.lora_up.weight" in keys
    assert "diffusion_model.t_embedder.1.linear_2.alpha" in keys
    assert "diffusion_model.llm_adapter.out_proj.diff_b" in keys


def test_created_network_round_trip(dit, dit_file, tmp_path):
    net = create_network(dit, dim=4, alpha=2.0, train_llm_adapter=True)
    try:
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.normal_(0, 0.1)
        src = net.save(tmp_path / "net.safetensors", metadata={"ss_output_name": "x"})
    finally:
        net.remove()
    kohya = convert(src, tmp_path / "k.safetensors", "kohya", "--dit", str(dit_file))
    assert LORA_AB_META not in read(kohya)[1]
    assert_identical(convert(kohya, tmp_path / "c.safetensors", "comfy", "--dit", str(dit_file)), src)


def test_refuses_overwrite_unknown_keys_and_duplicates(fixture_dir, tmp_path, capsys):
    src = fixture_dir / "lora_examples" / "loha.safetensors"
    out = convert(src, tmp_path / "k.safetensors", "kohya")
    before = out.read_bytes()
    assert main(["convert-network", str(src), str(out), "--to", "kohya"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    convert(src, out, "kohya", "--overwrite")
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.99.self_attn.q_proj.lora_up.weight": torch.ones(2, 2),
               "diffusion_model.blocks.0.self_attn.q_proj.lora_up.weight": torch.ones(2, 2)}, bad)
    assert main(["convert-network", str(bad), str(tmp_path / "o.safetensors"), "--to", "kohya"]) == 2
    assert "blocks.99" in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()
    dup = tmp_path / "dup.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q_proj.alpha": torch.tensor(1.0),
               "lora_unet_blocks_0_self_attn_q_proj.alpha": torch.tensor(1.0)}, dup)
    assert main(["convert-network", str(dup), str(tmp_path / "o.safetensors"), "--to", "comfy"]) == 2
    assert "two names" in capsys.readouterr().err


def test_peft_and_diffusers_names_apply_like_the_original(dit, dit_file, tmp_path):
    g = torch.Generator().manual_seed(3)
    c = TINY_DIT_CONFIG
    shapes = {  # ComfyUI module → (out, in)
        "blocks.0.self_attn.q_proj": (c.model_channels, c.model_channels),
        "blocks.1.cross_attn.output_proj": (c.model_channels, c.model_channels),
        "blocks.1.mlp.layer2": (c.model_channels, c.mlp_dim),
        "blocks.0.adaln_modulation_mlp.1": (c.adaln_lora_dim, c.model_channels),
        "final_layer.linear": (16 * 4, c.model_channels),
        "t_embedder.1.linear_1": (c.model_channels, c.model_channels),
        "llm_adapter.blocks.0.cross_attn.q_proj": (c.llm_adapter_dim, c.llm_adapter_dim),
    }
    peft_names = {
        "blocks.0.self_attn.q_proj": ("base_model.model.transformer_blocks.0.attn1.to_q", ".lora_{}.default.weight"),
        "blocks.1.cross_attn.output_proj": ("transformer.transformer_blocks.1.attn2.to_out.0", ".lora_{}.weight"),
        "blocks.1.mlp.layer2": ("transformer_blocks.1.ff.net.2", ".lora_{}"),
        "blocks.0.adaln_modulation_mlp.1": ("transformer.transformer_blocks.0.norm3.linear_1", ".lora_{}.weight"),
        "final_layer.linear": ("base_model.model.proj_out", ".lora_{}.weight"),
        "t_embedder.1.linear_1": ("transformer.time_embed.t_embedder.linear_1", ".lora_{}.weight"),
        "llm_adapter.blocks.0.cross_attn.q_proj": ("diffusion_model.llm_adapter.blocks.0.cross_attn.q_proj",
                                                   ".lora_{}.weight"),
    }
    original, peft = {}, {}
    for m, (out_f, in_f) in shapes.items():
        a, b = torch.randn(4, in_f, generator=g) * 0.1, torch.randn(out_f, 4, generator=g) * 0.1
        original[f"diffusion_model.{m}.lora_A.weight"], original[f"diffusion_model.{m}.lora_B.weight"] = a, b
        stem, spelling = peft_names[m]
        peft[stem + spelling.format("A")], peft[stem + spelling.format("B")] = a, b
    save_file(original, tmp_path / "orig.safetensors")
    save_file(peft, tmp_path / "peft.safetensors", metadata={"source": "peft"})
    out = convert(tmp_path / "peft.safetensors", tmp_path / "comfy.safetensors", "comfy", "--dit", str(dit_file))
    tensors, meta = read(out)
    assert meta == {"source": "peft"}
    check_comfy_keys(out, dit)
    # alpha = rank written for the PEFT-named modules; the one already ComfyUI-named is left as it was
    assert float(tensors["diffusion_model.blocks.1.mlp.layer2.alpha"]) == 4.0
    assert "diffusion_model.llm_adapter.blocks.0.cross_attn.q_proj.alpha" not in tensors
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    try:
        assert len(apply_network_file(dit, tmp_path / "orig.safetensors")["patched"]) == len(shapes)
        expected = {k: v.clone() for k, v in dit.state_dict().items()}
        dit.load_state_dict(base)
        assert len(apply_network_file(dit, out)["patched"]) == len(shapes)
        for k, v in dit.state_dict().items():
            assert torch.equal(v, expected[k]), k
    finally:
        dit.load_state_dict(base)


# --------------------------------------------------------------------------------------------- merge --

def _lora_file(path, dit, seed, dim=4):
    net = create_network(dit, dim=dim, alpha=2.0)
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return net.save(path)
    finally:
        net.remove()


def test_parse_network_arg():
    assert parse_network_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_network_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_network_arg("C:\\x\\a.safetensors") == ("C:\\x\\a.safetensors", 1.0)


def test_merge_equals_apply(dit, dit_file, fixture_dir, tmp_path, capsys):
    a = _lora_file(tmp_path / "a.safetensors", dit, 1)
    b = _lora_file(tmp_path / "b.safetensors", dit, 2, dim=2)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--dit", str(dit_file), "--network", f"{a}:0.7", "--network", str(b),
                 "--out", str(out)]) == 0
    merged_keys = read(out)[0]
    base_keys = read(dit_file)[0]
    assert sorted(merged_keys) == sorted(base_keys) and all(k.startswith("net.") for k in merged_keys)
    assert all(merged_keys[k].dtype == base_keys[k].dtype for k in base_keys)
    reference = load_dit(dit_file, dtype=torch.float32)
    apply_network_file(reference, a, 0.7)
    apply_network_file(reference, b, 1.0)
    merged = load_dit(out, dtype=torch.float32)
    x, sigma, ctx = inputs()
    ref_state = reference.state_dict()
    for k, v in merged.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    with torch.no_grad():
        torch.testing.assert_close(merged(x, sigma, ctx), reference(x, sigma, ctx), rtol=1e-5, atol=1e-6)
        assert not torch.equal(merged(x, sigma, ctx), dit(x, sigma, ctx))
    # refuses to overwrite; other prefix and precision are kept / converted as asked
    assert main(["merge", "--dit", str(dit_file), "--network", str(a), "--out", str(out)]) == 2
    capsys.readouterr()
    bf = write_tiny_dit(tmp_path / "bf16.safetensors", prefix="model.diffusion_model.", dtype=torch.bfloat16)
    out2 = tmp_path / "merged_bf16.safetensors"
    assert main(["merge", "--dit", str(bf), "--network", str(a), "--out", str(out2)]) == 0
    t2 = read(out2)[0]
    assert sorted(t2) == sorted(read(bf)[0]) and {v.dtype for v in t2.values()} == {torch.bfloat16}
    ref_bf = load_dit(bf, dtype=torch.bfloat16)
    apply_network_file(ref_bf, a)
    for k, v in ref_bf.state_dict().items():
        assert torch.equal(t2["model.diffusion_model." + k], v), k
    out3 = tmp_path / "merged_fp16.safetensors"
    assert main(["merge", "--dit", str(dit_file), "--network", str(a), "--out", str(out3),
                 "--save_precision", "fp16"]) == 0
    assert {v.dtype for v in read(out3)[0].values()} == {torch.float16}


# ------------------------------------------------------------------------------------------- inspect --

def test_inspect_good_files(fixture_dir, capsys):
    lora = fixture_dir / "lora_examples" / "lora_generic_updown_alpha.safetensors"
    assert main(["inspect", str(lora)]) == 0
    text = capsys.readouterr().out
    assert "LoRA" in text and "rank 4 alpha 2.0 scale 0.5" in text and "OK" in text
    assert main(["inspect", "--json", str(lora)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "network" and report["algorithms"] == ["LoRA"] and report["modules"] == 4
    assert report["ranks"] == {"4": 4} and report["broken"] == [] and report["unknown_keys"] == []
    assert report["targets_by_group"] == {"blocks.0": 1, "blocks.3": 1, "final_layer": 1, "llm_adapter.blocks.0": 1}
    expected = json.loads((fixture_dir / "lora_examples" / "index.json").read_text())[0]["expected_delta_stats"]
    for name, stats in expected.items():  # ComfyUI's own delta norms
        got = report["per_module"][name[len("diffusion_model."):]]["delta_norm"]
        assert got == pytest.approx(stats["l2"], rel=1e-4)  # theirs: (W + ΔW) − W, rounded in fp32
    diff = fixture_dir / "lora_examples" / "diff_diffb_wnorm_setweight.safetensors"
    assert main(["inspect", "--json", str(diff)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "t_embedding_norm.weight" in report["norm_diffs"]


def test_inspect_broken_files(dit_file, tmp_path, capsys):
    c = TINY_DIT_CONFIG
    q = "diffusion_model.blocks.0.self_attn.q_proj"
    down, up = torch.randn(4, c.model_channels), torch.randn(c.model_channels, 4)
    cases = {
        "nan": {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up.clone().index_fill_(0, torch.tensor([0]),
                                                                                           float("nan"))},
        "unknown": {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up,
                    "net.blocks.0.self_attn.k_proj.lora_up.weight": up.clone()},
        "duplicate": {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up,
                      "lora_unet_blocks_0_self_attn_q_proj.lora_down.weight": down.clone(),
                      "lora_unet_blocks_0_self_attn_q_proj.lora_up.weight": up.clone()},
        "zero": {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": torch.zeros_like(up)},
    }
    reports = {}
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        code = main(["inspect", "--json", "--dit", str(dit_file), str(path)])
        reports[name] = (code, json.loads(capsys.readouterr().out))
    assert reports["nan"][0] == 1 and reports["nan"][1]["nonfinite"] == {f"{q}.lora_up.weight": 4}
    assert reports["unknown"][0] == 1
    assert reports["unknown"][1]["unknown_keys"] == ["net.blocks.0.self_attn.k_proj.lora_up.weight"]
    assert reports["duplicate"][0] == 1
    assert reports["duplicate"][1]["duplicate_modules"] == {
        "blocks.0.self_attn.q_proj.weight": ["diffusion_model.blocks.0.self_attn.q_proj",
                                             "lora_unet_blocks_0_self_attn_q_proj"]}
    code, zero = reports["zero"]
    assert code == 0 and zero["broken"] == [] and zero["zero_branches"] == ["blocks.0.self_attn.q_proj.weight"]
    assert any("all-zero" in w for w in zero["warnings"])
    # human-readable output names the problem too
    assert main(["inspect", str(tmp_path / "nan.safetensors")]) == 1
    assert "NaN/Inf" in capsys.readouterr().out
    # shape mismatch against the given DiT
    wrong = tmp_path / "wrong.safetensors"
    save_file({f"{q}.lora_down.weight": torch.randn(4, 7), f"{q}.lora_up.weight": torch.randn(7, 4)}, wrong)
    assert main(["inspect", "--json", "--dit", str(dit_file), str(wrong)]) == 1
    assert json.loads(capsys.readouterr().out)["shape_errors"]
