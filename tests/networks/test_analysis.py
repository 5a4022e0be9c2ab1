"""Weight analysis (networks/analysis.py, `inspect --analysis`): known updates give known numbers, the low-rank
shortcuts equal a full SVD of ComfyUI's ΔW, a saved file reads as the in-memory network, the CLI prints the tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anima_trainer.cli import main
from anima_trainer.networks import NetworkError, create_network
from anima_trainer.networks.analysis import (
    BLOCK_TYPES,
    analyse_network,
    analyse_network_file,
    analyse_state_dict,
    block_of,
    block_type_of,
    spectrum_stats,
)
from anima_trainer.networks.formats import COMFY_PREFIX, delta_weight

Q = "blocks.0.self_attn.q_proj"  # 64×64 in the tiny DiT
MLP = "blocks.1.mlp.layer1"  # 256×64


def randomise(net, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_keys(module: str, up: torch.Tensor, down: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    stem = COMFY_PREFIX + module
    return {stem + ".lora_up.weight": up, stem + ".lora_down.weight": down, stem + ".alpha": torch.tensor(alpha)}


def orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].float()


def test_rank_one_update(dit):
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 1, generator=g), torch.randn(1, 64, generator=g)
    a = analyse_state_dict(lora_keys(Q, u, v, alpha=0.5), dit)  # scale alpha/rank = 0.5
    (m,) = a.modules
    assert (m.target, m.algorithm, m.block, m.block_type, m.shape) == (Q + ".weight", "LoRA", "blocks.0",
                                                                        "self_attn", (64, 64))
    assert m.norm == pytest.approx(0.5 * float(u.norm() * v.norm()), rel=1e-5)
    assert m.effective_rank == pytest.approx(1.0) and m.top_energy == pytest.approx(1.0)
    assert m.stable_rank == pytest.approx(1.0)
    assert a.total_energy == pytest.approx(m.energy) and a.skipped == {}


@pytest.mark.parametrize("r", [2, 3, 8])
def test_orthogonal_rank_r_update(dit, r):
    """ΔW = c·U·Vᵀ with orthonormal U, V: r equal singular values c, so every rank measure says r."""
    c = 0.7
    a = analyse_state_dict(lora_keys(MLP, c * orthonormal(256, r, 1), orthonormal(64, r, 2).T, alpha=r), dit)
    (m,) = a.modules
    assert m.effective_rank == pytest.approx(r, rel=1e-4) and m.stable_rank == pytest.approx(r, rel=1e-4)
    assert m.top_energy == pytest.approx(1 / r, rel=1e-4) and m.norm == pytest.approx(c * math.sqrt(r), rel=1e-5)


def test_spectrum_stats_definitions():
    sigma = torch.tensor([3.0, 1.0, 0.0])
    p = torch.tensor([0.75, 0.25])
    effective, stable, top = spectrum_stats(sigma)
    assert effective == pytest.approx(math.exp(float(-(p * p.log()).sum())))  # Roy & Vetterli on σ/Σσ
    assert top == pytest.approx(9 / 10) and stable == pytest.approx(10 / 9)
    assert spectrum_stats(torch.zeros(4)) == (0.0, 0.0, 0.0)  # a fresh LoRA (up = 0)


def _full_sigma(patch, shape):
    return torch.linalg.svdvals(delta_weight(patch, torch.zeros(shape), 1.0).double())


@pytest.mark.parametrize(("algo", "kw"), [("lora", {"dim": 4, "alpha": 2.0}),
                                          ("lokr", {"dim": 2, "alpha": 3.0}),
                                          ("lokr", {"dim": 2, "alpha": 3.0, "full_matrix": "true"}),
                                          ("loha", {"dim": 3, "alpha": 6.0})])
def test_shortcuts_equal_full_svd_of_comfy_delta(dit, algo, kw):
    """LoRA's r×r core and LoKr's Kronecker split give the singular values of ComfyUI's ΔW (formats.delta_weight,
    formed in full here), so the same norms and ranks."""
    from anima_trainer.networks.formats import comfy_key_map, parse_patches

    net = create_network(dit, algo=algo, **kw)
    randomise(net, 3)
    sd = net.state_tensors()
    a = analyse_network(net)
    patches, _ = parse_patches(sd, comfy_key_map(dit))
    assert len(a.modules) == len(patches) > 10
    for m in a.modules:
        sigma = _full_sigma(patches[m.target], m.shape)
        effective, stable, top = spectrum_stats(sigma)
        assert m.norm == pytest.approx(float(sigma.square().sum().sqrt()), rel=1e-4), m.target
        assert m.effective_rank == pytest.approx(effective, rel=1e-3), m.target
        assert m.stable_rank == pytest.approx(stable, rel=1e-3) and m.top_energy == pytest.approx(top, rel=1e-3)
    net.remove()


def test_shares_sum_to_one_and_block_types(dit):
    net = create_network(dit, dim=4, alpha=1.0, train_norm=True, train_llm_adapter=True, train_adaln=True)
    randomise(net, 5)
    a = analyse_network(net)
    assert sum(g.share for g in a.by_type) == pytest.approx(1.0)
    assert sum(g.share for g in a.by_block) == pytest.approx(1.0)
    assert sum(g.modules for g in a.by_type) == sum(g.modules for g in a.by_block) == len(a.modules)
    assert [g.name for g in a.by_type] == [t for t in BLOCK_TYPES if t in {g.name for g in a.by_type}]
    assert {g.name for g in a.by_type} >= {"self_attn", "cross_attn", "mlp", "adaln", "llm_adapter"}
    assert [g.name for g in a.by_block][:2] == ["blocks.0", "blocks.1"]
    for g in a.by_type:
        members = [m for m in a.modules if m.block_type == g.name]
        assert g.energy == pytest.approx(sum(m.energy for m in members)) and g.norm == pytest.approx(
            math.sqrt(g.energy))
    norms = [m for m in a.modules if len(m.shape) == 1]  # train_norm's w_norm entries: norm only
    assert norms and all(m.algorithm == "diff" and m.effective_rank is None for m in norms)
    net.remove()


def test_names_to_blocks():
    assert block_type_of("blocks.3.adaln_modulation_cross_attn.1.weight") == "adaln"
    assert block_type_of("final_layer.adaln_modulation.1.weight") == "adaln"
    assert block_type_of("blocks.3.cross_attn.k_norm.weight") == "cross_attn"
    assert block_type_of("llm_adapter.blocks.0.self_attn.q_proj.weight") == "llm_adapter"
    assert block_type_of("text_encoder.layers.2.mlp.up_proj.weight") == "text_encoder"
    assert block_type_of("t_embedder.1.linear_1.weight") == "other"
    assert block_of("llm_adapter.blocks.4.mlp.0.weight") == "llm_adapter.blocks.4"
    assert block_of("text_encoder.layers.11.mlp.up_proj.weight") == "text_encoder.layers.11"
    assert block_of("blocks.12.mlp.layer1.weight") == "blocks.12" and block_of("x_embedder.proj.1.weight") == \
        "x_embedder"


@pytest.mark.parametrize(("kind", "kw"), [("lora", {}), ("dora", {"dora_wd": True}), ("lokr", {"algo": "lokr"}),
                                          ("loha", {"algo": "loha"}), ("train_norm", {"train_norm": True})])
@pytest.mark.parametrize("save_format", ["comfy", "kohya"])
def test_file_equals_in_memory_network(dit, tmp_path, kind, kw, save_format):
    net = create_network(dit, dim=4, alpha=2.0, **kw)
    randomise(net, 7)
    path = net.save(tmp_path / f"{kind}.safetensors", save_format=save_format)
    memory = analyse_network(net).to_dict()
    disk = analyse_network_file(path, dit).to_dict()  # the real DiT: DoRA's base weights are known
    net.remove()
    assert disk.pop("file") == str(path) and memory.pop("file") == "<memory>"
    assert disk["skipped"] == memory["skipped"] == {}
    assert [m["target"] for m in disk["modules"]] == [m["target"] for m in memory["modules"]]
    for d, m in zip(disk["modules"], memory["modules"], strict=True):
        for key, value in m.items():
            assert d[key] == (pytest.approx(value, rel=1e-5, abs=1e-9) if isinstance(value, float) else value), key
    assert [g["name"] for g in disk["by_block"]] == [g["name"] for g in memory["by_block"]]
    assert disk["total_energy"] == pytest.approx(memory["total_energy"], rel=1e-6)
    if kind == "dora":  # on the meta DiT (no base weights) only the low-rank part is measured, and said so
        meta = analyse_network_file(path)
        assert all(m.note and "DoRA" in m.note for m in meta.modules)


def test_cli_prints_tables_and_json(dit, tmp_path, capsys):
    net = create_network(dit, dim=4, alpha=2.0, train_norm=True, train_adaln=True)
    randomise(net, 9)
    path = net.save(tmp_path / "n.safetensors")
    net.remove()
    assert main(["inspect", "--analysis", "--top", "3", str(path)]) == 0
    text = capsys.readouterr().out
    assert "weight analysis of" in text and "block type" in text and "top 3 module(s)" in text
    for name in ("self_attn", "cross_attn", "mlp", "adaln", "blocks.0", "blocks.1"):
        assert f"\n  {name} " in text, name
    assert main(["inspect", "--analysis", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    analysis = report["analysis"]
    assert report["broken"] == [] and analysis["file"] == str(path)
    assert sum(g["share"] for g in analysis["by_type"]) == pytest.approx(1.0)
    expected = analyse_network_file(path).to_dict()
    assert analysis["total_energy"] == pytest.approx(expected["total_energy"])


def test_non_network_file_is_a_clear_error(dit_file, tmp_path, capsys):
    assert main(["inspect", "--analysis", str(dit_file)]) == 2
    err = capsys.readouterr().err
    assert f"error: {dit_file}: not a network file (it reads as 'anima_dit'); --analysis reads adapter files" in err
    assert main(["inspect", str(dit_file)]) == 0  # without --analysis: the model summary as before
    capsys.readouterr()
    with pytest.raises(NetworkError, match="not a network file"):
        analyse_network_file(dit_file)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(NetworkError, match="not a readable .safetensors file"):
        analyse_network_file(junk)
