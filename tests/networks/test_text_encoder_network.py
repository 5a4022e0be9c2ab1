"""Qwen3 text-encoder adapters (kohya's lora_te_* modules): targets, identity at start, files ComfyUI applies,
kohya names, the save check, learning rates, rebuild from a file, base_weights and the merge command."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anima_trainer.cli import main
from anima_trainer.demo import write_tiny_qwen3
from anima_trainer.models.text import load_qwen3
from anima_trainer.networks import (
    TE_COMFY_PREFIX,
    NetworkError,
    apply_text_encoder_file,
    check_comfy_keys,
    comfy_skipped_keys,
    create_network,
    create_network_from_weights,
)
from anima_trainer.networks.convert import build_meta_dit, build_meta_qwen3
from anima_trainer.tools.convert import convert_network
from anima_trainer.networks.files import save_format_notice
from anima_trainer.tools.inspect import inspect_network
from anima_trainer.networks.merge import merge_base_weights

IDS = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
ALGOS = {"lora": ("lora", {}), "lora-dora": ("lora", {"dora_wd": "true"}), "lokr": ("lokr", {}),
         "loha": ("loha", {})}


@pytest.fixture(scope="module")
def qwen3_file(tmp_path_factory):
    return write_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "tiny_qwen3.safetensors")


@pytest.fixture
def qwen3(qwen3_file):
    """A fresh fp32 tiny Qwen3Model, loaded as training loads the text encoder (models/text.py)."""
    return load_qwen3(qwen3_file, dtype=torch.float32)


def hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def randomise(net, seed: int = 3) -> None:
    """Every factor away from its initialisation (a fresh network has a zero factor: no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------ targets --

@pytest.fixture(scope="module")
def meta_models():
    return build_meta_dit(), build_meta_qwen3()


@pytest.mark.parametrize(("kw", "dit_count", "te_count"), [
    ({}, 280, 196),  # kohya: 10 Linear per DiT block × 28; 7 per Qwen3 layer (q,k,v,o,gate,up,down) × 28
    ({"train_dit": False}, 0, 196),  # network_train_text_encoder_only
    ({"exclude_patterns": "['.*mlp.*']"}, 224, 112),  # DiT: 8 per block (no mlp.layer1/2); TE: 4 per layer
    ({"network_reg_dims": r"layers\.\d+\.mlp\..*=0"}, 280, 112),  # reg_dims reaches TE paths; 0 skips
])
def test_module_counts_on_the_full_size_models(meta_models, kw, dit_count, te_count):
    dit, te = meta_models
    net = create_network(dit, "lora", 4, 1.0, text_encoder=te, **kw)
    try:
        assert (len(net.dit_modules()), len(net.text_encoder_modules())) == (dit_count, te_count)
        assert net.trains_text_encoder == (te_count > 0) and net.trains_dit == (dit_count > 0)
        te_names = [n for n in net.modules_by_name if n.startswith("text_encoder.")]
        assert len(te_names) == te_count and not any(n.startswith("text_encoder.") for n in
                                                     (m.name for m in net.dit_modules()))
    finally:
        net.remove()


def test_text_encoder_targets_are_kohyas(meta_models):
    dit, te = meta_models
    net = create_network(dit, "lora", 4, 1.0, text_encoder=te)
    try:
        layer0 = [m.path for m in net.text_encoder_modules()[:7]]
        assert layer0 == [f"layers.0.self_attn.{p}_proj" for p in "qkvo"] + [
            f"layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
        assert all(m.model == "text_encoder" and m.name == "text_encoder." + m.path
                   for m in net.text_encoder_modules())
        # the DiT modules come first and keep their names and state_dict positions (resume files)
        assert list(net.modules_by_name)[:2] == ["blocks.0.self_attn.q_proj", "blocks.0.self_attn.k_proj"]
        assert net.lora_modules[0].model == "dit"
        assert net.lora_modules[280].name == "text_encoder.layers.0.self_attn.q_proj"
    finally:
        net.remove()


def test_target_modules_mode_gives_the_text_encoder_kohyas_targets(meta_models):
    dit, te = meta_models
    net = create_network(dit, "lora", 4, 1.0, text_encoder=te, target_modules="self_attn.q_proj")
    try:
        # sd-scripts-anima's rule: the suffix matches the 28 DiT blocks and the LLM adapter's 6 blocks
        assert len(net.dit_modules()) == 28 + 6 and len(net.text_encoder_modules()) == 196
    finally:
        net.remove()


def test_nothing_to_train_is_an_error(dit, qwen3):
    with pytest.raises(NetworkError, match="train_dit is off .* and no text encoder was given"):
        create_network(dit, train_dit=False)
    with pytest.raises(NetworkError, match="no DiT or text-encoder module matches the network targets"):
        create_network(dit, text_encoder=qwen3, train_dit=False, exclude_patterns="['.*']")


# ---------------------------------------------------------------------------------------------- identity --

@pytest.mark.parametrize("case", ["lora", "lokr", "loha"])
def test_fresh_text_encoder_network_leaves_the_encoder_bit_identical(dit, qwen3, case):
    before = hidden(qwen3)
    net = create_network(dit, ALGOS[case][0], 4, 2.0, text_encoder=qwen3)
    assert len(net.text_encoder_modules()) == 14  # tiny Qwen3: 2 layers
    assert torch.equal(hidden(qwen3), before)
    randomise(net)
    assert not torch.allclose(hidden(qwen3), before)  # the patch is live
    net.remove()
    assert torch.equal(hidden(qwen3), before)


# ------------------------------------------------------------------------------------- files ComfyUI applies --

@pytest.mark.parametrize("case", list(ALGOS))
def test_comfy_file_merged_with_comfyui_rules_reproduces_the_adapted_encoder(dit, qwen3, qwen3_file, case,
                                                                             tmp_path):
    algo, args = ALGOS[case]
    net = create_network(dit, algo, 4, 2.0, text_encoder=qwen3, **args)
    randomise(net)
    want = hidden(qwen3)
    comfy = net.save(tmp_path / "te.safetensors")
    keys = list(load_file(comfy))
    assert "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.q_proj.alpha" in keys
    merged = load_qwen3(qwen3_file, dtype=torch.float32)
    report = apply_text_encoder_file(merged, comfy, kohya_names=False)  # ComfyUI: only its CLIP names
    assert len(report["patched"]) == 14 and not report["errors"]
    assert all(k.startswith("diffusion_model.") for k in report["not_loaded"])  # the DiT half
    torch.testing.assert_close(hidden(merged), want, rtol=0, atol=1e-5)

    # kohya's file: ComfyUI skips lora_te_*; after convert-network --to comfy it applies the same weights
    kohya = net.save(tmp_path / "te_kohya.safetensors", save_format="kohya")
    skipped = load_qwen3(qwen3_file, dtype=torch.float32)
    assert apply_text_encoder_file(skipped, kohya, kohya_names=False)["patched"] == []
    assert main(["convert-network", str(kohya), str(tmp_path / "back.safetensors"), "--to", "comfy",
                 "--qwen3", str(qwen3_file)]) == 0
    merged2 = load_qwen3(qwen3_file, dtype=torch.float32)
    assert len(apply_text_encoder_file(merged2, tmp_path / "back.safetensors", kohya_names=False)["patched"]) == 14
    torch.testing.assert_close(hidden(merged2), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- kohya names --

def test_kohya_names_round_trip_bit_exactly(dit, qwen3, qwen3_file, tmp_path):
    net = create_network(dit, "lora", 4, 2.0, text_encoder=qwen3)
    randomise(net)
    comfy = net.save(tmp_path / "a.safetensors")
    kohya = net.save(tmp_path / "a_kohya.safetensors", save_format="kohya")
    k = load_file(kohya)
    assert "lora_te_layers_1_mlp_down_proj.lora_up.weight" in k and "lora_te_layers_0_self_attn_q_proj.alpha" in k
    assert sum(name.startswith("lora_unet_") for name in k) == 3 * len(net.dit_modules())

    te = build_meta_qwen3(qwen3_file)
    convert_network(comfy, tmp_path / "b_kohya.safetensors", "kohya", dit=dit, text_encoder=te)
    convert_network(tmp_path / "b_kohya.safetensors", tmp_path / "c.safetensors", "comfy", dit=dit, text_encoder=te)
    a, b, c = load_file(comfy), load_file(tmp_path / "b_kohya.safetensors"), load_file(tmp_path / "c.safetensors")
    assert b.keys() == k.keys() and all(torch.equal(b[n], k[n]) for n in k)  # converter = kohya save
    assert c.keys() == a.keys() and all(torch.equal(c[n], a[n]) for n in a)

    net.remove()
    fresh = create_network(dit, "lora", 4, 2.0, text_encoder=load_qwen3(qwen3_file, dtype=torch.float32))
    fresh.load_weights(kohya)
    assert all(torch.equal(fresh.state_tensors()[n], t) for n, t in net.state_tensors().items())


# ----------------------------------------------------------------------------------------- the save check --

def test_save_check_covers_the_text_encoder(dit, qwen3, tmp_path):
    net = create_network(dit, "lokr", 4, 2.0, text_encoder=qwen3)
    comfy_keys = list(net.state_tensors())
    check_comfy_keys(comfy_keys, dit, qwen3)  # every key, TE included, in ComfyUI's maps
    bad = TE_COMFY_PREFIX + "layers.0.self_attn.qq_proj.lokr_w1"
    with pytest.raises(NetworkError, match=r"1 key\(s\) would not be loaded by ComfyUI .*text-encoder keys are "
                                           r"'text_encoders\.qwen3_06b\.transformer\.model\.<module path>.*qq_proj"):
        check_comfy_keys([*comfy_keys, bad], dit, qwen3)
    with pytest.raises(NetworkError, match="text-encoder keys, checked only against a Qwen3 text encoder"):
        check_comfy_keys(comfy_keys, dit)
    kohya_keys = list(net.state_tensors(save_format="kohya"))
    check_comfy_keys(kohya_keys, dit, qwen3)  # kohya's TE names name real Qwen3 modules: not an error
    with pytest.raises(NetworkError, match="lora_te_layers_0_self_attn_qq_proj"):
        check_comfy_keys([*kohya_keys, "lora_te_layers_0_self_attn_qq_proj.alpha"], dit, qwen3)
    skipped = comfy_skipped_keys(kohya_keys)
    assert skipped == sorted(k for k in kohya_keys if k.startswith("lora_te_"))
    assert len({k.split(".")[0] for k in skipped}) == 14
    assert comfy_skipped_keys(comfy_keys) == []

    def wrong(dtype=None, save_format="comfy"):  # a save whose TE name is misspelt is refused, nothing written
        out = dict(real(dtype, save_format))
        out[bad] = out.pop(TE_COMFY_PREFIX + "layers.0.self_attn.q_proj.lokr_w1")
        return out

    real = net.state_tensors
    net.state_tensors = wrong
    with pytest.raises(NetworkError, match="qq_proj"):
        net.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    del net.state_tensors
    assert comfy_skipped_keys(net.save(tmp_path / "k.safetensors", save_format="kohya")) == skipped
    assert "ComfyUI loads only the DiT part" in save_format_notice(net, "kohya")
    assert save_format_notice(net, "comfy") is None
    net.remove()
    assert save_format_notice(create_network(dit, "lora"), "kohya") is None  # no TE modules: every key loads


# ------------------------------------------------------------------------------------------- param groups --

def group_lrs(groups):
    return {g["name"]: (g["lr"], len(g["params"])) for g in groups}


def test_text_encoder_learning_rates(dit, qwen3):
    net = create_network(dit, "lora", 4, 1.0, text_encoder=qwen3)
    n_dit = len(net.dit_modules())
    # kohya's default_lr: text_encoder_lr unset → the base lr
    assert group_lrs(net.param_groups(1e-4)) == {"base": (1e-4, 2 * n_dit), "text_encoder": (1e-4, 28)}
    assert group_lrs(net.param_groups(1e-4, text_encoder_lr=5e-5)) == {"base": (1e-4, 2 * n_dit),
                                                                       "text_encoder": (5e-5, 28)}
    # text_encoder_lr 0: the TE group is dropped and frozen, the DiT trains
    groups = net.param_groups(1e-4, text_encoder_lr=0.0)
    assert group_lrs(groups) == {"base": (1e-4, 2 * n_dit)}
    assert not any(p.requires_grad for m in net.text_encoder_modules() for p in m.tensors().values())
    net.remove()


def test_text_encoder_reg_lrs_and_loraplus(dit, qwen3):
    net = create_network(dit, "lora", 4, 1.0, text_encoder=qwen3, loraplus_lr_ratio="4",
                         loraplus_text_encoder_lr_ratio="16", network_reg_lrs=r"layers\.1\..*=3e-5,.*mlp.*=2e-5")
    n_dit_mlp = sum(".mlp." in m.path for m in net.dit_modules())
    n_dit = len(net.dit_modules()) - n_dit_mlp
    got = group_lrs(net.param_groups(1e-4, text_encoder_lr=5e-5))
    assert got == {
        "base": (1e-4, n_dit), "base/plus": (4e-4, n_dit),
        "reg_lr=2e-05": (2e-5, n_dit_mlp), "reg_lr=2e-05/plus": (8e-5, n_dit_mlp),
        # TE layer 0: attention 4 at text_encoder_lr, mlp 3 by the second rule; layer 1: 7 by the first rule
        "text_encoder": (5e-5, 4), "text_encoder/plus": (8e-4, 4),
        "text_encoder/reg_lr=2e-05": (2e-5, 3), "text_encoder/reg_lr=2e-05/plus": (3.2e-4, 3),
        "text_encoder/reg_lr=3e-05": (3e-5, 7), "text_encoder/reg_lr=3e-05/plus": (4.8e-4, 7),
    }
    net.remove()
    # no TE ratio: the general one; the unet ratio is the DiT's only
    net = create_network(dit, "lora", 4, 1.0, text_encoder=qwen3, loraplus_lr_ratio="4",
                         loraplus_unet_lr_ratio="8")
    got = group_lrs(net.param_groups(1e-4))
    assert got["base/plus"][0] == pytest.approx(8e-4) and got["text_encoder/plus"][0] == pytest.approx(4e-4)
    net.remove()


# -------------------------------------------------------------------------------- rebuild and load errors --

def test_dim_from_weights_rebuilds_text_encoder_modules(dit, qwen3, qwen3_file, tmp_path):
    net = create_network(dit, "lora", 4, 2.0, text_encoder=qwen3, network_reg_dims=r".*mlp.*=2")
    randomise(net)
    want = hidden(qwen3)
    f = net.save(tmp_path / "n.safetensors", save_format="kohya")
    net.remove()
    rebuilt = create_network_from_weights(dit, f, text_encoder=qwen3)
    assert {n: m.dim for n, m in rebuilt.modules_by_name.items()} == {
        n: (2 if ".mlp." in n else 4) for n in net.modules_by_name}
    assert torch.equal(hidden(qwen3), want)
    rebuilt.remove()
    # a text-encoder-only file rebuilds a text-encoder-only network
    te_only = create_network(dit, "loha", 3, 1.0, text_encoder=qwen3, train_dit=False)
    g = te_only.save(tmp_path / "te_only.safetensors")
    te_only.remove()
    again = create_network_from_weights(dit, g, text_encoder=qwen3)
    assert not again.trains_dit and len(again.text_encoder_modules()) == 14 and again.algo == "loha"
    again.remove()
    with pytest.raises(NetworkError, match=r"n\.safetensors: the file has 42 text-encoder \(Qwen3\) key\(s\).*no "
                                           r"text-encoder modules; train the text encoder too"):
        create_network_from_weights(dit, f)


def test_load_weights_errors_name_what_to_change(dit, qwen3, tmp_path):
    both = create_network(dit, "lora", 4, 1.0, text_encoder=qwen3)
    with_te = both.save(tmp_path / "with_te.safetensors")
    both.remove()
    dit_only = create_network(dit, "lora", 4, 1.0)
    without_te = dit_only.save(tmp_path / "without_te.safetensors")
    with pytest.raises(NetworkError, match=r"with_te\.safetensors: the file has 42 text-encoder \(Qwen3\) key\(s\), "
                                           r".*this network has no text-encoder modules.*network_train_unet_only"):
        dit_only.load_weights(with_te)
    dit_only.remove()
    te_net = create_network(dit, "lora", 4, 1.0, text_encoder=qwen3)
    with pytest.raises(NetworkError, match=r"no lora_down\.weight/lora_up\.weight weights for 14 module\(s\).*"
                                           r"trained for the DiT only.*network_train_unet_only = true"):
        te_net.load_weights(without_te)
    te_net.remove()
    te_only = create_network(dit, "lora", 4, 1.0, text_encoder=qwen3, train_dit=False)
    with pytest.raises(NetworkError, match=r"the file has 60 DiT key\(s\).*trains the text encoder only "
                                           r"\(network_train_text_encoder_only\)"):
        te_only.load_weights(with_te)
    te_only.remove()


# ------------------------------------------------------------------------------ base_weights, merge, inspect --

def test_base_weights_merge_into_the_text_encoder(dit, qwen3, qwen3_file, tmp_path):
    net = create_network(dit, "lora", 4, 2.0, text_encoder=qwen3)
    randomise(net)
    want = hidden(qwen3)
    f = net.save(tmp_path / "base.safetensors", save_format="kohya")  # kohya's merge_to reads lora_te_*
    net.remove()
    fresh = load_qwen3(qwen3_file, dtype=torch.float32)
    done = merge_base_weights(dit, [f], [1.0], text_encoder=fresh)
    assert done[0][2] == len(net.dit_modules()) + 14
    torch.testing.assert_close(hidden(fresh), want, rtol=0, atol=1e-5)


def test_merge_bakes_text_encoder_modules_into_a_qwen3_file(dit_file, qwen3_file, tmp_path, capsys):
    from anima_trainer.models import load_dit

    dit = load_dit(dit_file, dtype=torch.float32)
    qwen3 = load_qwen3(qwen3_file, dtype=torch.float32)
    net = create_network(dit, "lora", 4, 2.0, text_encoder=qwen3)
    randomise(net)
    want = hidden(qwen3)
    f = net.save(tmp_path / "n.safetensors")
    net.remove()
    out_dit, out_te = tmp_path / "dit_merged.safetensors", tmp_path / "qwen3_merged.safetensors"
    # no --qwen3: the DiT checkpoint cannot hold the TE half; refused, nothing written
    assert main(["merge", "--dit", str(dit_file), "--network", str(f), "--out", str(out_dit)]) == 2
    assert "add --qwen3 QWEN3_FILE --qwen3-out OUT" in capsys.readouterr().err and not out_dit.exists()
    assert main(["merge", "--dit", str(dit_file), "--network", str(f), "--out", str(out_dit),
                 "--qwen3", str(qwen3_file), "--qwen3-out", str(out_te)]) == 0
    assert "14 text-encoder weights patched" in capsys.readouterr().out
    with safe_open(str(qwen3_file), "pt") as a, safe_open(str(out_te), "pt") as b:
        assert list(a.keys()) == list(b.keys())  # the input's layout (`model.*`) and dtypes
        assert all(a.get_slice(k).get_dtype() == b.get_slice(k).get_dtype() for k in a.keys())  # noqa: SIM118
    torch.testing.assert_close(hidden(load_qwen3(out_te, dtype=torch.float32)), want, rtol=0, atol=1e-5)
    # text encoder only
    out_te2 = tmp_path / "qwen3_only.safetensors"
    assert main(["merge", "--network", f"{f}:0.5", "--qwen3", str(qwen3_file), "--qwen3-out", str(out_te2)]) == 0
    assert not torch.allclose(hidden(load_qwen3(out_te2, dtype=torch.float32)), want, atol=1e-5)


def test_inspect_counts_modules_per_model(dit, qwen3, qwen3_file, tmp_path, capsys):
    net = create_network(dit, "lora", 4, 2.0, text_encoder=qwen3)
    kohya = net.save(tmp_path / "k.safetensors", save_format="kohya")
    comfy = net.save(tmp_path / "c.safetensors")
    for f, skipped in ((comfy, 0), (kohya, 42)):
        r = inspect_network(f, dit, text_encoder=qwen3)
        assert r["modules_by_model"] == {"dit": len(net.dit_modules()), "text_encoder": 14}
        assert not r["broken"] and len(r["comfy_skipped_keys"]) == skipped
    net.remove()
    assert main(["inspect", str(kohya), "--qwen3", str(qwen3_file)]) == 0
    out = capsys.readouterr().out
    assert f"modules per model: dit {len(net.dit_modules())}, text_encoder 14" in out
    assert "ComfyUI loads every key but the kohya-named text-encoder ones" in out and "lora_te_* names" in out


def test_apply_text_encoder_file_math_is_formats(qwen3, tmp_path):
    """The one-module case by hand: W + m·(alpha/r)·up@down on the Qwen3 weight (ComfyUI's lora patch)."""
    up, down = torch.randn(64, 2), torch.randn(2, 64)
    key = TE_COMFY_PREFIX + "layers.1.self_attn.o_proj"
    save_file({key + ".lora_up.weight": up, key + ".lora_down.weight": down, key + ".alpha": torch.tensor(1.0)},
              tmp_path / "one.safetensors")
    w0 = qwen3.layers[1].self_attn.o_proj.weight.detach().clone()
    report = apply_text_encoder_file(qwen3, tmp_path / "one.safetensors", 0.5)
    assert report["patched"] == ["layers.1.self_attn.o_proj.weight"]
    torch.testing.assert_close(qwen3.layers[1].self_attn.o_proj.weight, w0 + 0.5 * 0.5 * up @ down)


def test_sample_command_applies_the_text_encoder_modules(tmp_path, capsys):
    """`sample --network` merges a file's text-encoder modules into Qwen3 too (ComfyUI's LoraLoader does)."""
    from anima_trainer.demo import write_demo_models
    from anima_trainer.models import load_dit

    models = write_demo_models(tmp_path / "models")
    dit = load_dit(models["dit"], dtype=torch.float32)
    qwen3 = load_qwen3(models["qwen3"], dtype=torch.float32)
    net = create_network(dit, "lora", 4, 4.0, text_encoder=qwen3, train_dit=False)
    randomise(net, seed=5)
    te_only = net.save(tmp_path / "te_only.safetensors")

    def sample(out, *extra):
        return main(["sample", "--dit", str(models["dit"]), "--qwen3", str(models["qwen3"]), "--vae",
                     str(models["vae"]), "--qwen3_tokenizer_path", str(models["tokenizers"]),
                     "--prompt", "a red circle",
                     "--steps", "2", "--width", "32", "--height", "32", "--seed", "1", "--no_progress", "--out",
                     str(tmp_path / out), *extra])

    assert sample("base.png") == 0
    assert sample("zero.png", "--network", str(te_only), "--network_mul", "0") == 0
    assert sample("te.png", "--network", str(te_only)) == 0
    assert "would not load" not in capsys.readouterr().err
    from PIL import Image

    pixels = [Image.open(tmp_path / f).tobytes() for f in ("base.png", "zero.png", "te.png")]
    assert pixels[0] == pixels[1] and pixels[2] != pixels[0]


def test_peft_style_text_encoder_names_load(dit, qwen3, qwen3_file, tmp_path, capsys):
    net = create_network(dit, "lora", 4, 2.0, text_encoder=qwen3, train_dit=False)
    randomise(net)
    spelling = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight", ".alpha": ".alpha"}
    peft = {}
    for key, t in net.state_tensors().items():
        stem, suffix = next((key[: -len(s)], s) for s in spelling if key.endswith(s))
        head = "text_encoder.model." if ".mlp." in stem else "text_encoder."  # Qwen3ForCausalLM's PEFT names too
        peft[head + stem[len(TE_COMFY_PREFIX):] + spelling[suffix]] = t
    save_file(peft, tmp_path / "peft.safetensors")
    net.remove()
    fresh = create_network(dit, "lora", 4, 2.0, text_encoder=load_qwen3(qwen3_file, dtype=torch.float32),
                           train_dit=False)
    fresh.load_weights(tmp_path / "peft.safetensors")
    assert all(torch.equal(fresh.state_tensors()[n], t) for n, t in net.state_tensors().items())
    # convert-network --to kohya: the note that ComfyUI loads only the DiT part of such a file
    assert main(["convert-network", str(tmp_path / "peft.safetensors"), str(tmp_path / "k.safetensors"), "--to",
                 "kohya"]) == 0
    assert "42 text-encoder key(s) use kohya's lora_te_* names, which ComfyUI does not load" in capsys.readouterr().err
    assert "lora_te_layers_0_mlp_up_proj.lora_down.weight" in load_file(tmp_path / "k.safetensors")


@pytest.mark.parametrize("case", ["lora", "lokr", "loha", "lora-dora"])
def test_bf16_encoder_trains_fp32_factors(dit, qwen3_file, case):
    """As training runs it: a frozen bf16 Qwen3, fp32 factors; every factor gets a finite gradient once the
    zero-initialised one is non-zero."""
    algo, args = ALGOS[case]
    qwen3 = load_qwen3(qwen3_file, dtype=torch.bfloat16)
    net = create_network(dit, algo, 4, 2.0, text_encoder=qwen3, train_dit=False, **args)
    randomise(net)
    out = qwen3(input_ids=IDS).last_hidden_state
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for m in net.text_encoder_modules():
        for suffix, p in m.tensors().items():
            assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), (m.name, suffix)
    assert all(p.grad is None for p in qwen3.parameters())  # the encoder itself stays frozen
