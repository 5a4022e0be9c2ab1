"""Per-block torch.compile: the compiled DiT gives the eager outputs and gradients (fp32 CPU, aot_eager:
max |Δ| ≤ 1e-5 · max |ref|; with LoRA, fused q/k/v and gradient checkpointing), and bucket changes compile
once per token count, never past the raised cache limit."""

from __future__ import annotations

import pytest
import torch

from anima_trainer.config.errors import ConfigError
from anima_trainer.config.loader import parse_train_args
from anima_trainer.models import load_dit
from anima_trainer.models.compile import (cache_limit_for, check_compile_mode, compile_dit_blocks, image_tokens,
                                          is_compiled, uncompile_dit_blocks)
from anima_trainer.models.layers import set_fused_qkv
from anima_trainer.networks import create_network



@pytest.fixture
def trained(dit_file):
    """Tiny fp32 DiT with a LoRA (random factors: every branch shows) and fused q/k/v."""
    dit = load_dit(dit_file, dtype=torch.float32)
    network = create_network(dit, "lora", dim=4, alpha=4.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    set_fused_qkv(dit, True)
    return dit, network


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


def step(dit, network, h: int = 8, w: int = 8):
    g = torch.Generator().manual_seed(h * 100 + w)
    x, t = torch.randn(1, 16, 1, h, w, generator=g), torch.rand(1, generator=g)
    ctx = torch.randn(1, 24, 64, generator=g)
    out = dit(x, t, ctx)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in network.trainable_parameters()]
    network.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_compiled_blocks_match_eager_with_checkpointing(trained, dynamo):
    dit, network = trained
    ref_out, ref_grads = step(dit, network)
    assert compile_dit_blocks(dit, backend="aot_eager", fullgraph=True, max_shapes=2) == len(dit.blocks)
    assert is_compiled(dit)
    for ckpt in (False, True):  # non-reentrant checkpoint around each compiled block
        dit.runner.gradient_checkpointing = ckpt
        out, grads = step(dit, network)
        assert close(out, ref_out), ckpt
        assert all(close(g, r) for g, r in zip(grads, ref_grads)), ckpt
    assert dynamo["stats"]["unique_graphs"] >= 1
    uncompile_dit_blocks(dit)
    assert not is_compiled(dit) and all("forward" not in b.__dict__ for b in dit.blocks)
    out, _ = step(dit, network)
    assert close(out, ref_out)


def test_one_graph_per_token_count_when_buckets_cycle(trained, dynamo):
    """Buckets (8×8, 8×16, 16×8, 4×8 latents) = 16, 32, 32, 8 tokens: 3 shapes.  Training compiles two graphs
    per shape — block 0's input needs no gradient with the default targets, blocks 1..N share the other — and
    nothing more however often the buckets come back; no-grad calls (previews) add one graph per shape."""
    dit, network = trained
    buckets = [(8, 8), (8, 16), (16, 8), (4, 8)]
    eager = {(h, w): step(dit, network, h, w)[0] for h, w in buckets}
    compile_dit_blocks(dit, backend="eager", fullgraph=True, max_shapes=3)
    assert torch._dynamo.config.cache_size_limit >= cache_limit_for(3) > 8  # above dynamo's default of 8
    for cycle in range(3):
        for h, w in buckets:
            out, _ = step(dit, network, h, w)
            assert close(out, eager[h, w])
        assert dynamo["stats"]["unique_graphs"] == 3 * 2, cycle
    with torch.no_grad():  # a preview at one of the sizes: one more graph (no input needs a gradient)
        for _ in range(2):
            dit(torch.randn(1, 16, 1, 8, 8), torch.rand(1), torch.randn(1, 24, 64))
    assert dynamo["stats"]["unique_graphs"] == 3 * 2 + 1


def test_packing_change_recompiles_into_separate_projections(trained, dynamo):
    """The compiled graph trusts `qkv_packed`, refreshed by the block's eager pre-hook before every call."""
    dit, network = trained
    compile_dit_blocks(dit, backend="eager", fullgraph=True)
    step(dit, network)
    attn = dit.blocks[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.data = attn.k_proj.weight.data * 0.5  # unpacked behind the model's back
    out, _ = step(dit, network)
    assert not attn.qkv_packed
    uncompile_dit_blocks(dit)
    ref, _ = step(dit, network)
    assert close(out, ref)


def test_compile_options():
    assert image_tokens(1024, 1024) == 4096 and image_tokens(832, 1216) == 52 * 76
    assert check_compile_mode(None) == check_compile_mode("") == "default"
    assert check_compile_mode("max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="CUDA graphs"):
            check_compile_mode(mode)
    dit = torch.nn.Module()
    with pytest.raises(ValueError, match="no `blocks`"):
        compile_dit_blocks(dit, backend="eager")
    with pytest.raises(ValueError, match="needs compile_backend"):
        compile_dit_blocks(dit, backend="eager", mode="max-autotune-no-cudagraphs")


def test_config_fields_and_kohya_names(tmp_path):
    base = ["--pretrained_model_name_or_path", "d.safetensors", "--qwen3", "q.safetensors", "--vae",
            "v.safetensors", "--output_dir", str(tmp_path), "--dataset_config", "ds.toml"]
    cfg = parse_train_args(base)
    assert (cfg.compile_blocks, cfg.compile_mode, cfg.compile_backend, cfg.fuse_qkv) == ("auto", "default",
                                                                                         "inductor", True)
    cfg = parse_train_args([*base, "--compile", "--compile_mode", "max-autotune-no-cudagraphs"])  # kohya's flags
    assert cfg.compile_blocks and cfg.compile_mode == "max-autotune-no-cudagraphs"
    toml = tmp_path / "t.toml"
    toml.write_text('compile = true\ncompile_mode = ""\ncompile_backend = "inductor"\ncompile_dynamic = ""\n'
                    'compile_cache_size_limit = 32\ncompile_fullgraph = false\ntorch_compile = false\n')
    cfg = parse_train_args([*base, "--config_file", str(toml)])
    assert cfg.compile_blocks and cfg.compile_mode == "default" and cfg.compile_cache_size_limit == 32
    # issue 14: kohya's compile_dynamic and torch_compile are accepted, each with one notice saying what happens
    toml.write_text('compile_dynamic = "true"\n')
    [notice] = parse_train_args([*base, "--config_file", str(toml)]).notices
    assert notice.startswith("compile_dynamic = 'true'") and "static shapes" in notice, notice
    toml.write_text("torch_compile = true\n")
    cfg = parse_train_args([*base, "--config_file", str(toml)])
    assert cfg.compile_blocks and cfg.vae_compile_notices()[0].startswith(
        "torch_compile = true: compiled per DiT block")
    toml.write_text('compile_mode = "reduce-overhead"\n')
    with pytest.raises(ConfigError, match="CUDA graphs"):
        parse_train_args([*base, "--config_file", str(toml)])
