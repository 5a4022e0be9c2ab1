"""kohya's lora_anima network_args: rank/module dropout, LoRA+, network_reg_dims/lrs, verbose (all algorithms)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from anima_trainer.models.dit import load_dit
from anima_trainer.networks import NetworkError, create_network
from tests.networks.test_lokr_loha import randomize

Q = "blocks.0.self_attn.q_proj"  # 64 -> 64


def delta(net, path, x):
    """The adapter branch's contribution to the patched Linear's output."""
    lin = net.modules_by_name[path]._org[0]
    return lin(x) - F.linear(x, lin.weight, lin.bias)


def ids(params):
    return {id(p) for p in params}


def test_lora_rank_dropout_masks_rank_per_sample_and_rescales(dit):
    torch.manual_seed(0)
    net = create_network(dit, dim=1, alpha=1.0, rank_dropout="0.5")
    randomize(net)
    x = torch.randn(400, 3, 64)
    net.eval()
    ref = delta(net, Q, x)
    assert torch.equal(delta(net, Q, x), ref)  # eval: no dropout
    net.train()
    d = delta(net, Q, x)
    # dim 1: each sample's single rank channel is either dropped (branch 0) or kept and scaled by 1/(1-0.5)
    zero = d.flatten(1).abs().amax(1) == 0
    assert torch.allclose(d[~zero], 2 * ref[~zero], atol=1e-5)
    assert 0.4 < zero.float().mean().item() < 0.6
    # 5-D activations (B, T, H, W, D) broadcast too
    assert delta(net, Q, torch.randn(2, 1, 2, 2, 64)).shape == (2, 1, 2, 2, 64)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lokr_loha_rank_dropout_drops_output_rows(dit, algo):
    torch.manual_seed(0)
    net = create_network(dit, algo=algo, dim=2, rank_dropout="0.5")
    randomize(net)
    x = torch.randn(8, 64)
    net.eval()
    ref = delta(net, Q, x)
    net.train()
    zeros = 0
    for _ in range(10):
        d = delta(net, Q, x)
        dropped = d.abs().amax(0) == 0  # a whole output row of ΔW: zero for every sample
        assert torch.allclose(d[:, ~dropped], 2 * ref[:, ~dropped], atol=1e-5)
        zeros += int(dropped.sum())
    assert 0.4 < zeros / 640 < 0.6


@pytest.mark.parametrize("algo", ["lora", "lokr", "loha"])
def test_module_dropout_skips_whole_branch_in_training_only(dit, algo):
    torch.manual_seed(0)
    net = create_network(dit, algo=algo, dim=2, module_dropout="0.3")
    randomize(net)
    x = torch.randn(4, 64)
    net.eval()
    ref = delta(net, Q, x)
    assert all(torch.equal(delta(net, Q, x), ref) for _ in range(20))
    net.train()
    skipped = 0
    for _ in range(300):
        d = delta(net, Q, x)
        if d.abs().max() == 0:
            skipped += 1
        else:
            assert torch.allclose(d, ref, atol=1e-6)  # no rescaling when the branch is kept
    assert 0.2 < skipped / 300 < 0.4


@pytest.mark.parametrize(("algo", "plus"), [("lora", {".lora_up.weight"}), ("lokr", {".lokr_w1"}),
                                            ("loha", {".hada_w2_a"})])
def test_loraplus_groups(dit, algo, plus):
    net = create_network(dit, algo=algo, dim=2, loraplus_lr_ratio="16", train_norm="true")
    groups = {g["name"]: g for g in net.param_groups(1e-4)}
    assert set(groups) == {"base", "base/plus"}
    assert groups["base"]["lr"] == 1e-4 and groups["base/plus"]["lr"] == pytest.approx(1.6e-3)
    want = {id(p) for m in net.lora_modules for s, p in m.tensors().items() if s in plus}
    assert ids(groups["base/plus"]["params"]) == want and want
    assert ids(groups["base"]["params"]) | want == ids(net.trainable_parameters())
    assert ids(m.weight for m in net.norm_modules) <= ids(groups["base"]["params"])
    net.remove()
    net = create_network(dit, algo=algo, dim=2, loraplus_lr_ratio="16", loraplus_unet_lr_ratio="4")
    assert {g["name"]: g["lr"] for g in net.param_groups(1.0)} == {"base": 1.0, "base/plus": 4.0}  # unet wins


def test_network_reg_lrs_first_full_match_and_zero_drops(dit):
    net = create_network(dit, dim=2, network_reg_lrs=r".*layer1=1e-3,.*mlp.*=2e-3,mlp=9")
    groups = {g["name"]: g for g in net.param_groups(1e-4)}
    assert {n: g["lr"] for n, g in groups.items()} == {"base": 1e-4, "reg_lr=0.001": 1e-3, "reg_lr=0.002": 2e-3}
    by_name = net.modules_by_name

    def params_of(pred):
        return {id(p) for n, m in by_name.items() if pred(n) for p in m.tensors().values()}

    assert ids(groups["reg_lr=0.001"]["params"]) == params_of(lambda n: n.endswith("mlp.layer1"))
    assert ids(groups["reg_lr=0.002"]["params"]) == params_of(lambda n: ".mlp." in n and "layer1" not in n)
    assert ids(groups["base"]["params"]) == params_of(lambda n: ".mlp." not in n)  # "mlp" alone: full match only
    net.remove()
    net = create_network(dit, dim=2, network_reg_lrs=".*mlp.*=0", loraplus_lr_ratio="2")
    groups = net.param_groups(1e-4)
    assert {g["name"] for g in groups} == {"base", "base/plus"}  # the lr-0 groups are dropped
    assert not ids(p for g in groups for p in g["params"]) & ids(
        p for n, m in net.modules_by_name.items() if ".mlp." in n for p in m.tensors().values())
    net.remove()
    net = create_network(dit, dim=2, network_reg_lrs=".*=0")
    with pytest.raises(NetworkError, match="lr 0"):
        net.param_groups(0.0)


@pytest.mark.parametrize("algo", ["lora", "lokr", "loha"])
def test_network_reg_dims_file_and_reload(dit, dit_file, tmp_path, algo):
    args = {"network_reg_dims": r".*mlp\.layer1=1, .*cross_attn.*=0,.*mlp.*=3"}
    net = create_network(dit, algo=algo, dim=2, alpha=2.0, **args)
    assert not any("cross_attn" in n for n in net.modules_by_name)
    dims = {n: m.dim for n, m in net.modules_by_name.items()}
    assert {d for n, d in dims.items() if n.endswith("layer1")} == {1}
    assert {d for n, d in dims.items() if n.endswith("layer2")} == {3}
    assert {d for n, d in dims.items() if ".mlp." not in n} == {2}
    randomize(net)
    path = net.save(tmp_path / "n.safetensors")
    saved = net.state_tensors()
    rank_key = {"lora": ".lora_down.weight", "lokr": ".lokr_w2_b", "loha": ".hada_w1_b"}[algo]
    assert saved[f"diffusion_model.blocks.0.mlp.layer1{rank_key}"].shape[0] == 1
    assert saved[f"diffusion_model.blocks.0.mlp.layer2{rank_key}"].shape[0] == 3
    assert saved[f"diffusion_model.{Q}{rank_key}"].shape[0] == 2
    net.remove()
    net2 = create_network(load_dit(dit_file, dtype=torch.float32), algo=algo, dim=2, alpha=2.0, **args)
    net2.load_weights(path)
    assert all(torch.equal(t, net2.state_tensors()[k]) for k, t in saved.items())
    net2.remove()
    other = create_network(load_dit(dit_file, dtype=torch.float32), algo=algo, dim=2, alpha=2.0)
    with pytest.raises(NetworkError):  # a network without the same reg dims does not fit the file
        other.load_weights(path)


def test_verbose_logs_target_table(dit, caplog):
    with caplog.at_level(logging.INFO, logger="anima_trainer.networks.base"):
        create_network(dit, algo="lokr", dim=2, alpha=4.0, verbose="true", network_reg_dims=".*layer2=3",
                       network_reg_lrs=".*layer1=1e-3", loraplus_lr_ratio="8")
    text = caplog.text
    assert "module" in text and "lokr" in text
    row = next(line for line in text.splitlines() if line.startswith("blocks.0.mlp.layer1 "))
    assert row.split()[1:5] == ["lokr", "2", "4", "0.001"] and "up ×8" in row
    row = next(line for line in text.splitlines() if line.startswith("blocks.0.mlp.layer2 "))
    assert row.split()[1:5] == ["lokr", "3", "4", "base"]


@pytest.mark.parametrize(("args", "message"), [
    ({"rank_dropout": "1"}, r"rank_dropout must be a number in \[0, 1\)"),
    ({"rank_dropout": "x"}, "rank_dropout must be a number"),
    ({"module_dropout": "-0.1"}, "module_dropout must be a number"),
    ({"loraplus_lr_ratio": "0"}, r"loraplus_lr_ratio must be a number in \(0, inf\)"),
    ({"loraplus_unet_lr_ratio": "nan"}, "loraplus_unet_lr_ratio must be a number"),
    ({"network_reg_dims": ".*=x"}, "dim must be an integer >= 0"),
    ({"network_reg_dims": ".*=-1"}, "dim must be an integer >= 0"),
    ({"network_reg_dims": "4"}, "is not regex=value"),
    ({"network_reg_dims": "[a=2"}, "bad regex"),
    ({"network_reg_dims": ".*=0"}, "dim 0 to every target"),
    ({"network_reg_lrs": ".*=-1e-4"}, "network_reg_lrs"),
    ({"network_reg_lrs": ".*=fast"}, "network_reg_lrs"),
    ({"verbose": "loud"}, "verbose must be true or false"),
    ({"loraplus_text_encoder_lr_ratio": "0"}, r"loraplus_text_encoder_lr_ratio must be a number in \(0, inf\)"),
])
@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_bad_values(dit, algo, args, message):
    with pytest.raises(NetworkError, match=message):
        create_network(dit, algo=algo, dim=2, **args)
