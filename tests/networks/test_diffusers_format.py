"""save_format = "diffusers" / convert-network --to diffusers: the layout diffusers' own Anima loader reads.

The oracle is diffusers itself: the fixture DiT built as diffusers' CosmosTransformer3DModel + AnimaTextConditioner
(tests/support/diffusers_oracle.py) inside an object with diffusers' AnimaLoraLoaderMixin, loading our file with
`load_lora_weights` and fusing with `fuse_lora`; the reference is ComfyUI's merge (`apply_network_file`) of the
ComfyUI-named file of the same network.  Also measured here: what each loader does with each layout
(docs/formats.md, "Which loader reads which file").
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from anima_trainer.cli import main
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.models import load_dit
from anima_trainer.networks import NetworkError, apply_network_file, create_network
from anima_trainer.networks.convert import ModuleTable, convert_state_dict, linear_paths
from anima_trainer.networks.diffusers_format import (
    ALPHAS_META,
    check_diffusers_compatible,
    check_network_diffusers,
    comfy_path,
    comfy_to_diffusers,
    diffusers_stem,
    unmatched_diffusers_keys,
)
from anima_trainer.networks.formats import unmatched_keys
from anima_trainer.networks.merge import merge_base_weights
from anima_trainer.networks.rebuild import create_network_from_weights
from anima_trainer.demo import write_demo_configs
from tests.support.diffusers_oracle import load_diffusers_oracle, map_key
from tests.train.conftest import setup  # noqa: F401 - the demo models and shapes dataset (a fixture)

# every optional DiT target group plus the LLM adapter, and two ranks: all of diffusers' module names are used
ALL_TARGETS = {"train_llm_adapter": True, "train_adaln": True, "train_final_layer": True, "train_embedders": True,
               "network_reg_dims": ".*mlp.*=8"}


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def randomise(net, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def pipeline(dit_file):
    """diffusers' two Anima components of the fixture DiT inside diffusers' own LoRA loader mixin."""
    from diffusers.loaders.lora_pipeline import AnimaLoraLoaderMixin

    class Pipe(AnimaLoraLoaderMixin):  # what AnimaModularPipeline adds for loading: the components
        hf_device_map = None

        def __init__(self, transformer, text_conditioner):
            self.transformer, self.text_conditioner = transformer, text_conditioner

        @property
        def components(self):
            return {"transformer": self.transformer, "text_conditioner": self.text_conditioner}

    oracle = load_diffusers_oracle(dit_file)
    return Pipe(oracle.transformer, oracle.conditioner)


def lora_layers(pipe) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {f"{part}.{n}": m for part in ("transformer", "text_conditioner")
            for n, m in getattr(pipe, part).named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.fixture(scope="module")
def dit(dit_file):
    return load_dit(dit_file, dtype=torch.float32)  # the demo's tiny DiT: 2 blocks, width 64, full LLM adapter


@pytest.fixture(scope="module")
def files(dit, tmp_path_factory):
    """One network on every target group (dims 4 and 8, alpha 3: scales 3/4 and 3/8) in both layouts, and the
    default network (dim 4, alpha 1: scale 1/4, a power of two)."""
    tmp = tmp_path_factory.mktemp("dfmt")
    out = {}
    for name, kwargs in (("all", {"dim": 4, "alpha": 3.0, **ALL_TARGETS}), ("default", {})):
        net = create_network(dit, **kwargs)
        try:
            randomise(net, 7)
            out[name] = {"comfy": net.save(tmp / f"{name}_comfy.safetensors"),
                         "diffusers": net.save(tmp / f"{name}_diffusers.safetensors", save_format="diffusers"),
                         "modules": [m.path for m in net.lora_modules]}
        finally:
            net.remove()
    return out


@pytest.fixture(scope="module")
def comfy_merged(dit, files):
    """ComfyUI's merge of the `all` network into the fixture DiT (its state dict), the DiT left as it was."""
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    try:
        report = apply_network_file(dit, files["all"]["comfy"])
        assert not report["errors"] and not report["not_loaded"]
        return {k: v.clone() for k, v in dit.state_dict().items()}
    finally:
        dit.load_state_dict(base)


def fused_in_diffusers(pipe, name: str) -> torch.Tensor:
    """The fused weight of our DiT parameter `name` in diffusers' models (PEFT keeps it as base_layer.*)."""
    part, key = map_key("net." + name)
    sd = (pipe.transformer if part == "transformer" else pipe.text_conditioner).state_dict()
    if key not in sd:
        stem, _, leaf = key.rpartition(".")
        key = f"{stem}.base_layer.{leaf}"
    return sd[key]


