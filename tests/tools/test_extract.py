"""`anima-trainer extract`: a fine-tuned DiT back to a LoRA (tools/extract.py).

The tuned model is the demo's tiny DiT (2 blocks, width 64, LLM adapter) plus a known ΔW of rank 3 on every
default LoRA target of block 0, a full-rank ΔW on block 1's self-attention q_proj, and changes a LoRA cannot
carry (a norm gain, an adapter bias, an adaLN Linear outside the default targets); block 1's other targets are
unchanged.  Applying the extracted file is ComfyUI's math (`merge`'s merge_networks / apply_network_file)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anima_trainer.cli import main
from anima_trainer.demo import TINY_DIT_CONFIG, write_tiny_dit
from anima_trainer.fileio import OutputExistsError
from anima_trainer.models import load_dit
from anima_trainer.networks import NetworkError, apply_network_file
from anima_trainer.networks.convert import build_meta_dit
from anima_trainer.networks.diffusers_format import comfy_to_diffusers, unmatched_diffusers_keys
from anima_trainer.networks.formats import unmatched_keys
from anima_trainer.networks.inject import find_targets, linear_paths
from anima_trainer.networks.rebuild import create_network_from_weights
from anima_trainer.tools.extract import (
    EXTRACT_META,
    extract_lora,
    low_rank_factors,
    report_path,
)
from anima_trainer.tools.merge import merge_networks
from tests.networks.test_diffusers_format import fused_in_diffusers, lora_layers, pipeline

LOW_RANK = 3
FULL_RANK_MODULE = "blocks.1.self_attn.q_proj"
NORM_GAIN = "blocks.0.self_attn.q_norm.weight"
BIAS = "llm_adapter.out_proj.bias"
ADALN = "blocks.0.adaln_modulation_mlp.1.weight"  # a Linear outside the default targets


def low_rank_delta(shape, rank: int, g: torch.Generator) -> torch.Tensor:
    out, inp = shape
    return 0.05 * torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g) / math.sqrt(rank)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"base", "tuned": files, "deltas": {module path: ΔW}} (module doc)."""
    tmp = tmp_path_factory.mktemp("extract")
    base = write_tiny_dit(tmp / "base.safetensors")
    sd = load_file(base)
    targets = list(find_targets(build_meta_dit(base)))
    g = torch.Generator().manual_seed(5)
    deltas = {}
    for path in targets:
        key = f"net.{path}.weight"
        if path.startswith("blocks.0."):
            deltas[path] = low_rank_delta(sd[key].shape, LOW_RANK, g)
        elif path == FULL_RANK_MODULE:
            deltas[path] = 0.02 * torch.randn(sd[key].shape, generator=g)
        else:
            continue
        sd[key] = sd[key] + deltas[path]
    sd[f"net.{NORM_GAIN}"] = sd[f"net.{NORM_GAIN}"] * 1.1
    sd[f"net.{BIAS}"] = sd[f"net.{BIAS}"] + 0.01
    sd[f"net.{ADALN}"] = sd[f"net.{ADALN}"] + 0.01 * torch.randn(sd[f"net.{ADALN}"].shape, generator=g)
    tuned = tmp / "tuned.safetensors"
    save_file(sd, tuned, {"format": "pt"})
    return {"base": base, "tuned": tuned, "deltas": deltas, "targets": targets}


def state(path) -> dict[str, torch.Tensor]:
    return load_dit(path, dtype=torch.float32).state_dict()


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


# ----------------------------------------------------------------------------------------- exactness --

def test_full_rank_with_diffs_reproduces_the_tuned_model(models, tmp_path):
    out = tmp_path / "full.safetensors"
    result = extract_lora(models["base"], models["tuned"], out, rank=1024, diffs=True, device="cpu")
    merged = merge_networks(models["base"], [(str(out), 1.0)], tmp_path / "merged.safetensors")
    assert merged["not_loaded"] == {}
    got, want = state(tmp_path / "merged.safetensors"), state(models["tuned"])
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-5, worst  # measured: 8e-8
    assert {e["tensor"] for e in result.not_extracted} == {NORM_GAIN, BIAS, ADALN}
    assert all(e["saved_as_diff"] for e in result.not_extracted)
    tensors, _ = read(out)
    assert f"diffusion_model.{NORM_GAIN[:-len('.weight')]}.diff" in tensors
    assert "diffusion_model.llm_adapter.out_proj.diff_b" in tensors
    assert f"diffusion_model.{ADALN[:-len('.weight')]}.diff" in tensors


