"""compile_blocks = "auto" (compiled on CUDA sm80+ with triton where measured, eager elsewhere) and the persistent
compile cache (inductor's FX graph and AOTAutograd caches in a folder that survives a reboot)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anima_trainer.config.train import TrainConfig
from anima_trainer.models import compile as compile_module
from anima_trainer.models.compile import (CACHE_ENV, configure_compile_cache, default_compile_cache_dir,
                                          resolve_compile_blocks)
from anima_trainer.train.model_setup import compiles_blocks

SRC = Path(__file__).resolve().parents[2] / "src"
PATHS = dict(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir="o", dataset_config="ds")
H100 = dict(device_type="cuda", capability=(9, 0), triton_available=True)


@pytest.mark.parametrize(("setting", "machine", "levers", "compiled", "reason"), [
    ("auto", H100, {}, True, "compiled (CUDA compute capability 9.0, triton available)"),
    ("auto", dict(H100, capability=(8, 0)), {}, True, "compiled (CUDA compute capability 8.0"),
    ("auto", dict(device_type="cpu"), {}, False, "compiles on CUDA only; cpu runs eager"),
    ("auto", dict(device_type="mps"), {}, False, "compiles on CUDA only; mps runs eager"),
    ("auto", dict(H100, capability=(7, 5)), {}, False, "compute capability 7.5 < 8.0"),
    ("auto", dict(H100, capability=None), {}, False, "compute capability unknown < 8.0"),
    ("auto", dict(H100, triton_available=False), {}, False, "triton is not installed"),
    ("auto", dict(H100, triton_available=False), {"backend": "aot_eager"}, True, "compiled"),  # needs no triton
    ("auto", H100, {"checkpoint_mode": "selective"}, False, "checkpoint_mode = \"selective\" fails"),
    ("auto", H100, {"blocks_to_swap": 4}, False, "blocks_to_swap with compiled blocks is not measured"),
    ("auto", H100, {"fp8_base": True}, False, "fp8_base with compiled blocks is not measured"),
    (True, dict(device_type="cpu"), {}, True, "compile_blocks = true"),  # explicit values are honoured anywhere
    (False, H100, {}, False, "compile_blocks = false"),
])
def test_auto_resolves_per_device_and_levers(setting, machine, levers, compiled, reason) -> None:
    decision = resolve_compile_blocks(setting, **machine, **levers)
    assert decision.compiled is compiled
    assert reason in decision.reason, decision.reason


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="expected true, false or 'auto'"):
        resolve_compile_blocks("yes", device_type="cuda")


def test_auto_on_an_old_card_or_without_triton_logs_why(monkeypatch, caplog) -> None:
    cfg = TrainConfig(**PATHS)
    assert cfg.compile_blocks == "auto"
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with caplog.at_level(logging.INFO, logger="anima_trainer.train.model_setup"):
        assert not compiles_blocks(cfg, cuda)
    assert [r.getMessage() for r in caplog.records] == [
        "compile_blocks = auto: eager on this card (compute capability 7.5 < 8.0, where compile is not measured); "
        "compile_blocks = true compiles anyway"]
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(compile_module, "triton_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="anima_trainer.train.model_setup"):
        assert not compiles_blocks(cfg, cuda)
    [record] = caplog.records
    assert "triton is not installed" in record.getMessage()
    caplog.clear()
    monkeypatch.setattr(compile_module, "triton_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="anima_trainer.train.model_setup"):
        assert compiles_blocks(cfg, cuda)
        assert not compiles_blocks(cfg, torch.device("cpu"))  # eager by design: nothing to say
        assert not compiles_blocks(TrainConfig(**PATHS, compile_blocks=False), cuda)  # as asked: nothing to say
    assert caplog.records == []


def test_selective_checkpointing_refuses_only_an_explicit_compile() -> None:
    selective = dict(PATHS, gradient_checkpointing=True, checkpoint_mode="selective")
    assert TrainConfig(**selective).compile_blocks == "auto"  # resolves to eager at start-up
    with pytest.raises(ValueError, match="'selective' does not work with compile_blocks"):
        TrainConfig(**selective, compile_blocks=True)


def test_default_cache_folder_per_platform(tmp_path) -> None:
    home = Path.home()
    assert default_compile_cache_dir({}, windows=False) == home / ".cache" / "anima-trainer" / "torch-compile"
    assert default_compile_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}, windows=False) == \
        tmp_path / "anima-trainer" / "torch-compile"
    assert default_compile_cache_dir({"LOCALAPPDATA": str(tmp_path)}, windows=True) == \
        tmp_path / "anima-trainer" / "torch-compile"
    assert default_compile_cache_dir({}, windows=True) == home / "AppData" / "Local" / "anima-trainer" / \
        "torch-compile"


def test_cache_settings_and_what_the_user_set_wins(tmp_path) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env: dict[str, str] = {"XDG_CACHE_HOME": str(tmp_path)}
    folder = str(tmp_path / "anima-trainer" / "torch-compile")
    assert configure_compile_cache("auto", env) == folder
    assert (env[CACHE_ENV], env["TORCHINDUCTOR_FX_GRAPH_CACHE"], env["TORCHINDUCTOR_AUTOGRAD_CACHE"]) == (folder, "1",
                                                                                                         "1")
    # torch writes its temp-dir default into the variable when torch._dynamo is imported: not the user's choice
    env = {"XDG_CACHE_HOME": str(tmp_path), CACHE_ENV: default_cache_dir()}
    assert configure_compile_cache("auto", env) == folder
    env = {CACHE_ENV: ""}  # empty would mean the working directory
    assert configure_compile_cache(str(tmp_path / "mine"), env) == str(tmp_path / "mine")
    # the user's own variables are kept, "0" included
    env = {CACHE_ENV: str(tmp_path / "theirs"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    assert configure_compile_cache(str(tmp_path / "mine"), env) == str(tmp_path / "theirs")
    assert env == {CACHE_ENV: str(tmp_path / "theirs"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                   "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    # "" leaves torch's settings alone
    env = {}
    assert configure_compile_cache("", env) is None and env == {}
    assert TrainConfig(**PATHS).compile_cache_dir == "auto"


_COMPILE_ONCE = """
import json, os, sys
from anima_trainer.models.compile import configure_compile_cache
print(json.dumps({"folder": configure_compile_cache(sys.argv[1])}))
import torch
from torch._dynamo.utils import counters
import torch._functorch.config, torch._inductor.config
step = torch.compile(lambda x, w: x @ w, backend="inductor")
x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
step(x, w).sum().backward()
print(json.dumps({"fx": torch._inductor.config.fx_graph_cache, "aot": torch._functorch.config.enable_autograd_cache,
                  **{k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items() if "cache" in k}}))
"""


def test_a_second_process_loads_the_compiled_graph_from_the_cache_folder(tmp_path) -> None:
    """A real inductor compile on CPU (forward and backward of one matmul: no C++ kernel to build, ~10 s) in two
    fresh processes: the first writes the FX graph and AOTAutograd entries into the folder, the second hits them."""
    folder = tmp_path / "compile cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    env["PYTHONPATH"] = str(SRC)

    def run() -> tuple[dict, dict]:
        done = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, str(folder)], env=env, capture_output=True,
                              text=True, timeout=300, check=True)
        first, second = done.stdout.strip().splitlines()[-2:]
        return json.loads(first), json.loads(second)

    where, cold = run()
    assert where == {"folder": str(folder)}
    assert (cold["fx"], cold["aot"]) == (True, True)
    assert cold["fxgraph_cache_miss"] == 2 and cold["autograd_cache_saved"] == 1, cold  # forward + backward graphs
    assert {"fxgraph", "aotautograd"} <= {p.name for p in folder.iterdir()}
    _, warm = run()
    assert warm.get("autograd_cache_hit") == 1 and "fxgraph_cache_miss" not in warm, warm
