"""Issue 15 item 4: the base models users actually have.

* a diffusers-layout Anima folder (what diffusers' `save_pretrained` writes: transformer/ sharded, text_conditioner/,
  text_encoder/, tokenizer/, t5_tokenizer/, vae/) for every model flag, given the root or the component's subfolder:
  the loaded tensors equal the single-file load bit for bit;
* community merges and exports: extra non-weight keys, keys outside the DiT prefix, an adapter kept elsewhere;
* float8 and ComfyUI scaled-float8 files of each component (DiT, LLM adapter, Qwen3, VAE).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer import cli
from anima_trainer.demo import write_demo_models
from anima_trainer.models import inspect_file, load_dit, load_text_encoder, load_vae
from anima_trainer.models.model_files import ModelFileError, WrongModelFileError
from anima_trainer.models.text import load_qwen3
from tests.support.diffusers_folder import write_diffusers_anima
from tests.support.fp8 import quantise, within_fp8

PROMPTS = ["a red cat sits on a blue mat", "masterpiece, best quality, 1girl", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    models = write_demo_models(root / "single", seed=7)
    return {"models": models, "folder": write_diffusers_anima(root / "Anima-Diffusers", models), "tmp": root}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def _velocity(dit: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 1, 8, 8, generator=g)
    ctx = torch.randn(2, 512, dit.config.crossattn_dim, generator=g)
    return dit(x, torch.tensor([0.3, 0.8]), ctx)


def _copy_without(tiny: dict, name: str, *missing: str) -> Path:
    dst = tiny["tmp"] / name
    if not dst.exists():
        shutil.copytree(tiny["folder"], dst, ignore=shutil.ignore_patterns(*missing))
    return dst


# ------------------------------------------------------------------------------------- diffusers folder

def test_the_folder_is_what_diffusers_writes(tiny):
    folder = tiny["folder"]
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, as large transformers are published
    assert json.loads((folder / "transformer" / "config.json").read_text())["_class_name"] == \
        "CosmosTransformer3DModel"
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["model_type"] == "qwen3"
    assert "transformer_blocks.0.attn1.to_q.weight" in index["weight_map"]


@pytest.mark.parametrize("sub", ["", "transformer"])
def test_dit_from_the_root_or_transformer_folder_equals_the_single_file(tiny, sub):
    ref = load_dit(tiny["models"]["dit"], dtype=torch.float32)
    dit = load_dit(tiny["folder"] / sub, dtype=torch.float32)  # the adapter comes from text_conditioner/
    assert dit.llm_adapter is not None
    _same_state(dit, ref)
    torch.testing.assert_close(_velocity(dit), _velocity(ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sub", ["", "text_encoder"])
def test_text_encoder_from_the_root_or_its_folder_finds_the_tokenizers(tiny, sub):
    tok = tiny["models"]["tokenizers"]
    ref = load_text_encoder(tiny["models"]["qwen3"], qwen3_tokenizer_path=tok, dtype=torch.float32)
    te = load_text_encoder(tiny["folder"] / sub, dtype=torch.float32)  # no tokenizer folders given
    assert te.tokenizer.qwen.get_vocab() == ref.tokenizer.qwen.get_vocab()
    _same_state(te.model, ref.model)
    a, b = te.encode(PROMPTS), ref.encode(PROMPTS)
    assert torch.equal(a.t5_ids, b.t5_ids) and torch.equal(a.qwen_mask, b.qwen_mask)
    torch.testing.assert_close(a.qwen_hidden, b.qwen_hidden, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sub", ["", "vae"])
def test_vae_from_the_root_or_its_folder_equals_the_single_file(tiny, sub):
    ref = load_vae(tiny["models"]["vae"], dtype=torch.float32)
    vae = load_vae(tiny["folder"] / sub, dtype=torch.float32)
    _same_state(vae.model, ref.model)
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vae.encode(img), ref.encode(img), atol=1e-6, rtol=0)


def test_inspect_names_the_folder_and_its_parts(tiny, capsys):
    folder = tiny["folder"]
    info = inspect_file(folder)
    assert info.kind == "anima_diffusers"
    assert info.description == ("a diffusers-layout Anima folder (has transformer/, text_conditioner/, text_encoder/,"
                                " vae/, tokenizer/, t5_tokenizer/)")
    assert info.dit_config == inspect_file(tiny["models"]["dit"]).dit_config
    assert inspect_file(folder / "transformer").kind == "anima_diffusers"
    assert inspect_file(folder / "transformer").dit_config == info.dit_config
    assert inspect_file(folder / "text_conditioner").kind == "llm_adapter"
    assert inspect_file(folder / "text_encoder").kind == "hf_qwen3_folder"
    assert inspect_file(folder / "vae").kind == "qwen_image_vae"
    assert cli.main(["inspect", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "anima_diffusers" and out["dit_config"]["num_blocks"] == info.dit_config.num_blocks
    assert out["components"]["vae"] == str(folder / "vae")


def test_modular_index_and_an_unsharded_transformer_load_too(tiny):
    folder = write_diffusers_anima(tiny["tmp"] / "modular", tiny["models"], shard_kb=None,
                                   index_name="modular_model_index.json")
    assert not (folder / "model_index.json").exists()
    assert [p.name for p in (folder / "transformer").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    _same_state(load_dit(folder, dtype=torch.float32), load_dit(tiny["models"]["dit"], dtype=torch.float32))


def test_one_diffusers_transformer_file_is_a_dit(tiny, tmp_path):
    """The weights file of transformer/ passed alone (a fine-tune saved in diffusers names): recognised, renamed,
    its LLM adapter taken from the sibling text_conditioner/ when there is one."""
    folder = write_diffusers_anima(tiny["tmp"] / "unsharded", tiny["models"], shard_kb=None)
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    info = inspect_file(file)
    single = inspect_file(tiny["models"]["dit"]).dit_config
    assert info.kind == "diffusers_dit" and not info.dit_config.has_llm_adapter  # the file alone has no adapter
    llm_adapter_fields = {k: v for k, v in asdict(single).items() if k.startswith(("llm_adapter", "has_"))}
    assert replace(info.dit_config, **llm_adapter_fields) == single
    ref = load_dit(tiny["models"]["dit"], dtype=torch.float32)
    _same_state(load_dit(file, dtype=torch.float32), ref)
    alone = tmp_path / "finetune.safetensors"
    shutil.copy(file, alone)
    assert load_dit(alone, dtype=torch.float32).llm_adapter is None
    _same_state(load_dit(alone, dtype=torch.float32, llm_adapter_path=tiny["models"]["dit"]), ref)


@pytest.mark.parametrize(("missing", "call"), [
    ("text_encoder", lambda p: load_text_encoder(p)),
    ("vae", lambda p: load_vae(p)),
    ("text_conditioner", lambda p: load_dit(p)),
])
def test_a_folder_missing_a_part_names_the_folder_and_the_part(tiny, missing, call):
    folder = _copy_without(tiny, f"no_{missing}", missing)
    with pytest.raises(ModelFileError, match=rf"{folder} is a diffusers-layout Anima folder without {missing}/ "
                                              r"\(it has: transformer/"):
        call(folder)


def test_without_text_conditioner_the_llm_adapter_file_or_folder_is_used(tiny):
    folder = _copy_without(tiny, "no_text_conditioner", "text_conditioner")
    ref = load_dit(tiny["models"]["dit"], dtype=torch.float32)
    _same_state(load_dit(folder, dtype=torch.float32, llm_adapter_path=tiny["models"]["dit"]), ref)
    # and a single-file DiT may take its adapter from a diffusers text_conditioner/ folder
    bare = tiny["tmp"] / "dit_without_adapter.safetensors"
    save_file({k: v for k, v in load_file(tiny["models"]["dit"]).items() if ".llm_adapter." not in k}, bare)
    _same_state(load_dit(bare, dtype=torch.float32, llm_adapter_path=tiny["folder"] / "text_conditioner"), ref)
    _same_state(load_dit(bare, dtype=torch.float32, llm_adapter_path=tiny["folder"]), ref)
    with pytest.raises(ModelFileError, match=r"--llm_adapter_path: .*no_text_conditioner is a diffusers-layout Anima "
                                              r"folder without text_conditioner/"):
        load_dit(bare, llm_adapter_path=folder)


def test_a_missing_shard_and_a_foreign_transformer_are_named(tiny):
    folder = _copy_without(tiny, "missing_shard", "diffusion_pytorch_model-00002-of-*")
    with pytest.raises(ModelFileError, match=r"--pretrained_model_name_or_path: .*missing_shard: transformer/: "
                                              r".*index\.json names shards missing from .*transformer: "
                                              r"diffusion_pytorch_model-00002-of-\d+\.safetensors; the download is "
                                              r"incomplete"):
        load_dit(folder)
    assert "names shards missing" in inspect_file(folder).summary()["dit_error"]
    _same_state(load_vae(folder, dtype=torch.float32).model,  # the other parts of the folder still load
                load_vae(tiny["models"]["vae"], dtype=torch.float32).model)
    folder = _copy_without(tiny, "other_rope", "nothing")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "rope_scale": [2.0, 1.0, 1.0]}))
    with pytest.raises(ModelFileError, match=r"sets rope_scale = \[2\.0, 1\.0, 1\.0\]; Anima's "
                                              r"CosmosTransformer3DModel uses \[1\.0, 4\.0, 4\.0\]"):
        load_dit(folder)


def test_a_vae_folder_with_other_latent_statistics_is_refused(tiny):
    folder = _copy_without(tiny, "other_vae_stats", "nothing")
    config = json.loads((folder / "vae" / "config.json").read_text())
    assert config["latents_mean"][0] == -0.7571  # what diffusers wrote: Anima's (Wan 2.1) statistics
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "latents_mean": [0.0] * 16}))
    with pytest.raises(ModelFileError, match=r"--vae: .*config\.json sets latents_mean = \[0\.0, .*not the Wan 2\.1 "
                                              r"latent statistics"):
        load_vae(folder)


def test_a_folder_of_another_model_is_refused_by_name(tiny, tmp_path):
    cosmos = tmp_path / "Cosmos-Predict2"  # a Cosmos pipeline: transformer, T5 text encoder, no conditioner
    shutil.copytree(tiny["folder"] / "transformer", cosmos / "transformer")
    (cosmos / "model_index.json").write_text(json.dumps({"_class_name": "Cosmos2TextToImagePipeline"}))
    assert inspect_file(cosmos).kind == "diffusers_folder"
    with pytest.raises(WrongModelFileError, match=r"--pretrained_model_name_or_path expects .* but .*Cosmos-Predict2 "
                                                  r"looks like a diffusers model folder \(not Anima's layout\)"):
        load_dit(cosmos)


# ------------------------------------------------------------------------------------- merges and exports

def test_a_comfyui_saved_merge_with_training_extras_loads(tiny, tmp_path, caplog):
    """A ComfyUI-saved merge (`model.diffusion_model.*`) carrying what Cosmos training exports and merge tools
    leave behind: RoPE tables, training counters, TransformerEngine `_extra_state`, the loss-weighting `logvar`
    net, and keys outside the DiT prefix (an EMA counter, a stray text-encoder key)."""
    state = {"model.diffusion_model." + k.removeprefix("net."): v for k, v in load_file(tiny["models"]["dit"]).items()}
    extras = {"model.diffusion_model.pos_embedder.seq": torch.arange(256.0),
              "model.diffusion_model.accum_iteration": torch.tensor(1234),
              "model.diffusion_model.accum_train_in_hours": torch.tensor(5.0),
              "model.diffusion_model.blocks.0.self_attn.q_proj._extra_state": torch.zeros(8, dtype=torch.uint8),
              "model.diffusion_model.logvar.0.freqs": torch.ones(128),
              "model.diffusion_model.logvar.1.weight": torch.ones(1, 128)}
    outside = {"model_ema.num_updates": torch.tensor(10), "cond_stage_model.logit_scale": torch.ones(())}
    path = tmp_path / "merge.safetensors"
    save_file({**state, **extras, **outside}, path)
    info = inspect_file(path)
    assert info.kind == "anima_dit" and info.prefix == "model.diffusion_model." and info.ignored_keys == 6
    with caplog.at_level("INFO", logger="anima_trainer.models"):
        dit = load_dit(path, dtype=torch.float32)
    _same_state(dit, load_dit(tiny["models"]["dit"], dtype=torch.float32))
    assert ("skipped 6 non-weight keys (0 quantisation keys such as .comfy_quant / input_scale / scaled_fp8; 6 RoPE "
            "tables, training counters or _extra_state such as 'accum_iteration', 'accum_train_in_hours', "
            "'blocks.0.self_attn.q_proj._extra_state')") in caplog.text
    assert ("ignored 2 keys outside the DiT's prefix 'model.diffusion_model.', as ComfyUI does (e.g. "
            "'cond_stage_model.logit_scale', 'model_ema.num_updates')") in caplog.text


def test_dit_weights_under_a_second_prefix_are_refused_by_name(tiny, tmp_path):
    """A merge tool that kept the adapter unprefixed next to `net.` blocks: ComfyUI would silently drop it (its
    prefix filter), giving another model; anima-trainer stops and names a key."""
    state = load_file(tiny["models"]["dit"])
    moved = {(k.removeprefix("net.") if ".llm_adapter." in "." + k else k): v for k, v in state.items()}
    path = tmp_path / "split.safetensors"
    save_file(moved, path)
    with pytest.raises(ModelFileError, match=r"the DiT is stored under 'net\.', but 'llm_adapter\.[a-z_.0-9]+' "
                                              r"\(\d+ such keys\) is a DiT weight under another prefix"):
        load_dit(path)
    # with the adapter given separately those keys are replaced anyway: ignored with the others
    ref = load_dit(tiny["models"]["dit"], dtype=torch.float32)
    _same_state(load_dit(path, dtype=torch.float32, llm_adapter_path=tiny["models"]["dit"]), ref)


def test_a_second_copy_under_another_prefix_is_ignored_like_comfyui(tiny, tmp_path, caplog):
    """A merge saved with both `model.diffusion_model.*` and the original `net.*` names: ComfyUI takes the most
    frequent prefix (its prefix filter drops the rest), and so does anima-trainer, saying so."""
    state = load_file(tiny["models"]["dit"])
    both = {**{"model.diffusion_model." + k.removeprefix("net."): v for k, v in state.items()},
            **{k: v * 2 for k, v in list(state.items())[:5]}}
    save_file(both, tmp_path / "both.safetensors")
    with caplog.at_level("INFO", logger="anima_trainer.models.dit"):
        dit = load_dit(tmp_path / "both.safetensors", dtype=torch.float32)
    _same_state(dit, load_dit(tiny["models"]["dit"], dtype=torch.float32))
    assert "ignored 5 keys outside the DiT's prefix 'model.diffusion_model.'" in caplog.text
    assert "5 of them repeat names the DiT has under 'model.diffusion_model.'" in caplog.text


def test_an_unknown_weight_in_a_merge_is_an_error_naming_it(tiny, tmp_path):
    state = load_file(tiny["models"]["dit"])
    state["net.blocks.0.mlp.layer3.weight"] = torch.ones(4, 4)  # a renamed / foreign layer changes the model
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(ModelFileError, match=r"1 unexpected keys \['blocks\.0\.mlp\.layer3\.weight'\]"):
        load_dit(tmp_path / "odd.safetensors")


# ------------------------------------------------------------------------------------- float8 files

def _fp8_plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every matrix weight stored as float8_e4m3fn without a scale (the plain `fp8_e4m3fn` exports)."""
    return {k: v.to(torch.float8_e4m3fn) if k.endswith(".weight") and v.dim() >= 2 else v for k, v in state.items()}


