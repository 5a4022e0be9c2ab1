"""The optimizer-side memory levers of a fine-tune in the training loop (train/optimizer_levers.py, issue 19 item
2) on the tiny model: fused_backward_pass gives the unfused weights bitwise (AdamW, max_grad_norm 0) or kohya's
per-tensor clipping, leaves no gradient after backward and keeps a NaN loss away from the weights; bf16 weights
step with compensated updates equal to an fp32 master copy fed the same gradients; optimizer_offload keeps the
state in host buffers with the same results; interrupted runs with the levers resume bit-identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
import anima_trainer.train.setup as run_setup
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.config import kohya_options as ko
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.models import load_dit
from anima_trainer.train.bf16_update import REMAINDER_KEY, join_fp32
from anima_trainer.train.fused_backward import PerParameterOptimizer, build_per_parameter_optimizer
from anima_trainer.train.optim import build_optimizer
from anima_trainer.train.optimizer_levers import check_finetune_levers, describe_levers, finetune_levers
from anima_trainer.train.optimizer_offload import OffloadedOptimizer
from anima_trainer.train.training_state import read_nested
from tests.support.killed_run import killed_after
from tests.train.test_fused_backward import assert_same_tensors, batch, factory, groups, mlp

NO_CLIP = ("--max_grad_norm", "0")


def _config(setup: dict, out: Path, *extra: str, steps: int = 3, defaults: bool = False, toml_extra: str = ""):
    """The demo's train.toml in fine-tune mode (the whole DiT) with batches of one image (fast), as
    test_finetune.py's helper, plus `toml_extra` lines: `defaults` = a user's defaults (no overwrite; flips and
    captions that change per epoch)."""
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5,
                              training_extra=f'training_mode = "finetune"\n{toml_extra}')
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1)
    if defaults:
        toml.write_text(toml.read_text().replace("overwrite = true\n", ""))
        write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1, num_repeats=2,
                                extra="flip_aug = true\nshuffle_caption = true\ncaption_tag_dropout_rate = 0.2\n")
    return parse_train_args(["--config_file", str(toml), "--learning_rate", "1e-3", *extra])


def _trained(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.network.state_dict().items()}


def _assert_trained(setup: dict, weights: dict[str, torch.Tensor]) -> None:
    """The run moved its weights away from the base file's (an equality of two runs is not that of two no-ops)."""
    base = load_dit(setup["models"]["dit"], dtype=torch.float32).state_dict()
    assert sum(not torch.equal(base[k], v.float()) for k, v in weights.items()) > len(weights) // 2


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:3]