# ------------------------------------------------------------------------------------------------ names --

def test_every_linear_has_the_diffusers_name_of_a_linear_of_the_same_shape(dit, dit_file):
    pipe = pipeline(dit_file)
    linears = linear_paths(dit)
    assert len(linears) == 49  # llm_adapter.out_proj too, which no network targets by default
    for path in linears:
        stem = diffusers_stem(path)
        assert stem is not None, path
        part, _, name = stem.partition(".")
        theirs = getattr(pipe, part).get_submodule(name)
        assert isinstance(theirs, torch.nn.Linear), stem
        assert theirs.weight.shape == dit.get_submodule(path).weight.shape, stem
        assert comfy_path(stem) == path
        # the same correspondence the oracle's checkpoint key map uses
        assert map_key(f"net.{path}.weight") == (("transformer" if part == "transformer" else "conditioner"),
                                                 f"{name}.weight")


# ------------------------------------------------------------------------ diffusers' own loader + fuse --

def test_diffusers_loads_every_key_and_fuses_to_comfyuis_merge(dit, files, comfy_merged, dit_file, caplog):
    tensors, meta = read(files["all"]["diffusers"])
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert any(k.startswith("text_conditioner.blocks.") for k in tensors)
    assert json.loads(meta[ALPHAS_META])  # the alphas, for reading the file back
    pipe = pipeline(dit_file)
    with caplog.at_level(logging.INFO, logger="diffusers"):
        pipe.load_lora_weights(str(files["all"]["diffusers"]))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # no unexpected/missing
    layers = lora_layers(pipe)
    modules = files["all"]["modules"]
    assert len(layers) == len(modules) == len(tensors) // 2 == 48
    for stem, layer in layers.items():  # each injected layer holds exactly the file's tensors: 0 unmatched keys
        (adapter,) = layer.lora_A.keys()
        assert torch.equal(layer.lora_A[adapter].weight, tensors[stem + ".lora_A.weight"])
        assert torch.equal(layer.lora_B[adapter].weight, tensors[stem + ".lora_B.weight"])
        assert layer.scaling[adapter] == 1.0  # the scale is in lora_B
    pipe.fuse_lora()
    patched = {m + ".weight" for m in modules}
    worst = 0.0
    for name, merged in comfy_merged.items():
        if map_key("net." + name) is None:
            continue
        got = fused_in_diffusers(pipe, name)
        err = (got - merged).abs().max().item()
        if name not in patched:
            assert err == 0.0, name
        worst = max(worst, err)
    assert worst <= 1e-5, worst  # measured: 1.5e-8 (the 10-block fixture DiT: 3e-8)


def test_default_network_fuses_bit_exactly(dit, files, dit_file):
    """Scale 1/4 (dim 4, alpha 1: the defaults) is a power of two: folding it into lora_B is exact, and diffusers'
    fused weights equal ComfyUI's merge bit for bit."""
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    try:
        apply_network_file(dit, files["default"]["comfy"])
        merged = dit.state_dict()
        pipe = pipeline(dit_file)
        pipe.load_lora_weights(str(files["default"]["diffusers"]))
        assert len(lora_layers(pipe)) == len(files["default"]["modules"]) == 20
        pipe.fuse_lora()
        for m in files["default"]["modules"]:
            assert torch.equal(fused_in_diffusers(pipe, m + ".weight"), merged[m + ".weight"]), m
    finally:
        dit.load_state_dict(base)


KINDS = {"lora": {}, "dora": {"dora_wd": True}, "lokr": {"algo": "lokr"}, "loha": {"algo": "loha"},
         "train_norm": {"train_norm": True}}


def test_what_each_loader_reads(dit, tmp_path, dit_file):
    """The measured rows of docs/formats.md's loader table (DiT side).  diffusers' Anima loader: every ComfyUI-
    named file is refused ("Invalid LoRA checkpoint": `.alpha`, `lokr_*`, `hada_*`, `w_norm` keys lack "lora";
    DoRA's dora_scale is dropped with a warning first); every kohya-named file loads without error and injects
    nothing; the diffusers layout injects every module.  ComfyUI's key rules: comfy and kohya names load, no key
    of the diffusers layout does."""
    pipe = pipeline(dit_file)
    for kind, kwargs in KINDS.items():
        net = create_network(dit, dim=4, alpha=1.0, **kwargs)
        try:
            randomise(net, 1)
            comfy = net.save(tmp_path / f"{kind}_c.safetensors")
            kohya = net.save(tmp_path / f"{kind}_k.safetensors", save_format="kohya")
            if kind == "lora":
                diffusers = net.save(tmp_path / "d.safetensors", save_format="diffusers")
        finally:
            net.remove()
        with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
            pipe.load_lora_weights(str(comfy))
        pipe.load_lora_weights(str(kohya))
        assert lora_layers(pipe) == {}, kind
        assert unmatched_keys(read(comfy)[0], dit) == unmatched_keys(read(kohya)[0], dit) == []
    pipe.load_lora_weights(str(diffusers))
    assert len(lora_layers(pipe)) == 20
    keys = list(read(diffusers)[0])
    assert unmatched_keys(keys, dit) == sorted(keys)  # ComfyUI: "lora key not loaded" for every key