def _expected_plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in _fp8_plain(state).items()}


def _within_plain_fp8(loaded: torch.Tensor, original: torch.Tensor) -> bool:
    """e4m3 rounding without a scale: half a step is |v|/16 for normal numbers, 2^-10 in the subnormal range."""
    return bool(((loaded.float() - original.float()).abs() <= original.float().abs() / 16 + 2.0 ** -10).all())


def test_float8_dit_loads_dequantised(tiny, tmp_path):
    original = load_file(tiny["models"]["dit"])
    save_file(_fp8_plain(original), tmp_path / "dit_fp8.safetensors")
    got = load_dit(tmp_path / "dit_fp8.safetensors", dtype=torch.float32).state_dict()
    want = _expected_plain(original)
    assert all(torch.equal(got[k.removeprefix("net.")], v) for k, v in want.items())
    assert all(_within_plain_fp8(got[k.removeprefix("net.")], v) for k, v in original.items())
    assert sum(not torch.equal(got[k.removeprefix("net.")], v) for k, v in original.items()) > 20


@pytest.mark.parametrize("style", ["plain", "comfy_quant", "old", "metadata"])
def test_float8_and_scaled_float8_qwen3_load_dequantised(tiny, tmp_path, style):
    original = load_file(tiny["models"]["qwen3"])  # `model.*` keys
    if style == "plain":
        tensors, meta, quantised = _fp8_plain(original), None, [k for k in original if k.endswith(".weight")
                                                                 and original[k].dim() >= 2]
    else:
        tensors, meta, quantised = quantise(original, style)
    path = tmp_path / f"qwen3_{style}.safetensors"
    save_file(tensors, path, metadata=meta)
    got = load_qwen3(path, dtype=torch.float32).state_dict()
    assert len(quantised) >= 14
    for key, w in original.items():
        name = key.removeprefix("model.")
        if key in quantised and style == "plain":
            assert torch.equal(got[name], w.to(torch.float8_e4m3fn).float()) and _within_plain_fp8(got[name], w)
        elif key in quantised:
            assert within_fp8(got[name], w) <= 1, name
        else:
            assert torch.equal(got[name], w), name
    changed = sum(not torch.equal(got[k.removeprefix("model.")], original[k]) for k in quantised)
    assert changed >= len(quantised) // 2  # really went through float8