# --- start-up ------------------------------------------------------------------------------------------------
def test_start_up_rules_notices_and_summary(setup, tmp_path):
    finetune = _config(setup, tmp_path, "--fused_backward_pass")
    assert not [n for n in finetune.finetune_notices() if "fused" in n]  # a fine-tune honours it: no notice
    lora = parse_train_args(["--config_file", str(write_demo_configs(tmp_path / "n", setup["models"],
                                                                     setup["images"], 3, seed=5)),
                             "--fused_backward_pass"])
    assert lora.finetune_notices() == [f"fused_backward_pass = true: {ko.FUSED_BACKWARD_NETWORK}"]
    assert 'training_mode = "finetune" here' in ko.FUSED_BACKWARD_NETWORK
    assert "optimizer_offload = true" in ko.RULES["offload_optimizer_device"].text
    with pytest.raises(ConfigError, match='optimizer_offload: .* Set training_mode = "finetune" or remove it'):
        parse_train_args(["--config_file", str(tmp_path / "n" / "train.toml"), "--optimizer_offload"])
    with pytest.raises(ConfigError, match="fused_backward_pass: .*set gradient_accumulation_steps = 1"):
        check_finetune_levers(_config(setup, tmp_path, "--fused_backward_pass", "--gradient_accumulation_steps", "2"))
    with pytest.raises(ConfigError, match="optimizer_offload: Prodigy adapts one step size"):
        check_finetune_levers(_config(setup, tmp_path, "--optimizer_offload", "--optimizer_type", "Prodigy",
                                      "--learning_rate", "1"))
    with pytest.raises(ConfigError, match="optimizer_offload: AdamW8bit \\(bitsandbytes\\) steps CUDA tensors only"):
        check_finetune_levers(_config(setup, tmp_path, "--optimizer_offload", "--optimizer_type", "AdamW8bit"))
    with pytest.raises(ConfigError, match="optimizer_offload: with 2 processes .* remove optimizer_offload"):
        check_finetune_levers(_config(setup, tmp_path, "--optimizer_offload"), world_size=2)
    prodigy = _config(setup, tmp_path, "--mixed_precision", "bf16", "--optimizer_type", "Prodigy",
                      "--learning_rate", "1")
    notices = check_finetune_levers(prodigy)
    assert len(notices) == 1 and "updated plainly in bf16" in notices[0] and "Prodigy adapts" in notices[0]
    assert not finetune_levers(prodigy).per_parameter and describe_levers(prodigy) == "bf16 weights with plain updates"
    everything = _config(setup, tmp_path, "--mixed_precision", "bf16", "--fused_backward_pass", "--optimizer_offload")
    assert check_finetune_levers(everything)[0].startswith("fused_backward_pass with max_grad_norm = 1: ")
    assert describe_levers(everything) == ("bf16 weights with compensated updates, fused backward, optimizer state "
                                           "on host")
    assert describe_levers(_config(setup, tmp_path)) == "" and describe_levers(lora) == ""
    assert not finetune_levers(everything, world_size=2).compensated_bf16  # sharded: fp32 masters of its own
    data_parallel = _config(setup, tmp_path, "--mixed_precision", "bf16", "--optimizer_offload",
                            "--fsdp_sharding", "off")  # the whole DiT per process: steps after the average
    assert finetune_levers(data_parallel, world_size=2) == finetune_levers(data_parallel, world_size=1)
    assert finetune_levers(data_parallel, world_size=2).compensated_bf16
    assert check_finetune_levers(data_parallel, world_size=2) == []
    with pytest.raises(ConfigError, match="fused_backward_pass: with 2 processes each gradient must be averaged"):
        check_finetune_levers(_config(setup, tmp_path, "--fused_backward_pass", "--fsdp_sharding", "off"),
                              world_size=2)


# --- fused backward pass ---------------------------------------------------------------------------------------
def test_fused_finetune_equals_unfused_and_leaves_no_gradient_after_backward(setup, tmp_path, monkeypatch):
    """AdamW, max_grad_norm 0: the fused run's weights equal the ordinary optimizer's bitwise (the per-parameter
    AdamW runs the same arithmetic: tests/train/test_fused_backward.py)."""
    unfused = run_training_of(_config(setup, tmp_path / "a", *NO_CLIP))
    assert not isinstance(unfused.optimizer, PerParameterOptimizer)  # fp32 without levers: the ordinary optimizer
    live = []
    real_step = PerParameterOptimizer.step

    def step(self, closure=None):  # the loop's optimizer.step(), right after backward
        live.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
        return real_step(self, closure)

    monkeypatch.setattr(PerParameterOptimizer, "step", step)
    fused = run_training_of(_config(setup, tmp_path / "b", "--fused_backward_pass", *NO_CLIP))
    assert fused.optimizer.fused and live == [0, 0, 0]  # every gradient was used and freed inside backward
    _assert_equal(_trained(unfused), _trained(fused))
    _assert_trained(setup, _trained(fused))


