"""A bf16 fine-tune sharded with FSDP2 keeps kohya's meaning of mixed_precision = "bf16" (fp32 weights, bf16
forward) through the real run (2 gloo processes on the CPU, the tiny models): the trained parameters are fp32
master shards, gathered and computed in bf16 with fp32 gradient reduction (train/sharded_run.py
`ShardedFinetune.start`, train/fsdp.py `upcast_trained`, `mixed_precision_policy`).  So its updates equal the
single-process bf16 fine-tune's exactly compensated ones (train/bf16_update.py: the fp32 value is the bf16
weight joined with its int16 remainder), and updates below half a bf16 ulp are kept, not rounded away.

The learning rate is tiny (1e-6 with AdamW: each step moves a weight by about 1e-6, far below half a bf16 ulp of
most of the tiny model's weights), so plain bf16 steps would leave those where they were.  Global batch as
tests/train/test_fsdp_run.py: 2 processes × batch 1 × 2 accumulated micro-batches against 1 process × batch 1 × 4;
the sharded run saves a state at step 2 and is resumed from it.  Tolerance (the equality test's docstring): both
runs compute forward and backward with the same bf16 weights, but the gradients are summed in another order (bf16
accumulation of 4 micro-batches on one process against 2 per process and an fp32 reduce-scatter), and AdamW's step
is the gradient's sign-like ratio, so only elements whose gradient is near zero feel that rounding."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.config import parse_train_args
from anima_trainer.models import load_dit
from tests.support.small_dit import small_dit
from anima_trainer.train.bf16_update import REMAINDER_KEY, join_fp32
from anima_trainer.train.fsdp import check_trained_dtypes, mixed_precision_policy, upcast_trained
from anima_trainer.train.loop import run_training
from tests.train.test_distributed import launch_command
from tests.train.test_fsdp_run import STEPS, _toml

LR = 1e-6
ARGS = ("--learning_rate", str(LR), "--mixed_precision", "bf16", "--cache_latents_to_disk",
        "--cache_text_encoder_outputs_to_disk", "--log_with", "none", "--max_grad_norm", "0.05")
SHARDED = ("--gradient_accumulation_steps", "2", "--save_every_n_steps", "2", "--save_state")
DUMP = '''import os, sys, torch
from anima_trainer import console
from anima_trainer.config import parse_train_args
from anima_trainer.train.loop import run_training
console.setup()
run = run_training(parse_train_args(sys.argv[1:]))
shards = {n: p.detach().to_local().clone() for n, p in run.dit.named_parameters() if p.requires_grad}
frozen = {n: p.dtype for n, p in run.dit.named_parameters() if not p.requires_grad}
torch.save({"shards": shards, "frozen": frozen},
           os.path.join(os.path.dirname(sys.argv[0]), f"shards{os.environ['RANK']}.pt"))
'''


def _gather(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole trained tensors from the two processes' shards (FSDP2 shards dim 0 in rank order)."""
    assert first.keys() == second.keys()
    return {n: torch.cat([first[n], second[n]]) for n in first}


@pytest.fixture(scope="module")
def sharded(setup, tmp_path_factory) -> dict:
    """The sharded bf16 run: each process's shards of the trained weights, the whole of them, its final file
    and log (the process group is gone after the run: the shards are joined here)."""
    out = tmp_path_factory.mktemp("fsdp_bf16")
    toml = _toml(setup, out)
    script = out / "dump_sharded.py"
    script.write_text(DUMP)
    argv, env = launch_command(2, [str(script), "--config_file", str(toml), *ARGS, *SHARDED])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    dumps = [torch.load(out / f"shards{rank}.pt") for rank in (0, 1)]
    shards = [dump["shards"] for dump in dumps]
    return {"shards": shards, "trained": _gather(*shards), "frozen": dumps[0]["frozen"], "log": done.stderr,
            "final": load_file(out / "output" / "demo_lora.safetensors"), "toml": toml}


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory) -> dict:
    """The single-process bf16 run (compensated steps): the exact fp32 value of each trained weight (the bf16
    weight joined with its int16 remainder) and its final file."""
    out = tmp_path_factory.mktemp("fsdp_bf16_single")
    run = run_training(parse_train_args(["--config_file", str(_toml(setup, out)), *ARGS,
                                         "--gradient_accumulation_steps", "4"]))
    exact = {}
    for name, p in run.dit.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.bfloat16
            exact[name] = join_fp32(p.detach(), run.optimizer.state[p][REMAINDER_KEY])
    return {"exact": exact, "final": load_file(run.final_path)}