def test_scaled_float8_qwen3_in_a_bundle_loads(tiny, tmp_path):
    original = load_file(tiny["models"]["qwen3"])
    tensors, _, quantised = quantise(original, "comfy_quant")
    bundle = {"text_encoders.qwen3_06b.transformer." + k: v for k, v in tensors.items()}
    bundle.update({"model.diffusion_model." + k.removeprefix("net."): v
                   for k, v in load_file(tiny["models"]["dit"]).items()})
    bundle.update({"vae." + k: v for k, v in load_file(tiny["models"]["vae"]).items()})
    save_file(bundle, tmp_path / "aio.safetensors")
    got = load_qwen3(tmp_path / "aio.safetensors", dtype=torch.float32).state_dict()
    assert all(within_fp8(got[k.removeprefix("model.")], original[k]) <= 1 for k in quantised)


def test_float8_vae_loads_dequantised(tiny, tmp_path):
    original = load_file(tiny["models"]["vae"])
    save_file(_fp8_plain(original), tmp_path / "vae_fp8.safetensors")
    got = load_vae(tmp_path / "vae_fp8.safetensors", dtype=torch.float32).model.state_dict()
    ref = load_vae(tiny["models"]["vae"], dtype=torch.float32).model.state_dict()
    want = {k: v.float() for k, v in _fp8_plain(original).items()}
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)  # diffusers names: the file's own keys
    assert all(_within_plain_fp8(got[k], ref[k]) for k in ref)


def test_scaled_float8_transformer_in_a_diffusers_folder_loads(tiny):
    folder = _copy_without(tiny, "fp8_folder", "nothing")
    for shard in (folder / "transformer").glob("*.safetensors"):
        tensors, _, _ = quantise(load_file(shard), "comfy_quant")
        save_file(tensors, shard)
    # the index still names the shards (the scales sit next to their weights in the same shard)
    ref = load_dit(tiny["models"]["dit"], dtype=torch.float32).state_dict()
    got = load_dit(folder, dtype=torch.float32).state_dict()
    assert got.keys() == ref.keys()
    assert max(float(within_fp8(got[k], ref[k])) for k in ref) <= 1
    assert sum(not torch.equal(got[k], ref[k]) for k in ref) > 20  # really went through float8