def test_fused_clipping_is_per_tensor_and_a_nan_loss_never_reaches_the_weights(setup, tmp_path, monkeypatch):
    """max_grad_norm > 0 with the fused pass: each gradient clipped to the norm on its own (kohya), equal to the
    per-parameter optimizer clipping each tensor in step() after backward (the loop's global clip is off).  The
    update happens inside backward, so nonfinite_loss_policy = skip_step checks the loss before it: a NaN loss
    skips the backward entirely, which leaves the weights and the optimizer state as the unfused skip does."""
    clip, real, calls = 0.01, loop.training_step, {"n": 0}  # small: the clip bites on every tensor

    def nan_at_step_two(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] % 3 == 2 else loss

    monkeypatch.setattr(loop, "training_step", nan_at_step_two)
    fused = run_training_of(_config(setup, tmp_path / "f", "--fused_backward_pass", "--max_grad_norm", str(clip)))
    weights = _trained(fused)
    assert calls["n"] == 3 and all(torch.isfinite(v).all() for v in weights.values())
    events = (tmp_path / "f" / "output" / "demo_lora.events.jsonl").read_text()
    assert '"nonfinite_loss"' in events and "the update was skipped" in events

    def per_tensor_after_backward(cfg, groups, lr, device):
        optimizer = build_per_parameter_optimizer(groups, lr, cfg.optimizer_args, device,
                                                  optimizer_type=cfg.optimizer_type)
        optimizer.clip_per_tensor = clip  # unfused: step() clips each tensor before its update
        return optimizer

    monkeypatch.setattr(run_setup, "build_finetune_optimizer", per_tensor_after_backward)
    reference = run_training_of(_config(setup, tmp_path / "r", *NO_CLIP))
    assert calls["n"] == 6 and not reference.optimizer.fused
    _assert_equal(weights, _trained(reference))
    _assert_trained(setup, weights)