# ----------------------------------------------------------------------------------------- round trips --

def test_comfy_diffusers_comfy_round_trip(files, tmp_path, dit_file):
    """Our files back from diffusers' layout: names, metadata, lora_down and alpha bit-identical; lora_up
    bit-identical when alpha/rank is a power of two, else within one fp32 rounding (ΔW to ~1e-7 relative)."""
    for name in ("default", "all"):
        src, back = files[name]["comfy"], tmp_path / f"{name}_back.safetensors"
        (ta, ma), (tb, mb) = read(src), read(_convert(files[name]["diffusers"], back, dit_file, "comfy"))
        assert sorted(ta) == sorted(tb)
        if name == "default":
            assert ma == mb
        else:  # lora_up differs by one fp32 rounding, so the hashes of the tensors (recomputed) differ too
            hashes = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
            assert {k: v for k, v in ma.items() if k not in hashes} == {k: v for k, v in mb.items() if k not in hashes}
            assert ma["sshs_model_hash"] != mb["sshs_model_hash"]
        for k, a in ta.items():
            b = tb[k]
            if name == "default" or not k.endswith(".lora_up.weight"):
                assert a.dtype == b.dtype and torch.equal(a, b), k
            else:
                assert (a - b).abs().max() <= 2e-7 * a.abs().max(), k
    # through kohya names too: diffusers → kohya → comfy
    kohya = _convert(files["default"]["diffusers"], tmp_path / "k.safetensors", dit_file, "kohya")
    (ta, ma), (tb, mb) = read(files["default"]["comfy"]), read(_convert(kohya, tmp_path / "kc.safetensors", dit_file,
                                                                        "comfy"))
    assert sorted(ta) == sorted(tb) and ma == mb and all(torch.equal(ta[k], tb[k]) for k in ta)


def _convert(src, dst, dit_file, to, *extra):
    assert main(["convert-network", str(src), str(dst), "--to", to, "--dit", str(dit_file), *extra]) == 0
    return dst


def test_convert_to_diffusers_equals_the_saved_file(files, tmp_path, dit_file):
    """convert-network --to diffusers of the ComfyUI file and of its kohya rename give the file save wrote."""
    saved = read(files["all"]["diffusers"])
    kohya = _convert(files["all"]["comfy"], tmp_path / "k.safetensors", dit_file, "kohya")
    for src in (files["all"]["comfy"], kohya):
        (t, m) = read(_convert(src, tmp_path / "d.safetensors", dit_file, "diffusers", "--overwrite"))
        assert sorted(t) == sorted(saved[0]) and all(torch.equal(t[k], saved[0][k]) for k in t)
        assert m == saved[1]


def test_network_weights_and_dim_from_weights_read_the_diffusers_file(dit, files):
    ref = read(files["default"]["comfy"])[0]
    net = create_network(dit)
    try:
        net.load_weights(files["default"]["diffusers"])
        for m in net.lora_modules:
            for suffix, p in m.tensors().items():
                assert torch.equal(p, ref["diffusion_model." + m.path + suffix]), m.path
    finally:
        net.remove()
    net = create_network_from_weights(dit, files["all"]["diffusers"])
    try:
        comfy = read(files["all"]["comfy"])[0]
        assert len(net.lora_modules) == 48
        for m in net.lora_modules:
            assert (m.dim, float(m.alpha)) == (comfy["diffusion_model." + m.path + ".lora_down.weight"].shape[0], 3.0)
            assert torch.equal(m.lora_down.weight, comfy["diffusion_model." + m.path + ".lora_down.weight"])
    finally:
        net.remove()


