"""A few LoKr / LoHa (+ train_norm) training steps on the tiny model: the saved file reloads exactly."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from anima_trainer.config import parse_train_args
from anima_trainer.demo import (
    write_demo_configs,
)
from anima_trainer.train.loop import run_training
from tests.train.conftest import check_saved_file_reproduces


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
    check_saved_file_reproduces(run, setup["models"]["dit"], algo, **kw, **net_args)
