"""File recognition, prefixes, config inference and wrong-file errors, on synthetic files in real formats."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer.demo import TINY_DIT_CONFIG, random_dit_state_dict, write_tiny_dit
from anima_trainer.models import inspect_file, load_dit
from anima_trainer.models.model_files import (ModelFileError, DitConfig, WrongModelFileError, expect_kind,
                                             infer_dit_config)


def _velocity(dit, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 8, 12, generator=g)
    ctx = torch.randn(1, 512, dit.config.crossattn_dim, generator=g)
    return dit(x, torch.tensor([0.4]), ctx)


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model.", "diffusion_model.", ""])
def test_every_prefix_loads_to_the_same_model(tmp_path, prefix):
    ref = load_dit(write_tiny_dit(tmp_path / "ref.safetensors"), dtype=torch.float32)
    path = write_tiny_dit(tmp_path / "m.safetensors", prefix=prefix)
    info = inspect_file(path)
    assert info.kind == "anima_dit" and info.prefix == prefix
    dit = load_dit(path, dtype=torch.float32)
    a, b = dit.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # same weights; outputs may differ in the last bit because SIMD paths depend on memory alignment
    torch.testing.assert_close(_velocity(dit), _velocity(ref), atol=1e-5, rtol=1e-5)


def test_known_extras_are_ignored(tmp_path, caplog):
    """RoPE tables and quantisation bookkeeping that does not change any weight (ComfyUI's `scaled_fp8` marker,
    activation scales) are skipped and counted; scales that do change weights are tests/badinput's business."""
    extra = {"net.pos_embedder.dim_spatial_range": torch.zeros(21), "net.pos_embedder.seq": torch.zeros(256),
             "net.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
             "net.blocks.0.mlp.layer1.scale_input": torch.ones(()),
             "net.blocks.0.mlp.layer1.input_scale": torch.ones(())}
    path = write_tiny_dit(tmp_path / "m.safetensors", extra=extra)
    info = inspect_file(path)
    assert info.ignored_keys == 5 and info.fp8_scaled_weights == 0
    with caplog.at_level("INFO", logger="anima_trainer.models.model_files"):
        dit = load_dit(path, dtype=torch.float32)
    assert "skipped 5 non-weight keys (3 quantisation keys" in caplog.text
    ref = load_dit(write_tiny_dit(tmp_path / "ref.safetensors"), dtype=torch.float32).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in dit.state_dict().items())


def test_config_inferred_from_shapes_40_blocks(tmp_path):
    cfg = replace(TINY_DIT_CONFIG, num_blocks=40, model_channels=96, num_heads=3, head_dim=32, mlp_dim=192,
                  adaln_lora_dim=16, crossattn_dim=48)
    path = write_tiny_dit(tmp_path / "deep.safetensors", cfg, with_llm_adapter=False, dtype=torch.bfloat16)
    info = inspect_file(path)
    dit_fields = ("num_blocks", "model_channels", "num_heads", "head_dim", "mlp_dim", "adaln_lora_dim",
                  "crossattn_dim", "in_channels", "out_channels")
    assert info.dit_config == replace(DitConfig(), has_llm_adapter=False,
                                      **{f: getattr(cfg, f) for f in dit_fields})
    dit = load_dit(path)
    assert len(dit.blocks) == 40 and dit.llm_adapter is None
    assert dit.blocks[0].self_attn.heads == 3
    assert next(dit.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelFileError, match="no llm_adapter"):
        dit.encode_context(torch.zeros(1, 2, 64), torch.ones(1, 1, dtype=torch.long))


def test_tiny_fixture_and_2b_configs(tiny_dit_path, fixture_dir):
    info = inspect_file(tiny_dit_path)
    assert info.kind == "anima_dit" and info.prefix == "net." and info.num_tensors == 325
    assert info.num_params == 157_439_360 and info.dtypes == {"F32": 325}
    c = info.dit_config
    assert (c.num_blocks, c.model_channels, c.num_heads, c.head_dim, c.mlp_dim, c.adaln_lora_dim) == \
        (10, 256, 16, 16, 1024, 256)
    assert c.has_llm_adapter and (c.llm_adapter_blocks, c.llm_adapter_dim, c.llm_adapter_heads) == (6, 1024, 16)
    listing = json.loads((fixture_dir / "listing_full_dit.json").read_text())
    shapes = {e["key"].removeprefix("net."): tuple(e["shape"]) for e in listing["keys"]}
    assert infer_dit_config(shapes) == DitConfig()