# --- bf16 weights: compensated updates ---------------------------------------------------------------------------
def test_bf16_steps_equal_an_fp32_master_copy_on_device_or_offloaded(setup, tmp_path, monkeypatch, caplog):
    """mixed_precision = "bf16": each bf16 weight joined with its int16 remainder equals, bit for bit, an fp32
    master copy stepped by AdamW with the same gradients and learning rates; optimizer_offload gives the same."""
    record: list[tuple[dict, list[float]]] = []
    start: dict[torch.Tensor, torch.Tensor] = {}
    real_step = PerParameterOptimizer.step

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        if not record:  # the weights before the first update (no remainder yet: exactly the bf16 values)
            start.update({p: join_fp32(p.detach(), None) for p in params})
        record.append(({p: p.grad.clone() for p in params}, [g["lr"] for g in self.param_groups]))
        return real_step(self, closure)

    monkeypatch.setattr(PerParameterOptimizer, "step", step)
    cfg = _config(setup, tmp_path / "d", "--mixed_precision", "bf16", "--lr_scheduler", "linear", *NO_CLIP)
    run = run_training_of(cfg)
    monkeypatch.undo()
    optimizer = run.optimizer
    assert isinstance(optimizer, PerParameterOptimizer) and optimizer.bf16_update == "compensated"
    assert len(record) == 3 and all(p.dtype == torch.bfloat16 for p in start)
    master = {p: v.clone() for p, v in start.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [master[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    fp32 = build_optimizer(groups, cfg.learning_rate, cfg.optimizer_args, torch.device("cpu"),
                           optimizer_type=cfg.optimizer_type)
    for grads, lrs in record:
        for group, lr in zip(fp32.param_groups, lrs, strict=True):
            group["lr"] = lr
        for p, m in master.items():
            m.grad = grads[p].float()
        fp32.step()
    for p, m in master.items():
        joined = join_fp32(p.detach(), optimizer.state[p][REMAINDER_KEY])
        assert torch.equal(joined, m), (joined - m).abs().max()
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32  # fp32 state, as the master copy's
    assert any(not torch.equal(m, v) for m, v in zip(master.values(), start.values(), strict=True))
    # optimizer_offload (with the fused pass): the same weights bitwise, every state tensor in the host buffers
    # (not the parameters' storage), the state dict in the on-device layout
    on_device = run
    with caplog.at_level("INFO", logger=loop.__name__):
        offloaded = run_training_of(_config(setup, tmp_path / "o", "--mixed_precision", "bf16", "--lr_scheduler",
                                            "linear", *NO_CLIP, "--optimizer_offload", "--fused_backward_pass"))
    optimizer = offloaded.optimizer
    assert isinstance(optimizer, OffloadedOptimizer) and optimizer.fused and optimizer.host == torch.device("cpu")
    _assert_equal(_trained(on_device), _trained(offloaded))
    for p, h in optimizer.host_params.items():
        assert h is not p and h.data_ptr() != p.data_ptr() and h.dtype == p.dtype == torch.bfloat16
        state = optimizer.state[p]
        assert state and all(t.device == optimizer.host for t in state.values() if isinstance(t, torch.Tensor))
        assert optimizer.members[p].param_groups[0]["params"] == [h]
        assert state[REMAINDER_KEY].dtype == torch.int16
    got, want = optimizer.state_dict(), on_device.optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    assert all(torch.equal(got["state"][i][k], want["state"][i][k]) for i in want["state"] for k in want["state"][i])
    assert any("(fine-tune; bf16 weights with compensated updates, fused backward, optimizer state on host)"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_optimizer_resumes_exactly_in_either_direction(dtype):
    """OffloadedOptimizer against the on-device PerParameterOptimizer (mlp, AdamW, compensated in bf16): equal
    weights; 3 on-device steps → state dict → 3 offloaded steps == 6 on-device steps; and back.  A weight written
    from outside between steps (a resume, a loaded file) is what the next offloaded step starts from."""
    def make(kind=PerParameterOptimizer):
        model = mlp().to(dtype)
        return model, kind(groups(model, 1e-3), factory("AdamW", {"weight_decay": 0.01}, 1e-3),
                           bf16_update="compensated")

    reference, ref_opt = make()
    run_steps(reference, ref_opt, range(6))
    first, opt = make()
    run_steps(first, opt, range(3))
    resumed, offloaded = make(OffloadedOptimizer)
    with torch.no_grad():  # the resume writes the weights, then loads the optimizer state
        for a, b in zip(resumed.parameters(), first.parameters(), strict=True):
            a.copy_(b)
    offloaded.load_state_dict(opt.state_dict())
    offloaded.attach()
    run_steps(resumed, offloaded, range(3, 6))
    _assert_equal(reference.state_dict(), resumed.state_dict())
    assert_same_tensors(offloaded.state_dict(), ref_opt.state_dict())
    assert all(t.device == offloaded.host for st in offloaded.state_dict()["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))
    back, on_device = make()
    with torch.no_grad():
        for a, b in zip(back.parameters(), resumed.parameters(), strict=True):
            a.copy_(b)
    on_device.load_state_dict(offloaded.state_dict())
    run_steps(back, on_device, range(6, 8))
    run_steps(reference, ref_opt, range(6, 8))
    _assert_equal(reference.state_dict(), back.state_dict())


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """test_fused_backward.py's loop with the batch in the model's dtype."""
    dtype = next(model.parameters()).dtype
    for s in steps:
        model(batch(s).to(dtype)).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# --- resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levers", [("--fused_backward_pass",),
                                    ("--mixed_precision", "bf16", "--fused_backward_pass", "--optimizer_offload")],
                         ids=["fused", "bf16-fused-offloaded"])
def test_interrupted_run_with_the_levers_resumes_bit_identically(setup, tmp_path, monkeypatch, levers):
    """A user's defaults (no overwrite; max_grad_norm 1: per-tensor clipping in the fused pass; fp32 weights) with
    the fused pass, and with bf16 compensated updates, the fused pass and the offloaded state: killed during step
    3, after the step-2 state, resumed, equal to the uninterrupted run bitwise (the int16 remainders travel in the
    optimizer state)."""
    extra = ("--save_every_n_steps", "2", "--save_state", "--lr_scheduler", "linear", *levers)
    reference = run_training_of(_config(setup, tmp_path / "ref", *extra, steps=4, defaults=True))
    with killed_after(monkeypatch, 2):  # killed during step 3, after the step-2 state
        run_training_of(_config(setup, tmp_path / "cut", *extra, steps=4, defaults=True))
    state = tmp_path / "cut" / "output" / "demo_lora-step00000002-state"
    saved = read_nested(state, "optimizer")["state"]
    bf16 = "bf16" in levers
    assert saved and all((entry[REMAINDER_KEY].dtype == torch.int16) if bf16 else REMAINDER_KEY not in entry
                         for entry in saved.values())
    resumed = run_training_of(_config(setup, tmp_path / "cut", "--resume", "latest", *extra, steps=4, defaults=True))
    assert resumed.steps == reference.steps == 4
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    _assert_equal(_trained(reference), _trained(resumed))


def run_training_of(cfg):
    return loop.run_training(cfg)