def test_merge_and_inspect_read_the_diffusers_file(dit, files, tmp_path, dit_file, capsys):
    merged = {}
    for layout in ("comfy", "diffusers"):
        out = tmp_path / f"m_{layout}.safetensors"
        assert main(["merge", "--dit", str(dit_file), "--network", str(files["default"][layout]),
                     "--out", str(out)]) == 0
        merged[layout] = read(out)[0]
    assert all(torch.equal(merged["comfy"][k], merged["diffusers"][k]) for k in merged["comfy"])
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    try:  # base_weights (and `sample --network`) read it the same way
        for layout in ("comfy", "diffusers"):
            dit.load_state_dict(base)
            assert merge_base_weights(dit, [files["default"][layout]])[0][2] == 20
            merged[layout] = {k: v.clone() for k, v in dit.state_dict().items()}
    finally:
        dit.load_state_dict(base)
    assert all(torch.equal(merged["comfy"][k], merged["diffusers"][k]) for k in merged["comfy"])
    capsys.readouterr()
    assert main(["inspect", str(files["all"]["diffusers"]), "--dit", str(dit_file)]) == 0
    text = capsys.readouterr().out
    assert "layout: diffusers" in text and "OK: diffusers' Anima loader loads every key" in text
    assert "48 module(s) from 96 tensor(s)" in text and "scales: {'0.75': 38, '0.375': 10}" in text


def test_a_third_party_diffusers_file_without_our_record_reads_with_scale_1(dit):
    """No ALPHAS_META record: alpha = rank (scale 1, what diffusers applies).  A PEFT-style file under
    `transformer.` with our own module paths is not diffusers' layout and keeps the generic reading."""
    g = torch.Generator().manual_seed(0)
    mlp = dit.llm_adapter.blocks[0].mlp[0]
    a, b = torch.randn(2, mlp.in_features, generator=g), torch.randn(mlp.out_features, 2, generator=g)
    table = ModuleTable.from_dit(dit)
    out, _ = convert_state_dict({"text_conditioner.blocks.0.mlp.0.lora_A.weight": a,
                                 "text_conditioner.blocks.0.mlp.0.lora_B.weight": b}, {}, "comfy", table)
    stem = "diffusion_model.llm_adapter.blocks.0.mlp.0"
    assert torch.equal(out[stem + ".lora_down.weight"], a) and torch.equal(out[stem + ".lora_up.weight"], b)
    assert float(out[stem + ".alpha"]) == 2.0
    ours = {"transformer.blocks.0.mlp.layer1.lora_A.weight": torch.zeros(2, 64),
            "transformer.blocks.0.mlp.layer1.lora_B.weight": torch.zeros(256, 2)}
    assert unmatched_diffusers_keys(ours, linear_paths(dit)) == sorted(ours)
    out, _ = convert_state_dict(ours, {}, "comfy", table)
    assert sorted(out) == [f"diffusion_model.blocks.0.mlp.layer1.{s}" for s in ("alpha", "lora_A.weight",
                                                                             "lora_B.weight")]


# ------------------------------------------------------------------------------------------- refusals --

@pytest.mark.parametrize("kind,kwargs,words", [
    ("lokr", {"algo": "lokr"}, "network_module lokr"),
    ("loha", {"algo": "loha"}, "network_module loha"),
    ("dora", {"dora_wd": True}, "dora_wd (DoRA"),
    ("train_norm", {"train_norm": True}, "train_norm"),
])
def test_save_refuses_what_the_layout_cannot_carry(dit, tmp_path, kind, kwargs, words):
    net = create_network(dit, **kwargs)
    try:
        with pytest.raises(NetworkError) as e:
            net.save(tmp_path / "x.safetensors", save_format="diffusers")
        with pytest.raises(NetworkError) as at_start:  # what training calls after building the network
            check_network_diffusers(net)
    finally:
        net.remove()
    for err in (e, at_start):
        assert words in str(err.value) and 'save_format = "comfy"' in str(err.value)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_start_up_check_passes_lora_and_refuses_text_encoder_modules(dit):
    net = create_network(dit, **ALL_TARGETS)
    try:
        check_network_diffusers(net)
    finally:
        net.remove()
    with pytest.raises(NetworkError, match=r"text-encoder modules \(diffusers' Anima loader \(AnimaLoraLoaderMixin\) "
                                           r"has no Qwen3 text encoder; train with network_train_unet_only = true\)"):
        check_diffusers_compatible("lora", {}, text_encoder=True)


