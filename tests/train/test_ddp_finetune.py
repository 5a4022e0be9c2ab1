"""A data-parallel fine-tune through the real run (`fsdp_sharding = "off"`: the whole DiT in every process, the
gradients averaged by train/grad_sync.py before the step; 2 gloo processes on the CPU, the tiny models): in fp32
it equals one process on the same global batch (rtol 1e-4, as the data-parallel LoRA run); with bf16 weights,
compensated updates and the optimizer state offloaded (train/optimizer_levers.py: data parallel steps like one
process) both processes end with bitwise identical weights and int16 remainders, and a run cut after a state and
resumed equals the uninterrupted one bitwise, remainders included.

Global batch: 2 processes × batch 1 × 2 accumulated micro-batches against 1 process × batch 1 × 4 (4 images, one
step per epoch, per-sample noise seeds).  Each launch runs `dump_ranks.py`, which trains through `run_training`
and then writes every process's trained weights and remainders (only the main process writes the run's files)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.config import parse_train_args
from anima_trainer.models import load_dit
from anima_trainer.train.loop import run_training
from tests.train.test_distributed import launch_command
from tests.train.test_fsdp_run import COMMON, _toml

DUMP = '''import os, sys, torch
from anima_trainer import console
from anima_trainer.config import parse_train_args
from anima_trainer.train.bf16_update import REMAINDER_KEY
from anima_trainer.train.loop import run_training
console.setup()  # INFO lines (the resume's) as the CLI logs them
run = run_training(parse_train_args(sys.argv[1:]))
names = {p: n for n, p in run.dit.named_parameters()}
state = {p: run.optimizer.state[p] for p in names if p in run.optimizer.state}
torch.save({"weights": {names[p]: p.detach().clone() for p in names if p.requires_grad},
            "remainders": {names[p]: s[REMAINDER_KEY].clone() for p, s in state.items() if REMAINDER_KEY in s},
            "optimizer": type(run.optimizer).__name__},
           os.path.join(os.path.dirname(sys.argv[0]), f"rank{os.environ['RANK']}.pt"))
'''
BF16 = ("--mixed_precision", "bf16", "--optimizer_offload")


def _launch(toml: Path, *extra: str) -> list[dict]:
    """2 data-parallel processes (fsdp_sharding = "off", accumulation 2); returns each process's dump (the
    first with the run's log under "log")."""
    script = toml.parent / "dump_ranks.py"
    script.write_text(DUMP)
    argv, env = launch_command(2, [str(script), "--config_file", str(toml), *COMMON, "--fsdp_sharding", "off",
                                   "--gradient_accumulation_steps", "2", *extra])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    first, second = (torch.load(toml.parent / f"rank{r}.pt") for r in (0, 1))
    return [{**first, "log": done.stderr}, second]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def compensated(setup, tmp_path_factory) -> dict:
    """The uninterrupted bf16 data-parallel run, then the same folder cut back to its step-2 state (final file,
    latest state and step-2 file removed) and resumed with --resume latest."""
    out = tmp_path_factory.mktemp("ddp_finetune_bf16")
    toml = _toml(setup, out)
    ranks = _launch(toml, *BF16)
    output = out / "output"
    final = load_file(output / "demo_lora.safetensors")
    for name in ("demo_lora.safetensors", "demo_lora-step00000002.safetensors"):
        (output / name).unlink()
    shutil.rmtree(output / "demo_lora-state")
    resumed = _launch(toml, *BF16, "--resume", "latest")
    return {"ranks": ranks, "final": final, "resumed_ranks": resumed,
            "resumed": load_file(output / "demo_lora.safetensors")}


def test_data_parallel_finetune_equals_one_process_on_the_global_batch(setup, tmp_path):
    ranks = _launch(_toml(setup, tmp_path / "two"))
    assert _same(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["optimizer"] != "PerParameterOptimizer" and not ranks[0]["remainders"]  # fp32: no levers
    single = run_training(parse_train_args(["--config_file", str(_toml(setup, tmp_path / "one")),
                                            "--gradient_accumulation_steps", "4", *COMMON]))
    reference = load_file(single.final_path)
    got = load_file(tmp_path / "two" / "output" / "demo_lora.safetensors")
    assert got.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-4, atol=1e-7)
    base = load_dit(setup["models"]["dit"], dtype=torch.float32).state_dict()
    assert [k for k in reference if k.startswith("net.blocks.")
            and not torch.equal(reference[k], base[k.removeprefix("net.")])]  # it trained


def test_compensated_bf16_processes_end_identical_with_their_remainders(compensated):
    first, second = compensated["ranks"]
    assert first["optimizer"] == second["optimizer"] == "OffloadedOptimizer"
    assert {w.dtype for w in first["weights"].values()} == {torch.bfloat16}
    assert first["remainders"].keys() == first["weights"].keys()  # every trained tensor stepped compensated
    assert any(r.any() for r in first["remainders"].values())
    assert _same(first["weights"], second["weights"]) and _same(first["remainders"], second["remainders"])


def test_resumed_compensated_run_equals_the_uninterrupted_one_bitwise(compensated):
    assert "demo_lora-step00000002-state at step 2 " in compensated["resumed_ranks"][0]["log"]
    assert _same(compensated["final"], compensated["resumed"])
    for before, after in zip(compensated["ranks"], compensated["resumed_ranks"], strict=True):
        assert _same(before["weights"], after["weights"]) and _same(before["remainders"], after["remainders"])
