"""`anima-trainer merge --average` (checkpoint soup, tools/merge.average_networks): the tensor-wise mean of networks
of one structure, refused with the first difference otherwise; the result loads like any network file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from anima_trainer.cli import main
from anima_trainer.networks import check_comfy_keys, create_network
from anima_trainer.networks.hashes import verify_hashes
from anima_trainer.tools.merge import SOUP_META


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def saved(dit, path, seed: int, **kw):
    """A network with random factors (seeded) saved to `path`; removed from the DiT afterwards."""
    kw = {"dim": 4, "alpha": 2.0, **kw}
    dtype = kw.pop("save_dtype", None)
    net = create_network(dit, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save(path, dtype=dtype)
    net.remove()
    return path


@pytest.fixture
def pair(dit, tmp_path):
    return (saved(dit, tmp_path / "a.safetensors", 1, train_norm=True),
            saved(dit, tmp_path / "b.safetensors", 2, train_norm=True))


def test_average_is_the_tensor_wise_mean(dit, pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "soup.safetensors"
    assert main(["merge", "--average", str(a), str(b), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    (ta, ma), (tb, mb), (to, mo) = read(a), read(b), read(out)
    assert sorted(to) == sorted(ta)
    for k in ta:
        assert to[k].dtype == ta[k].dtype
        if k.endswith(".alpha"):
            assert torch.equal(to[k], ta[k])
        else:
            expected = ((ta[k].double() + tb[k].double()) / 2).to(ta[k].dtype)
            assert torch.equal(to[k], expected), k
            assert not torch.equal(to[k], ta[k])
    soup = json.loads(mo[SOUP_META])
    assert soup == [{"file": "a.safetensors", "weight": 0.5, "sshs_model_hash": ma["sshs_model_hash"]},
                    {"file": "b.safetensors", "weight": 0.5, "sshs_model_hash": mb["sshs_model_hash"]}]
    assert mo["ss_network_module"] == ma["ss_network_module"]
    assert mo["sshs_model_hash"] not in (ma["sshs_model_hash"], mb["sshs_model_hash"])
    assert set(verify_hashes(out).values()) == {"ok"}
    # it loads like any network: ComfyUI's key rules, the strict loader, inspect
    check_comfy_keys(out, dit)
    net = create_network(dit, dim=4, alpha=2.0, train_norm=True)
    net.load_weights(out)
    state = net.state_tensors()
    for k, v in to.items():  # norm gains are stored as W − W₀: a rounding step on the way back
        torch.testing.assert_close(state[k].to(v.dtype), v, rtol=0, atol=1e-6, msg=k)
    net.remove()
    assert main(["inspect", str(out)]) == 0
    assert "OK: ComfyUI loads every key" in capsys.readouterr().out


def test_weights(dit, pair, tmp_path):
    a, b = pair
    c = saved(dit, tmp_path / "c.safetensors", 3, train_norm=True)
    out = tmp_path / "w.safetensors"
    assert main(["merge", "--average", str(a), str(b), str(c), "--weights", "2", "1", "1", "--out", str(out)]) == 0
    (ta, _), (tb, _), (tc, _), (to, mo) = read(a), read(b), read(c), read(out)
    for k in ta:
        if not k.endswith(".alpha"):
            expected = (0.5 * ta[k].double() + 0.25 * tb[k].double() + 0.25 * tc[k].double()).to(ta[k].dtype)
            assert torch.equal(to[k], expected), k
    assert [e["weight"] for e in json.loads(mo[SOUP_META])] == [0.5, 0.25, 0.25]


@pytest.mark.parametrize(("kw", "message"), [
    ({"dim": 8}, "rank 4 vs 8"),
    ({"alpha": 1.0}, "alpha [2.0] vs [1.0]"),
    ({"algo": "lokr"}, "algorithm (ss_network_module)"),
    ({"dora_wd": True}, "dora_scale is in this file only"),
])
def test_different_structures_are_refused(dit, tmp_path, capsys, kw, message):
    a = saved(dit, tmp_path / "a.safetensors", 1)
    b = saved(dit, tmp_path / "b.safetensors", 2, **kw)
    out = tmp_path / "soup.safetensors"
    assert main(["merge", "--average", str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"merge --average: {b} has not the structure of {a}: " in err and message in err, err
    assert "nothing written" in err and not out.exists()


def test_other_keys_are_named(dit, tmp_path, capsys):
    a = saved(dit, tmp_path / "a.safetensors", 1)
    b = saved(dit, tmp_path / "b.safetensors", 2, train_norm=True)
    assert main(["merge", "--average", str(a), str(b), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "key diffusion_model." in err and ".w_norm is in this file only" in err and "0 key(s) only in the first" \
        in err


def test_outputs_and_arguments(dit, pair, tmp_path, capsys, dit_file):
    a, b = pair
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"keep me")
    assert main(["merge", "--average", str(a), str(b), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["merge", "--average", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert SOUP_META in read(out)[1]
    capsys.readouterr()
    cases = [
        (["--average", str(a), str(b), "--out", str(a), "--overwrite"], "the output is one of the inputs"),
        (["--average", str(a), "--out", str(tmp_path / "x.safetensors")], "at least two network files"),
        (["--average", str(a), str(b), "--weights", "1", "--out", str(tmp_path / "x.safetensors")],
         "1 weight(s) for 2 file(s)"),
        (["--average", str(a), str(b), "--weights", "1", "-1", "--out", str(tmp_path / "x.safetensors")],
         "not negative"),
        (["--average", str(a), str(b)], "needs --out"),
        (["--average", str(a), str(b), "--dit", str(dit_file), "--out", str(tmp_path / "x.safetensors")],
         "--dit cannot go with it"),
        (["--average", str(a), str(dit_file), "--out", str(tmp_path / "x.safetensors")], str(dit_file)),
        (["--dit", str(dit_file), "--out", str(tmp_path / "x.safetensors")], "give --network FILE[:MUL]"),
        (["--dit", str(dit_file), "--network", str(a), "--weights", "1", "--out", str(tmp_path / "x.safetensors")],
         "--weights goes with --average"),
    ]
    for argv, message in cases:
        assert main(["merge", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "x.safetensors").exists()


def test_bf16_files_keep_their_dtype(dit, tmp_path):
    a = saved(dit, tmp_path / "a.safetensors", 1, save_dtype=torch.bfloat16)
    b = saved(dit, tmp_path / "b.safetensors", 2, save_dtype=torch.bfloat16)
    out = tmp_path / "soup.safetensors"
    assert main(["merge", "--average", str(a), str(b), "--out", str(out)]) == 0
    (ta, _), (tb, _), (to, _) = read(a), read(b), read(out)
    k = next(k for k in ta if k.endswith(".lora_down.weight"))
    assert to[k].dtype == torch.bfloat16
    assert torch.equal(to[k], ((ta[k].double() + tb[k].double()) / 2).to(torch.bfloat16))


def test_soup_delta_is_the_mean_delta_less_the_deviation_term(dit, pair, tmp_path):
    """docs/evaluation.md's identity: mean(s·BᵢAᵢ) − s·B̄Ā = s·Σwᵢ·bᵢaᵢ (bᵢ, aᵢ the deviations from the mean)."""
    a, b = pair
    out = tmp_path / "soup.safetensors"
    assert main(["merge", "--average", str(a), str(b), "--weights", "3", "1", "--out", str(out)]) == 0
    stem = "diffusion_model.blocks.0.self_attn.q_proj"
    (ta, _), (tb, _), (to, _) = read(a), read(b), read(out)
    s = float(to[stem + ".alpha"]) / to[stem + ".lora_down.weight"].shape[0]
    w = (0.75, 0.25)
    ups = [t[stem + ".lora_up.weight"].double() for t in (ta, tb)]
    downs = [t[stem + ".lora_down.weight"].double() for t in (ta, tb)]
    mean_delta = sum(wi * s * u @ d for wi, u, d in zip(w, ups, downs, strict=True))
    soup_delta = s * to[stem + ".lora_up.weight"].double() @ to[stem + ".lora_down.weight"].double()
    up_bar, down_bar = sum(wi * u for wi, u in zip(w, ups, strict=True)), sum(wi * d for wi, d in zip(w, downs,
                                                                                                      strict=True))
    deviation = sum(wi * s * (u - up_bar) @ (d - down_bar) for wi, u, d in zip(w, ups, downs, strict=True))
    torch.testing.assert_close(mean_delta - soup_delta, deviation, rtol=0, atol=1e-6)
    assert float(deviation.norm()) > 1e-3  # unrelated random factors: the soup is not the mean update
