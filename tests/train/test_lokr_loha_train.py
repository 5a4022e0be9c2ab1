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
         ("networks.lokr", ["factor=4", "decompose_both=on"], "lokr", {"dim": 1, "alpha": 3.0}),
         ("networks.lokr", ["train_adaln=true"], "lokr", {"dim": 100000, "alpha": 3.0}),
         ("networks.lora_anima", ["dora_wd=true", "train_final_layer=true"], "lora", {"dim": 2, "alpha": 3.0})]
FIRST_KEY = {"lycoris-lokr-norm": ".lokr_w1", "loha": ".hada_w2_a", "lokr-both": ".lokr_w1_a",
             "lokr-full-adaln": "adaln_modulation_mlp.1.lokr_w2", "lora-dora-final": "final_layer.linear.dora_scale"}


@pytest.mark.parametrize(("module", "args", "algo", "kw"), CASES, ids=list(FIRST_KEY))
def test_train_save_reload(setup, module, args, algo, kw, request):
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
    assert meta["ss_network_module"] == {"lora": "networks.lora_anima"}.get(algo, f"networks.{algo}")
    assert any(k.endswith(FIRST_KEY[request.node.callspec.id]) for k in keys)
    train_norm = "train_norm=true" in args
    assert any(k.endswith(".w_norm") for k in keys) == train_norm
    net_args = {a.split("=")[0]: a.split("=")[1] for a in args if not a.startswith("algo=")}
    check_saved_file_reproduces(run, setup["models"]["dit"], algo, **kw, **net_args)
