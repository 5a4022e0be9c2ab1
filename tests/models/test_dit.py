"""DiT + LLM adapter parity with ComfyUI's golden outputs (dit_io, te_ref) and structural checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.models import load_dit
from anima_trainer.models.model_files import DitConfig
from anima_trainer.models.dit import AnimaDiT


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def dit32(tiny_dit_path):
    return load_dit(tiny_dit_path, dtype=torch.float32)


def test_context_matches_comfyui(dit32, dit_io):
    ref = dit_io["c_crossattn"]
    ctx = dit32.encode_context(dit_io["qwen_hidden"], dit_io["t5_ids"], qwen_mask=dit_io["qwen_mask"],
                               t5_mask=dit_io["t5_mask"], t5_weights=dit_io["t5_weights"])
    assert ctx.shape == (2, 512, 1024)
    assert max_err(ctx, ref) <= 1e-5 * ref.abs().max().item()
    lengths = dit_io["t5_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(ctx[i, n:]) == 0, "rows past the T5 length must be exactly zero"


def test_velocity_matches_comfyui(dit32, dit_io):
    ref = dit_io["model_output"]
    assert torch.equal(dit_io["timesteps_seen_by_dit"], dit_io["sigma"])  # the DiT gets σ, not σ·1000
    v = dit32(dit_io["x"], dit_io["sigma"], dit_io["c_crossattn"])
    assert v.shape == ref.shape and v.dtype == torch.float32
    assert max_err(v, ref) <= 1e-5 * ref.abs().max().item()
    denoised = dit_io["x"] - dit_io["sigma"].view(-1, 1, 1, 1, 1) * v
    assert max_err(denoised, dit_io["denoised"]) <= 1e-5 * dit_io["denoised"].abs().max().item()


def test_sigma_times_1000_is_wrong(dit32, dit_io):
    """Guards the convention: feeding σ·1000 must visibly change the output (62 % rel. L2 per README)."""
    v = dit32(dit_io["x"], dit_io["sigma"] * 1000, dit_io["c_crossattn"])
    assert rel_l2(v, dit_io["model_output"]) > 0.3


def test_llm_adapter_matches_te_ref_per_prompt_and_batched(dit32, fixture_dir):
    te = load_file(fixture_dir / "te_ref.safetensors")
    meta = json.loads((fixture_dir / "te_ref.json").read_text())["prompts"]
    hidden, ids, weights, refs = [], [], [], []
    for p in meta:
        k = p["key"]
        h, i, w, ref = (te[f"{k}.qwen_hidden"], te[f"{k}.t5_ids"].long(), te[f"{k}.t5_weights"],
                        te[f"{k}.after_adapter"])
        ctx = dit32.encode_context(h[None], i[None], t5_weights=w[None])
        assert ctx.shape == (1, 512, 1024), k
        assert max_err(ctx[0, : len(i)], ref) <= 1e-5 * ref.abs().max().item(), k
        assert torch.count_nonzero(ctx[0, len(i):]) == 0, k
        hidden.append(h), ids.append(i), weights.append(w), refs.append(ref)
    # the same prompts as one right-padded batch with masks give the same rows
    sq, st = max(len(h) for h in hidden), max(len(i) for i in ids)
    qh = torch.zeros(len(hidden), sq, 1024)
    qm = torch.zeros(len(hidden), sq, dtype=torch.long)
    ti = torch.zeros(len(ids), st, dtype=torch.long)
    tm, tw = torch.zeros_like(ti), torch.zeros(len(ids), st)
    for b, (h, i, w) in enumerate(zip(hidden, ids, weights)):
        qh[b, : len(h)], qm[b, : len(h)] = h, 1
        ti[b, : len(i)], tm[b, : len(i)], tw[b, : len(i)] = i, 1, w
    ctx = dit32.encode_context(qh, ti, qwen_mask=qm, t5_mask=tm, t5_weights=tw)
    for b, ref in enumerate(refs):
        assert max_err(ctx[b, : len(ref)], ref) <= 2e-5 * ref.abs().max().item(), meta[b]["key"]
        assert torch.count_nonzero(ctx[b, len(ref):]) == 0


def test_fully_masked_text_gives_finite_context(dit32):
    """kohya-style caption dropout: all Qwen rows masked, T5 = [</s>]; must never be NaN."""
    qh = torch.zeros(2, 8, 1024)
    qm = torch.zeros(2, 8, dtype=torch.long)
    ids = torch.tensor([[1, 0, 0], [1, 0, 0]])
    tm = torch.tensor([[1, 0, 0], [1, 0, 0]])
    ctx = dit32.encode_context(qh, ids, qwen_mask=qm, t5_mask=tm)
    assert torch.isfinite(ctx).all()
    assert torch.count_nonzero(ctx[:, 1:]) == 0 and torch.count_nonzero(ctx[:, 0]) > 0


def test_batch_equals_single_samples(dit32, dit_io):
    both = dit32(dit_io["x"], dit_io["sigma"], dit_io["c_crossattn"])
    for i in range(2):
        one = dit32(dit_io["x"][i: i + 1], dit_io["sigma"][i: i + 1], dit_io["c_crossattn"][i: i + 1])
        assert max_err(one[0], both[i]) <= 2e-6


def test_blocks_callable_alone_and_rope_cached(dit32, dit_io):
    x, sigma, ctx = dit_io["x"][:1], dit_io["sigma"][:1], dit_io["c_crossattn"][:1]
    tokens, emb, lora = dit32.embed(x, sigma)
    _, _, t, h, w = x.shape
    rope = dit32.rope(t, h // 2, w // 2, tokens.device)
    assert dit32.rope(t, h // 2, w // 2, tokens.device)[0] is rope[0]  # cached per shape
    for block in dit32.blocks:
        tokens = block(tokens, emb, lora, ctx, rope)
    out = dit32.unpatchify(dit32.final_layer(tokens, emb, lora), t, h // 2, w // 2)
    assert max_err(out, dit32(x, sigma, ctx)) == 0


def test_odd_latent_is_padded_circularly_and_cropped(dit32, dit_io):
    x, sigma, ctx = dit_io["x"][:1, :, :, :31, :47], dit_io["sigma"][:1], dit_io["c_crossattn"][:1]
    v = dit32(x, sigma, ctx)
    assert v.shape == x.shape
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1, 0, 0), mode="circular")
    assert max_err(v, dit32(padded, sigma, ctx)[..., :31, :47]) == 0


def test_bf16_within_documented_tolerance(tiny_dit_path, dit_io):
    """bf16 weights and activations: relative L2 ≤ 1e-2 against the fp32 ComfyUI reference."""
    dit = load_dit(tiny_dit_path, dtype=torch.bfloat16)
    assert dit.x_embedder.proj[1].weight.dtype == torch.bfloat16
    ctx = dit.encode_context(dit_io["qwen_hidden"], dit_io["t5_ids"], qwen_mask=dit_io["qwen_mask"],
                             t5_mask=dit_io["t5_mask"], t5_weights=dit_io["t5_weights"])
    assert ctx.dtype == torch.bfloat16
    assert rel_l2(ctx, dit_io["c_crossattn"]) <= 1e-2
    v = dit(dit_io["x"], dit_io["sigma"], dit_io["c_crossattn"])
    assert v.dtype == torch.float32  # returned in the input's dtype
    assert rel_l2(v, dit_io["model_output"]) <= 1e-2


def test_fp16_keeps_residual_stream_in_fp32(tiny_dit_path, dit_io):
    dit = load_dit(tiny_dit_path, dtype=torch.float16)
    x, sigma, ctx = dit_io["x"][:1], dit_io["sigma"][:1], dit_io["c_crossattn"][:1]
    seen = []
    hook = dit.blocks[0].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    v = dit(x, sigma, ctx)
    hook.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert torch.isfinite(v).all()
    assert rel_l2(v, dit_io["model_output"][:1]) <= 1e-2


def test_full_2b_model_on_meta_matches_listing(fixture_dir):
    listing = json.loads((fixture_dir / "listing_full_dit.json").read_text())
    expected = {e["key"].removeprefix("net."): tuple(e["shape"]) for e in listing["keys"]}
    with torch.device("meta"):
        model = AnimaDiT(DitConfig())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(v.numel() for v in model.state_dict().values()) == listing["num_params"] == 2_091_068_928
