"""A few LoKr / LoHa (+ train_norm) training steps on the tiny model: the saved file reloads exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from anima_trainer.config import parse_train_args
from anima_trainer.demo import (
    write_demo_configs,
    write_demo_models,
    write_shapes_dataset,
)
from anima_trainer.models import load_dit
from anima_trainer.networks import apply_network_file, create_network
from anima_trainer.train.loop import run_training


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_lyco")
    return {"root": root, "models": write_demo_models(root / "models", seed=3),
            "images": write_shapes_dataset(root / "images", count=4, seed=3)}


CASES = [("lycoris.kohya", ["algo=lokr", "train_norm=true"], "lokr", {"dim": 2, "alpha": 3.0}),
         ("networks.loha", ["train_norm=false"], "loha", {"dim": 2, "alpha": 3.0}),
         ("networks.lokr", ["factor=4", "decompose_both=on"], "lokr", {"dim": 1, "alpha": 3.0})]


@pytest.mark.parametrize(("module", "args", "algo", "kw"), CASES, ids=["lycoris-lokr-norm", "loha", "lokr-both"])
def test_train_save_reload(setup, module, args, algo, kw):
    out = setup["root"] / f"run_{algo}_{len(args)}"
    toml = write_demo_configs(out, setup["models"], setup["images"], 4, seed=5)
    cfg = parse_train_args(["--config_file", str(toml), "--network_module", module, "--network_dim", str(kw["dim"]),
                            "--network_alpha", str(kw["alpha"]), "--learning_rate", "1e-2",
                            "--network_args", *args])
    assert cfg.network_module == algo
    run = run_training(cfg)
    assert run.steps == 4
    with safe_open(str(run.final_path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_network_module"] == f"networks.{algo}"
    assert any(k.endswith(".lokr_w1" if algo == "lokr" and "factor=4" not in args else
                          ".lokr_w1_a" if algo == "lokr" else ".hada_w2_a") for k in keys)
    train_norm = "train_norm=true" in args
    assert any(k.endswith(".w_norm") for k in keys) == train_norm
    net_args = {a.split("=")[0]: a.split("=")[1] for a in args if not a.startswith("algo=")}
    fresh = load_dit(setup["models"]["dit"], dtype=torch.float32)
    net = create_network(fresh, algo=algo, **kw, **net_args)
    net.load_weights(run.final_path)
    net.eval()
    run.network.eval()
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        trained = run.dit(x, s, ctx)
        assert torch.equal(fresh(x, s, ctx), trained)
        base = load_dit(setup["models"]["dit"], dtype=torch.float32)
        assert not torch.allclose(base(x, s, ctx), trained)  # the steps changed something
        report = apply_network_file(base, run.final_path)
        assert not report["not_loaded"] and not report["errors"]
        torch.testing.assert_close(base(x, s, ctx), trained, atol=1e-5, rtol=1e-5)