def test_sharded_bf16_trains_fp32_master_shards_and_computes_in_bf16(setup, sharded):
    base = {k: v.float() for k, v in load_dit(setup["models"]["dit"], dtype=torch.bfloat16).state_dict().items()}
    trained = sharded["trained"]
    for shards in sharded["shards"]:  # what each process holds and steps: fp32, half of each tensor
        assert shards and all(v.dtype == torch.float32 for v in shards.values())
    assert {n: v.shape for n, v in trained.items()} == {n: base[n].shape for n in trained}
    assert any(n.startswith("blocks.") for n in trained) and "x_embedder.proj.1.weight" in trained
    assert "final_layer.linear.weight" in trained  # the root unit's too: embeddings, final layer
    frozen = sharded["frozen"]  # the LLM adapter (not trained here): kept bf16, as loaded
    assert frozen and all(n.startswith("llm_adapter.") and d == torch.bfloat16 for n, d in frozen.items())
    assert "(fp32 master shards, bf16 compute)" in sharded["log"]
    assert "fine-tune; fp32 master shards, bf16 compute (FSDP2))" in sharded["log"]  # the start-up summary


def _bf16_base(setup) -> dict[str, torch.Tensor]:
    """Where both runs start: the base file loaded in bf16 (mixed_precision = "bf16"), as fp32 values."""
    return {k: v.float() for k, v in load_dit(setup["models"]["dit"], dtype=torch.bfloat16).state_dict().items()}


def test_updates_below_half_a_bf16_ulp_are_kept(setup, sharded):
    base, trained = _bf16_base(setup), sharded["trained"]
    # weights of magnitude >= 2^-6: half a bf16 ulp is >= 2^-15 (3.1e-5), far above the whole run's movement
    # (AdamW moves a weight by about LR per step), so plain bf16 steps would leave every one of them unchanged
    large = {n: base[n].abs() >= 2.0**-6 for n in trained}
    count = sum(int(m.sum()) for m in large.values())
    assert count > 0.8 * sum(base[n].numel() for n in trained)
    assert all(torch.equal(trained[n][m].bfloat16().float(), base[n][m]) for n, m in large.items())
    moved = sum(int((trained[n][m] != base[n][m]).sum()) for n, m in large.items())
    assert moved > 0.95 * count, (moved, count)  # the fp32 master shards kept them


def test_sharded_bf16_equals_the_single_process_compensated_run(setup, sharded, single):
    """The movements from the common bf16 start agree: per tensor within 5 % (norm of the difference against
    the norm of the movement; plain bf16 would be 100 % off), over the whole model within 1 %, and no element
    further apart than 3/4 of LR × STEPS (the largest movement)."""
    base, exact, got = _bf16_base(setup), single["exact"], sharded["trained"]
    assert got.keys() == exact.keys()
    diff_sq = move_sq = 0.0
    for name in exact:
        moved, difference = exact[name] - base[name], got[name] - exact[name]
        assert difference.norm() <= 0.05 * moved.norm(), name
        assert difference.abs().max() <= 0.75 * LR * STEPS, name
        diff_sq += float(difference.norm()) ** 2
        move_sq += float(moved.norm()) ** 2
    assert diff_sq ** 0.5 <= 0.01 * move_sq ** 0.5


def test_an_unset_save_precision_writes_the_base_file_dtypes_as_one_process_does(sharded, single):
    got, reference = sharded["final"], single["final"]
    assert got.keys() == reference.keys()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in reference.items()}
    # the tiny base file is fp32, so the gathered fp32 master is written as it is (a bf16 base file: rounded)
    assert all(torch.equal(got[f"net.{name}"], value) for name, value in sharded["trained"].items())



def test_upcast_trained_makes_the_fp32_master_and_leaves_frozen_weights_bf16():
    dit = small_dit().to(torch.bfloat16)
    for name, p in dit.named_parameters():
        p.requires_grad_(name.startswith("blocks.1."))  # a partial fine-tune: frozen parts in trained units
    assert upcast_trained(dit) == sum(1 for n, _ in dit.named_parameters() if n.startswith("blocks.1."))
    assert all((p.dtype == torch.float32) == p.requires_grad for p in dit.parameters())
    check_trained_dtypes(dit)  # one dtype per unit's trained parameters: FSDP2 can shard it
    policy = mixed_precision_policy("cpu", torch.bfloat16)  # gloo gathers bf16: the same policy as on CUDA
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (torch.bfloat16, torch.float32,
                                                                                      False)
    assert mixed_precision_policy("cpu").param_dtype is None  # an fp32 run on the CPU casts nothing


def test_a_resumed_sharded_bf16_run_equals_the_uninterrupted_one_bitwise(sharded):
    """The fp32 master shards go into the state and come back exactly: the run cut back to its step-2 state
    (final file, latest state and step-2 file removed) and resumed writes the same final file, bit for bit."""
    output = sharded["toml"].parent / "output"
    for name in ("demo_lora.safetensors", "demo_lora-step00000002.safetensors"):
        (output / name).unlink()
    shutil.rmtree(output / "demo_lora-state")
    argv, env = launch_command(2, ["-m", "anima_trainer", "train", "--config_file", str(sharded["toml"]), *ARGS,
                                   *SHARDED, "--resume", "latest"])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "resuming from" in done.stderr
    resumed, final = load_file(output / "demo_lora.safetensors"), sharded["final"]
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)

