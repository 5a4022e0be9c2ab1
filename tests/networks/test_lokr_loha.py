"""LoKr, LoHa and train_norm on the tiny demo DiT: layouts, scales, init/gradients, files, ComfyUI agreement."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from anima_trainer.models.dit import load_dit
from anima_trainer.networks import NetworkError, apply_network_file, create_network
from anima_trainer.networks.base import find_norms
from anima_trainer.networks.lokr import factorization
from tests.networks.test_lora import inputs


def randomize(net, seed: int = 1, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.lora_modules:
            for p in m.tensors().values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for m in net.norm_modules:
            m.weight.copy_(m.base + torch.randn(m.base.shape, generator=g) * 0.05)


def shapes(net, path):
    return {s: tuple(p.shape) for s, p in net.modules_by_name[path].tensors().items()}


def test_factorization_lycoris_rule():
    assert factorization(2048) == (32, 64) and factorization(1024) == (32, 32) and factorization(8192) == (64, 128)
    assert factorization(2048, 8) == (8, 256) and factorization(64, 4) == (4, 16)
    assert factorization(2048, 3) == (2, 1024)  # 3 does not divide: most balanced pair with m <= 3
    assert factorization(7) == (1, 7)


def test_lokr_layouts_and_scales(dit):
    q, l1 = "blocks.0.self_attn.q_proj", "blocks.0.mlp.layer1"  # 64->64, 64->256
    net = create_network(dit, algo="lokr", dim=2, alpha=3.0)
    assert shapes(net, q) == {".lokr_w1": (8, 8), ".lokr_w2_a": (8, 2), ".lokr_w2_b": (2, 8)}  # -1 not clamped to 1
    assert shapes(net, l1) == {".lokr_w1": (16, 8), ".lokr_w2_a": (16, 2), ".lokr_w2_b": (2, 8)}
    assert net.modules_by_name[q].scale == 1.5
    net.remove()
    net = create_network(dit, algo="lokr", dim=2, alpha=3.0, factor="4", decompose_both="true")
    assert shapes(net, q) == {".lokr_w1": (4, 4), ".lokr_w2_a": (16, 2), ".lokr_w2_b": (2, 16)}  # 2 >= 4/2: w1 full
    net.remove()
    net = create_network(dit, algo="lokr", dim=1, alpha=3.0, decompose_both="yes")
    assert shapes(net, q) == {".lokr_w1_a": (8, 1), ".lokr_w1_b": (1, 8), ".lokr_w2_a": (8, 1), ".lokr_w2_b": (1, 8)}
    assert net.modules_by_name[q].scale == 3.0
    net.remove()
    for kw in ({"dim": 100000}, {"dim": 2, "full_matrix": "On"}, {"dim": 4}):  # sentinel, switch, rank >= half
        net = create_network(dit, algo="lokr", alpha=3.0, **kw)
        assert shapes(net, q) == {".lokr_w1": (8, 8), ".lokr_w2": (8, 8)}, kw
        assert net.modules_by_name[q].scale == 1.0  # both full: ComfyUI ignores alpha
        net.remove()
    for bad in ({"factor": "0"}, {"factor": "x"}, {"full_matrix": "maybe"}, {"down_lr_weight": "0.1"}):
        with pytest.raises(NetworkError):
            create_network(dit, algo="lokr", dim=2, **bad)
    with pytest.raises(NetworkError, match="factor"):
        create_network(dit, algo="loha", dim=2, factor="4")  # a LoKr-only argument


def test_loha_layout(dit):
    net = create_network(dit, algo="loha", dim=3, alpha=6.0)
    assert shapes(net, "blocks.1.mlp.layer2") == {".hada_w1_a": (64, 3), ".hada_w1_b": (3, 256),
                                                  ".hada_w2_a": (64, 3), ".hada_w2_b": (3, 256)}
    assert net.modules_by_name["blocks.1.mlp.layer2"].scale == 2.0


CASES = [("lokr", {"dim": 2, "alpha": 3.0}), ("lokr", {"dim": 2, "alpha": 3.0, "full_matrix": "true"}),
         ("lokr", {"dim": 1, "alpha": 0.5, "decompose_both": "true", "factor": "4"}),
         ("loha", {"dim": 3, "alpha": 6.0}), ("lora", {"dim": 4, "alpha": 2.0})]


@pytest.mark.parametrize(("algo", "kw"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_init_identity_and_every_factor_trains(dit, algo, kw):
    x, sigma, ctx = inputs()
    with torch.no_grad():
        ref = dit(x, sigma, ctx)
    net = create_network(dit, algo=algo, train_norm="true", **kw)
    with torch.no_grad():
        assert torch.equal(dit(x, sigma, ctx), ref)  # ΔW = 0 and norm gains unchanged
    # the LLM adapter does not run here (ctx is given), so its norm gains are left out
    params = [p for p in net.trainable_parameters()
              if not any(p is m.weight for m in net.norm_modules if m.path.startswith("llm_adapter."))]
    assert len(params) == len(net.trainable_parameters()) - 8  # 7 adapter block norms + llm_adapter.norm
    init = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    dit(x, sigma, ctx).square().mean().backward()
    for m in net.lora_modules:  # step 1: the zero-initialised factor gets gradient (the others: product with 0)
        zero = [p for p in m.tensors().values() if not p.detach().any()]
        assert len(zero) == 1 and zero[0].grad is not None and zero[0].grad.abs().max() > 0
    assert all(m.weight.grad.abs().max() > 0 for m in net.norm_modules if not m.path.startswith("llm_adapter."))
    opt.step()
    opt.zero_grad(set_to_none=True)
    dit(x, sigma, ctx).square().mean().backward()
    for p in params:  # step 2: every factor receives gradient
        assert p.grad is not None and p.grad.abs().max() > 0
    opt.step()
    for p, p0 in zip(params, init, strict=True):
        assert not torch.equal(p, p0)
    assert all(not p.requires_grad for p in dit.parameters())


@pytest.mark.parametrize(("algo", "kw"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
@pytest.mark.parametrize("train_norm", ["false", "true"])
def test_file_reloads_exactly_and_matches_comfyui(dit, dit_file, tmp_path, algo, kw, train_norm):
    x, sigma, ctx = inputs()
    net = create_network(dit, algo=algo, train_llm_adapter="true", train_norm=train_norm, **kw)
    randomize(net, scale=0.3)
    path = net.save(tmp_path / f"{algo}.safetensors")  # the save-time ComfyUI key check passes
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    norm_keys = {k for k in keys if k.endswith(".w_norm")}
    assert not any(k.endswith(".b_norm") for k in keys)
    if train_norm == "true":
        names = find_norms(dit)
        assert {"t_embedding_norm", "blocks.0.self_attn.q_norm", "blocks.1.cross_attn.k_norm", "llm_adapter.norm",
                "llm_adapter.blocks.0.norm_mlp", "llm_adapter.blocks.0.cross_attn.q_norm"} <= set(names)
        assert norm_keys == {f"diffusion_model.{n}.w_norm" for n in names}
    else:
        assert not norm_keys and not any("norm" in k for k in keys)
    for mult in (1.0, 0.6):
        net.set_multiplier(mult)
        with torch.no_grad():
            out = dit(x, sigma, ctx)
        # a rebuilt network loading the file gives the identical output
        fresh = load_dit(dit_file, dtype=torch.float32)
        net2 = create_network(fresh, algo=algo, train_llm_adapter="true", train_norm=train_norm, **kw)
        net2.load_weights(path)
        net2.set_multiplier(mult)
        with torch.no_grad():
            assert torch.equal(fresh(x, sigma, ctx), out)
        # ComfyUI's application of the file (fp32 merge) gives the same output: our scale is ComfyUI's
        merged = load_dit(dit_file, dtype=torch.float32)
        report = apply_network_file(merged, path, mult)
        assert not report["not_loaded"] and not report["errors"] and not report["not_in_model"]
        with torch.no_grad():
            comfy = merged(x, sigma, ctx)
            base = load_dit(dit_file, dtype=torch.float32)(x, sigma, ctx)
        rel = ((comfy - out).abs().max() / out.abs().max()).item()
        effect = ((out - base).abs().max() / out.abs().max()).item()
        print(f"{algo} {kw} train_norm={train_norm} m={mult}: rel err vs ComfyUI {rel:.2e}, effect {effect:.2e}")
        assert rel <= 1e-5, rel
        assert effect > 100 * rel  # the adapter really changes the output


def test_remove_restores_norms_and_bf16(dit_file):
    dit = load_dit(dit_file, dtype=torch.bfloat16)
    x, sigma, ctx = inputs()
    with torch.no_grad():
        ref = dit(x, sigma, ctx)
    net = create_network(dit, algo="lokr", dim=2, train_norm="1")
    with torch.no_grad():
        assert torch.equal(dit(x, sigma, ctx), ref)
    randomize(net)
    out = dit(x, sigma, ctx)
    out.float().square().mean().backward()
    for p in [*(p for m in net.lora_modules for p in m.tensors().values()),  # (the adapter does not run here)
              *(m.weight for m in net.norm_modules if not m.path.startswith("llm_adapter."))]:
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    net.remove()
    with torch.no_grad():
        assert torch.equal(dit(x, sigma, ctx), ref)
    assert all("forward" not in m.__dict__ for m in dit.modules())
    assert dit.t_embedding_norm.weight.dtype == torch.bfloat16


def test_load_mismatches_are_named(dit, dit_file, tmp_path):
    net = create_network(dit, algo="lokr", dim=2, alpha=3.0, train_norm="true")
    path = net.save(tmp_path / "lokr.safetensors")
    net.remove()
    fresh = load_dit(dit_file, dtype=torch.float32)
    for kw, match in (({"algo": "loha", "dim": 2, "alpha": 3.0, "train_norm": "true"}, "not loha weights"),
                      ({"algo": "lokr", "dim": 2, "alpha": 3.0}, "train_norm"),
                      ({"algo": "lokr", "dim": 2, "alpha": 3.0, "train_norm": "true", "full_matrix": "true"},
                       r"blocks\.0\.self_attn\.q_proj: file has \['\.lokr_w2_a', '\.lokr_w2_b'\]"),
                      ({"algo": "lokr", "dim": 1, "alpha": 3.0, "train_norm": "true"}, r"lokr_w2_a has shape"),
                      ({"algo": "lokr", "dim": 2, "alpha": 1.0, "train_norm": "true"}, "file has alpha 3")):
        other = create_network(fresh, **kw)
        with pytest.raises(NetworkError, match=match):
            other.load_weights(path)
        other.remove()
    # the file without norms does not load into a train_norm network
    plain = create_network(fresh, algo="lokr", dim=2, alpha=3.0)
    plain_path = plain.save(tmp_path / "plain.safetensors")
    plain.remove()
    with_norm = create_network(fresh, algo="lokr", dim=2, alpha=3.0, train_norm="true")
    with pytest.raises(NetworkError, match="no .w_norm"):
        with_norm.load_weights(plain_path)


def test_full_lokr_alpha_is_not_checked(dit, dit_file, tmp_path):
    """Both factors full: ComfyUI ignores alpha, so a file with another alpha means the same thing."""
    net = create_network(dit, algo="lokr", dim=100000, alpha=5.0)
    randomize(net)
    path = net.save(tmp_path / "full.safetensors", metadata={"ss_note": "x"})
    with safe_open(str(path), "pt") as f:
        assert float(f.get_tensor("diffusion_model.blocks.0.mlp.layer2.alpha")) == 5.0
        assert f.metadata()["ss_network_module"] == "anima_trainer.networks.lokr"
    fresh = load_dit(dit_file, dtype=torch.float32)
    create_network(fresh, algo="lokr", dim=100000, alpha=1.0).load_weights(path)


@pytest.mark.parametrize("word", ["TRUE", "on", "Yes", "1", " off ", "False", "0", "NO"])
def test_train_norm_bool_words(dit, word):
    net = create_network(dit, algo="loha", dim=2, train_norm=word)
    assert net.train_norm == (word.strip().lower() in ("true", "on", "yes", "1"))
    assert bool(net.norm_modules) == net.train_norm