def test_separate_llm_adapter_file(tmp_path):
    full = random_dit_state_dict(TINY_DIT_CONFIG, seed=3)
    save_file({"net." + k: v for k, v in full.items() if not k.startswith("llm_adapter.")},
              tmp_path / "dit.safetensors")
    save_file({k: v for k, v in full.items() if k.startswith("llm_adapter.")}, tmp_path / "adapter.safetensors")
    save_file({"net." + k: v for k, v in full.items()}, tmp_path / "full.safetensors")
    assert inspect_file(tmp_path / "dit.safetensors").dit_config.has_llm_adapter is False
    assert inspect_file(tmp_path / "adapter.safetensors").kind == "llm_adapter"
    split = load_dit(tmp_path / "dit.safetensors", dtype=torch.float32,
                     llm_adapter_path=tmp_path / "adapter.safetensors")
    whole = load_dit(tmp_path / "full.safetensors", dtype=torch.float32)
    qh, ids = torch.randn(1, 5, 64), torch.tensor([[5, 6, 7, 1]])
    assert torch.equal(split.encode_context(qh, ids), whole.encode_context(qh, ids))
    # an adapter taken from another full DiT file replaces the bundled one
    other = load_dit(tmp_path / "full.safetensors", dtype=torch.float32, llm_adapter_path=tmp_path / "full.safetensors")
    assert torch.equal(other.encode_context(qh, ids), whole.encode_context(qh, ids))
    # adapter_path (before issue 16) is an alias of llm_adapter_path, warned; both at once are refused
    with pytest.warns(DeprecationWarning, match=r"load_dit\(adapter_path=\.\.\.\) is now spelled "
                                                r"load_dit\(llm_adapter_path=\.\.\.\)"):
        old = load_dit(tmp_path / "dit.safetensors", dtype=torch.float32, adapter_path=tmp_path / "adapter.safetensors")
    assert torch.equal(old.encode_context(qh, ids), split.encode_context(qh, ids))
    with pytest.raises(TypeError, match="got llm_adapter_path= and its old name adapter_path="):
        load_dit(tmp_path / "dit.safetensors", llm_adapter_path=tmp_path / "adapter.safetensors",
                 adapter_path=tmp_path / "adapter.safetensors")


def test_bundle_file_loads_dit_part(tmp_path):
    state = random_dit_state_dict(TINY_DIT_CONFIG, seed=1)
    tensors = {"model.diffusion_model." + k: v for k, v in state.items()}
    tensors["text_encoders.qwen3_06b.transformer.model.layers.0.post_attention_layernorm.weight"] = torch.ones(64)
    tensors["vae.decoder.upsamples.0.residual.0.gamma"] = torch.ones(8, 1, 1, 1)
    save_file(tensors, tmp_path / "aio.safetensors")
    info = inspect_file(tmp_path / "aio.safetensors")
    assert info.kind == "anima_bundle"
    assert info.components == {"dit": "model.diffusion_model.", "qwen3": "text_encoders.qwen3_06b.transformer.",
                               "vae": "vae."}
    dit = load_dit(tmp_path / "aio.safetensors", dtype=torch.float32)
    assert torch.equal(dit.blocks[1].mlp.layer2.weight, state["blocks.1.mlp.layer2.weight"])


def test_wrong_files_are_named(tmp_path, vae_path, fixture_dir):
    lora = fixture_dir / "lora_examples" / "lora_kohya_updown_alpha_diffb.safetensors"
    with pytest.raises(WrongModelFileError) as e:
        load_dit(lora)
    msg = str(e.value)
    assert "--pretrained_model_name_or_path" in msg and str(lora) in msg and "LoRA" in msg
    with pytest.raises(WrongModelFileError, match=r"--pretrained_model_name_or_path expects .* looks like a "
                                                  r"Qwen-Image / Wan 2.1 VAE"):
        load_dit(vae_path)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}, sdxl)
    with pytest.raises(WrongModelFileError, match="Stable Diffusion XL"):
        load_dit(sdxl)
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2),
               "single_blocks.0.linear1.weight": torch.zeros(2, 2)}, flux)
    with pytest.raises(WrongModelFileError, match="Flux"):
        expect_kind(flux, "--vae", ["qwen_image_vae"])
    folder = tmp_path / "diffusers_model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(WrongModelFileError, match="diffusers model folder"):
        load_dit(folder)


def test_pickle_and_missing_files_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(WrongModelFileError, match="not a safetensors file"):
        load_dit(ckpt)
    with pytest.raises(WrongModelFileError, match="no such file"):
        load_dit(tmp_path / "absent.safetensors")


def test_lora_fixture_files_are_recognised(fixture_dir):
    index = json.loads((fixture_dir / "lora_examples" / "index.json").read_text())
    assert index
    kinds = {p.name: inspect_file(p) for p in (fixture_dir / "lora_examples").glob("*.safetensors")
             if not p.name.endswith(".comfy_out.safetensors")}
    assert len(kinds) == 7 and all(i.kind == "network" for i in kinds.values())
    assert kinds["loha.safetensors"].network_types == ["loha"]
    assert kinds["lokr_w1full_w2lowrank.safetensors"].network_types == ["lokr"]
    assert kinds["lora_peft_AB_noalpha.safetensors"].network_types == ["lora"]


def test_missing_key_is_reported(tmp_path):
    path = write_tiny_dit(tmp_path / "m.safetensors")
    tensors = load_file(path)
    del tensors["net.blocks.1.cross_attn.v_proj.weight"]
    save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(ModelFileError, match=r"1 missing keys \['blocks.1.cross_attn.v_proj.weight'\]"):
        load_dit(tmp_path / "broken.safetensors")