def test_bf16_checkpoints_merge_back_to_the_tuned_bf16_weights(models, tmp_path):
    """Released checkpoints are bf16: ΔW of two bf16 files is exact in fp32, and ComfyUI's merge (fp32, rounded
    to bf16) of the full-rank extract lands on the tuned bf16 weights, all but a few within one rounding."""
    base = write_tiny_dit(tmp_path / "base16.safetensors", dtype=torch.bfloat16)
    sd = load_file(base)
    for path, delta in models["deltas"].items():
        sd[f"net.{path}.weight"] = (sd[f"net.{path}.weight"].float() + delta).bfloat16()
    tuned = tmp_path / "tuned16.safetensors"
    save_file(sd, tuned, {"format": "pt"})
    out = tmp_path / "lora.safetensors"
    extract_lora(base, tuned, out, rank=1024, device="cpu")
    merge_networks(base, [(str(out), 1.0)], tmp_path / "merged.safetensors")
    got, want = load_file(tmp_path / "merged.safetensors"), load_file(tuned)
    for path in models["deltas"]:
        a, b = got[f"net.{path}.weight"], want[f"net.{path}.weight"]
        assert a.dtype == b.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp(min=1e-30)
        assert ((a.float() - b.float()).abs() <= ulp).all(), path  # within one bf16 rounding
        assert (a == b).float().mean() >= 0.99, path  # measured: bit-equal but for rounding ties