def test_conversion_refusals_name_modules_and_the_alternative(fixture_dir, tmp_path, capsys):
    for case, words in (("loha", "LoHa: "), ("lokr_w1full_w2lowrank", "LoKr: "),
                        ("diff_diffb_wnorm_setweight", "full-weight diffs")):
        src = fixture_dir / "lora_examples" / f"{case}.safetensors"
        assert main(["convert-network", str(src), str(tmp_path / "o.safetensors"), "--to", "diffusers"]) == 2
        err = capsys.readouterr().err
        assert words in err and 'save_format = "comfy"' in err and "nothing written" in err, err
        assert not (tmp_path / "o.safetensors").exists()
    te = {"text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.q_proj.lora_down.weight": torch.zeros(2, 8),
          "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.q_proj.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(NetworkError, match=r"text-encoder modules \(text_encoders\.\*: no text-encoder component\)"):
        comfy_to_diffusers(te, set())


def test_config_refuses_diffusers_with_what_it_cannot_carry(tmp_path):
    required = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "q.safetensors", "--vae",
                "v.safetensors", "--output_dir", "out", "--dataset_config", "d.toml"]
    toml = tmp_path / "train.toml"
    toml.write_text('save_format = "diffusers"\nnetwork_module = "networks.lokr"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        parse_train_args([*required, "--config_file", str(toml)])
    assert 'save_format = "diffusers": cannot carry network_module lokr' in str(e.value)
    assert "train.toml line 1" in str(e.value) and 'save_format = "comfy"' in str(e.value)
    with pytest.raises(ConfigError, match="dora_wd"):
        parse_train_args([*required, "--save_format", "diffusers", "--network_args", "dora_wd=true"])
    with pytest.raises(ConfigError, match="sd-scripts-anima turns it on by default: set train_norm = false"):
        parse_train_args([*required, "--save_format", "diffusers", "--sd_scripts_anima_defaults", "true"])
    assert parse_train_args([*required, "--save_format", "diffusers", "--sd_scripts_anima_defaults", "true",
                             "--train_norm", "false"]).save_format == "diffusers"
    # kohya's default trains the text encoder too, which diffusers' Anima loader cannot take
    with pytest.raises(ConfigError, match="cannot carry text-encoder modules.*network_train_unet_only = true"):
        parse_train_args([*required, "--save_format", "diffusers"])
    assert parse_train_args([*required, "--save_format", "diffusers", "--network_train_unet_only"]
                            ).save_format == "diffusers"
    assert parse_train_args([*required, "--save_format", "diffusers", "--cache_text_encoder_outputs"]
                            ).save_format == "diffusers"  # a text cache: the DiT only


# ------------------------------------------------------------------------------------------- training --

def test_a_training_run_saves_what_diffusers_loads(setup, tmp_path):  # noqa: F811
    """`save_format = "diffusers"` in a real run (the demo config, alpha 4 on dim 8: scale 1/2, plus the LLM
    adapter): the final file loads in diffusers' loader with every module injected and fuses to ComfyUI's merge
    of the same network; network_weights reads it back into the same factors."""
    from anima_trainer.train.loop import run_training

    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=2)
    cfg = parse_train_args(["--config_file", str(toml), "--save_format", "diffusers", "--network_alpha", "4",
                            "--network_args", "train_llm_adapter=true"])
    run = run_training(cfg)
    tensors, meta = read(run.final_path)
    assert all(k.startswith(("transformer.", "text_conditioner.")) for k in tensors) and "ss_network_dim" in meta
    assert all(m.lora_up.weight.abs().max() > 0 for m in run.network.lora_modules)  # trained: every ΔW ≠ 0
    comfy = run.network.save(tmp_path / "comfy.safetensors")
    dit_path = setup["models"]["dit"]
    merged = load_dit(dit_path, dtype=torch.float32)
    apply_network_file(merged, comfy)
    pipe = pipeline(dit_path)
    pipe.load_lora_weights(str(run.final_path))
    assert len(lora_layers(pipe)) == len(run.network.lora_modules) == len(tensors) // 2
    pipe.fuse_lora()
    for m in run.network.lora_modules:  # scale 1/2 is a power of two: bit-exact
        assert torch.equal(fused_in_diffusers(pipe, m.path + ".weight"), merged.state_dict()[m.path + ".weight"])
    fresh = create_network(load_dit(dit_path, dtype=torch.float32), dim=8, alpha=4.0, train_llm_adapter=True)
    fresh.load_weights(run.final_path)
    for a, b in zip(fresh.lora_modules, run.network.lora_modules, strict=True):
        assert a.path == b.path and all(torch.equal(p, q) for p, q in zip(a.tensors().values(),
                                                                          b.tensors().values(), strict=True))