def test_without_diffs_the_lora_reproduces_exactly_the_targets_and_reports_the_rest(models, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = extract_lora(models["base"], models["tuned"], out, rank=64, device="cpu")
    dit = load_dit(models["base"], dtype=torch.float32)
    report = apply_network_file(dit, out)
    assert report["not_loaded"] == [] and report["errors"] == {}
    assert sorted(report["patched"]) == sorted(p + ".weight" for p in models["deltas"])
    base, tuned, got = state(models["base"]), state(models["tuned"]), dit.state_dict()
    for name in tuned:
        if name in report["patched"]:
            assert (got[name] - tuned[name]).abs().max() <= 1e-5, name
        else:  # what the LoRA cannot carry stays the base's
            assert torch.equal(got[name], base[name]), name
    left = {e["tensor"]: e for e in result.not_extracted}
    assert {k: v["kind"] for k, v in left.items()} == {NORM_GAIN: "norm gain", BIAS: "bias",
                                                       ADALN: "Linear outside the targets"}
    assert not any(e["saved_as_diff"] for e in left.values())
    want = (tuned[NORM_GAIN] - base[NORM_GAIN]).norm() / base[NORM_GAIN].norm()
    assert left[NORM_GAIN]["relative_change"] == pytest.approx(float(want), rel=1e-5)
    # the unchanged default targets (block 1 but its q_proj) are skipped and named
    assert result.unchanged == [p for p in models["targets"] if p not in models["deltas"]]
    tensors, _ = read(out)
    assert len(tensors) == 3 * len(models["deltas"])
    for path in models["deltas"]:
        stem = f"diffusion_model.{path}"
        up, down = tensors[stem + ".lora_up.weight"], tensors[stem + ".lora_down.weight"]
        assert up.dtype == down.dtype == torch.float32
        assert float(tensors[f"diffusion_model.{path}.alpha"]) == up.shape[1] == down.shape[0]  # scale 1


def test_rank_r_delta_is_exact_at_rank_r_and_lower_ranks_lose_the_svd_tail(models, tmp_path):
    exact = extract_lora(models["base"], models["tuned"], tmp_path / "r3.safetensors", rank=LOW_RANK, device="cpu")
    fits = {f.module: f for f in exact.modules}
    for path, delta in models["deltas"].items():
        s = torch.linalg.svdvals(delta.double())
        fit = fits[path]
        assert fit.rank == LOW_RANK
        if path == FULL_RANK_MODULE:  # full rank cut to 3: the tail's share
            tail = float(s[LOW_RANK:].square().sum().sqrt() / s.square().sum().sqrt())
            assert fit.relative_error == pytest.approx(tail, rel=1e-4)
            assert fit.retained_energy == pytest.approx(1 - tail**2, rel=1e-5)
        else:
            assert fit.relative_error <= 1e-5, (path, fit.relative_error)
            assert fit.retained_energy == pytest.approx(1.0, abs=1e-6)
    one = extract_lora(models["base"], models["tuned"], tmp_path / "r1.safetensors", rank=1, device="cpu")
    for fit in one.modules:
        s = torch.linalg.svdvals(models["deltas"][fit.module].double())
        tail = float(s[1:].square().sum().sqrt() / s.square().sum().sqrt())
        assert fit.rank == 1
        assert fit.relative_error == pytest.approx(tail, rel=1e-4), fit.module  # Eckart–Young: exactly the tail
        assert fit.retained_energy == pytest.approx(float(s[0] ** 2 / s.square().sum()), rel=1e-5)
        assert fit.delta_norm == pytest.approx(float(s.square().sum().sqrt()), rel=1e-5)
    # the applied rank-1 file is off by exactly the reported error
    dit = load_dit(models["base"], dtype=torch.float32)
    apply_network_file(dit, tmp_path / "r1.safetensors")
    base = state(models["base"])
    for fit in one.modules:
        name = fit.module + ".weight"
        applied = dit.state_dict()[name] - base[name]
        delta = models["deltas"][fit.module]
        assert float((applied - delta).norm() / delta.norm()) == pytest.approx(fit.relative_error, rel=1e-3)


def test_lowrank_svd_is_exact_on_low_rank_deltas_near_optimal_otherwise_and_repeatable(models, tmp_path):
    exact = extract_lora(models["base"], models["tuned"], tmp_path / "e.safetensors", rank=LOW_RANK, device="cpu")
    fast = extract_lora(models["base"], models["tuned"], tmp_path / "f.safetensors", rank=LOW_RANK, device="cpu",
                        svd="lowrank")
    again = extract_lora(models["base"], models["tuned"], tmp_path / "g.safetensors", rank=LOW_RANK, device="cpu",
                         svd="lowrank")
    optimum = {f.module: f for f in exact.modules}
    for fit in fast.modules:
        best = optimum[fit.module]
        if fit.module == FULL_RANK_MODULE:  # a flat random spectrum, the randomised method's worst case
            assert best.relative_error * (1 - 1e-5) <= fit.relative_error <= best.relative_error * 1.01
        else:
            assert fit.relative_error <= 1e-5, fit.module
        assert fit.retained_energy == pytest.approx(best.retained_energy, rel=1e-2)
    a, b = read(tmp_path / "f.safetensors")[0], read(tmp_path / "g.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same file twice
    assert "svd_lowrank" in again.svd
    assert "svd_lowrank" in json.loads(read(tmp_path / "f.safetensors")[1][EXTRACT_META])["svd"]
    with pytest.raises(NetworkError, match="--svd 'fast': one of exact, lowrank"):
        extract_lora(models["base"], models["tuned"], tmp_path / "x.safetensors", rank=2, svd="fast")


def test_factors_split_the_singular_values_evenly_and_clamp_at_the_quantile():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 32, generator=g)
    up, down, s = low_rank_factors(delta, 8)
    assert up.shape == (48, 8) and down.shape == (8, 32)
    assert torch.allclose(up.norm(dim=0), s[:8].sqrt(), rtol=1e-5)  # √S on each side
    assert torch.allclose(down.norm(dim=1), s[:8].sqrt(), rtol=1e-5)
    cu, cd, _ = low_rank_factors(delta, 8, clamp_quantile=0.9)
    values = torch.cat([up.flatten(), down.flatten()])
    high = values.kthvalue(math.ceil(0.9 * values.numel())).values
    assert cu.abs().max() <= high and cd.abs().max() <= high
    assert torch.equal(cu, up.clamp(-high, high)) and torch.equal(cd, down.clamp(-high, high))


def test_clamping_costs_accuracy_and_is_recorded(models, tmp_path):
    plain = extract_lora(models["base"], models["tuned"], tmp_path / "a.safetensors", rank=64, device="cpu")
    clamped = extract_lora(models["base"], models["tuned"], tmp_path / "b.safetensors", rank=64, device="cpu",
                           clamp_quantile=0.99)
    assert clamped.summary["max_relative_error"] > 10 * plain.summary["max_relative_error"]
    assert json.loads(read(tmp_path / "b.safetensors")[1][EXTRACT_META])["clamp_quantile"] == 0.99


# ------------------------------------------------------------------------------ report and metadata --

def test_report_json_table_and_metadata(models, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = extract_lora(models["base"], models["tuned"], out, rank=2, device="cpu")
    path = report_path(out)
    assert path == tmp_path / "lora.extract.json" and result.report == str(path)
    data = json.loads(path.read_text())
    errors = [m["relative_error"] for m in data["modules"]]
    assert errors == sorted(errors, reverse=True) and len(errors) == len(models["deltas"])
    assert data["summary"]["max_relative_error"] == errors[0]
    assert data["summary"]["mean_relative_error"] == pytest.approx(sum(errors) / len(errors))
    assert data["summary"]["worst_module"] == data["modules"][0]["module"]
    assert data["summary"]["min_retained_energy"] == min(m["retained_energy"] for m in data["modules"])
    assert data["rank"] == 2 and data["svd"].startswith("torch.linalg.svd")
    _, meta = read(out)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "anima_trainer.networks.lora"
    record = json.loads(meta[EXTRACT_META])
    assert record["base"]["name"] == "base.safetensors" and record["tuned"]["name"] == "tuned.safetensors"
    assert len(record["base"]["sshs_model_hash"]) == 64 and record["base"] != record["tuned"]
    assert meta["sshs_model_hash"]  # kohya's hashes of the file's own tensors


def test_the_file_loads_in_comfyui_and_diffusers_with_no_unmatched_key(models, tmp_path):
    dit = build_meta_dit(models["base"])
    plain = tmp_path / "plain.safetensors"
    extract_lora(models["base"], models["tuned"], plain, rank=8, all_linears=True, device="cpu")
    with_diffs = tmp_path / "diffs.safetensors"
    extract_lora(models["base"], models["tuned"], with_diffs, rank=8, diffs=True, device="cpu")
    for f in (plain, with_diffs):
        assert unmatched_keys(read(f)[0], dit) == []
    tensors, _ = read(plain)
    assert any(".adaln_modulation_mlp.1." in k for k in tensors)  # --all-linears: outside the default targets too
    converted, _ = comfy_to_diffusers(tensors, linear_paths(dit))
    assert converted and unmatched_diffusers_keys(converted, linear_paths(dit)) == []


def test_diffusers_own_loader_injects_every_module_of_the_converted_file(models, tmp_path, caplog):
    """diffusers' AnimaLoraLoaderMixin (the oracle of tests/networks/test_diffusers_format.py) loads the file
    after `convert-network --to diffusers` without a warning, one LoRA layer per extracted module, and its fused
    weights are the tuned model's."""
    out, converted = tmp_path / "lora.safetensors", tmp_path / "lora_diffusers.safetensors"
    result = extract_lora(models["base"], models["tuned"], out, rank=64, all_linears=True, device="cpu")
    assert main(["convert-network", str(out), str(converted), "--to", "diffusers", "--dit", str(models["base"])]) == 0
    pipe = pipeline(models["base"])
    with caplog.at_level(logging.INFO, logger="diffusers"):
        pipe.load_lora_weights(str(converted))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert len(lora_layers(pipe)) == len(result.modules)
    pipe.fuse_lora()
    tuned = state(models["tuned"])
    for fit in result.modules:
        name = fit.module + ".weight"
        assert (fused_in_diffusers(pipe, name) - tuned[name]).abs().max() <= 1e-5, name


def test_the_lora_can_be_trained_further(models, tmp_path):
    """Without --diffs the file is a plain LoRA: it rebuilds as a trainable network (network_weights +
    dim_from_weights) with the extracted modules at the extracted rank."""
    out = tmp_path / "lora.safetensors"
    result = extract_lora(models["base"], models["tuned"], out, rank=4, device="cpu")
    dit = load_dit(models["base"], dtype=torch.float32)
    net = create_network_from_weights(dit, out)
    try:
        assert sorted(m.path for m in net.lora_modules) == sorted(f.module for f in result.modules)
        assert {m.dim for m in net.lora_modules} == {4} and {float(m.alpha) for m in net.lora_modules} == {4.0}
    finally:
        net.remove()


# ---------------------------------------------------------------------------------------- targets --

def test_targets_regex_and_all_linears(models, tmp_path):
    r = extract_lora(models["base"], models["tuned"], tmp_path / "t.safetensors", rank=4, device="cpu",
                     targets=[r"blocks\.\d+\.self_attn\..*"])
    assert sorted(f.module for f in r.modules) == sorted(p for p in models["deltas"] if ".self_attn." in p)
    assert ADALN in {e["tensor"] for e in r.not_extracted}
    everything = extract_lora(models["base"], models["tuned"], tmp_path / "a.safetensors", rank=4, device="cpu",
                              all_linears=True)
    assert ADALN[:-len(".weight")] in {f.module for f in everything.modules}
    assert ADALN not in {e["tensor"] for e in everything.not_extracted}
    with pytest.raises(NetworkError, match="full-matches no Linear"):
        extract_lora(models["base"], models["tuned"], tmp_path / "x.safetensors", rank=4, targets=["nothing"])


# ---------------------------------------------------------------------------------------- refusals --

def test_refuses_files_of_another_model_naming_the_first_key(models, tmp_path):
    sd = load_file(models["tuned"])
    sd["net.blocks.0.cross_attn.k_proj.weight"] = sd["net.blocks.0.cross_attn.k_proj.weight"][:, :16].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad, {"format": "pt"})
    out = tmp_path / "x.safetensors"
    with pytest.raises(NetworkError, match=r"'blocks\.0\.cross_attn\.k_proj\.weight' has shape \[64, 16\] in "
                       r"--tuned .*bad\.safetensors but \[64, 64\] in --base"):
        extract_lora(models["base"], bad, out, rank=4)
    other = write_tiny_dit(tmp_path / "other.safetensors", with_llm_adapter=False)
    with pytest.raises(NetworkError, match=r"--tuned .*other\.safetensors has no 'llm_adapter\."):
        extract_lora(models["base"], other, out, rank=4)
    wider = write_tiny_dit(tmp_path / "wide.safetensors", config=TINY_DIT_CONFIG.__class__(
        **{**TINY_DIT_CONFIG.__dict__, "num_blocks": TINY_DIT_CONFIG.num_blocks + 1}))
    with pytest.raises(NetworkError, match=r"--tuned .*wide\.safetensors has \d+ tensor\(s\) --base .* lacks "
                       r"\(first: 'blocks\.2\."):
        extract_lora(models["base"], wider, out, rank=4)
    with pytest.raises(NetworkError, match="nothing to extract"):
        extract_lora(models["base"], models["base"], out, rank=4)
    assert not out.exists() and not report_path(out).exists()


def test_never_overwrites_unless_asked(models, tmp_path):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        extract_lora(models["base"], models["tuned"], out, rank=2)
    assert out.read_bytes() == b"mine" and not report_path(out).exists()
    report_path(out).write_text("{}")
    out.unlink()
    with pytest.raises(OutputExistsError, match=r"lora\.extract\.json already exists"):
        extract_lora(models["base"], models["tuned"], out, rank=2)
    assert not out.exists()
    extract_lora(models["base"], models["tuned"], out, rank=2, overwrite=True)
    assert json.loads(report_path(out).read_text())["rank"] == 2
    with pytest.raises(NetworkError, match="rank must be at least 1"):
        extract_lora(models["base"], models["tuned"], tmp_path / "y.safetensors", rank=0)


# --------------------------------------------------------------------------------------------- CLI --

def test_cli_help_explains_the_command(capsys):
    assert main(["extract", "--help"]) == 0
    text = capsys.readouterr().out
    for words in ("--base", "--tuned", "--rank", "--out", "torch.linalg.svd", "--clamp-quantile", "0.99",
                  "--all-linears", "--diffs", ".extract.json", "relative error"):
        assert words in text, words
    assert main(["--help"]) == 0
    assert "extract" in capsys.readouterr().out


def test_cli_extracts_prints_the_table_and_refuses_an_existing_output(models, tmp_path, capsys):
    out, report = tmp_path / "cli.safetensors", tmp_path / "r.json"
    argv = ["extract", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--rank", "2",
            "--out", str(out), "--report", str(report), "--device", "cpu", "--top", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0] == "reconstruction error per module, worst modules first (3 of 11; all in the report):"
    assert lines[1].split() == ["module", "shape", "rank", "rel.", "error", "energy", "|ΔW|/|W|"]
    data = json.loads(report.read_text())
    assert lines[2].split()[0] == data["modules"][0]["module"]
    assert any(line.startswith("11 module(s) at rank ≤ 2: relative error mean") for line in lines)
    assert any("changed tensor(s) not in the LoRA" in line for line in lines)
    assert lines[-2:] == [str(report), str(out)]
    assert "extract: 20/20 modules" in printed.err
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    wrong = ["extract", "--base", str(out), "--tuned", str(models["tuned"]), "--rank", "2", "--out",
             str(tmp_path / "w.safetensors")]
    assert main(wrong) == 2  # a LoRA given as the base model
    assert "--base expects" in capsys.readouterr().err and not (tmp_path / "w.safetensors").exists()
