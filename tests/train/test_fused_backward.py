"""The fused backward pass (train/fused_backward.py): the same weights, optimizer state and schedule as the normal
path on CPU fp32 (bitwise), one gradient alive at a time during backward, a normal-looking state dict that resumes
exactly in either direction, and the start-up rules (kohya's: Adafactor recipe, no accumulation)."""

from __future__ import annotations

import copy

import pytest
import torch

from anima_trainer.config.errors import ConfigError
from anima_trainer.train.fused_backward import (
    PerParameterOptimizer,
    build_per_parameter_optimizer,
    check_fused_backward,
)
from anima_trainer.train.optim import build_optimizer, build_scheduler
from tests.support.small_dit import inputs, small_dit

ADAFACTOR_RECIPE = {"relative_step": False, "scale_parameter": False, "warmup_init": False}  # kohya's doc
OPTIMIZERS = [("AdamW", {"weight_decay": 0.01}, 1e-3), ("AdaFactor", ADAFACTOR_RECIPE, 1e-3),
              ("AdaFactor", {}, 1e-3)]  # the last: relative step (transformers' default), lr unused


def mlp(layers: int = 6, width: int = 16) -> torch.nn.Sequential:
    torch.manual_seed(0)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods)


def groups(model: torch.nn.Module, lr: float, bias_lr: float | None = None) -> list[dict]:
    """Two groups (with different lrs unless AdaFactor's relative step), as per-component learning rates make."""
    params = list(model.parameters())
    return [{"params": params[::2], "lr": lr, "name": "weights"},
            {"params": params[1::2], "lr": lr / 2 if bias_lr is None else bias_lr, "name": "biases"}]


def factory(name: str, args: dict, lr: float):
    return lambda g: build_optimizer(g, lr, args, torch.device("cpu"), optimizer_type=name)


def batch(step: int, width: int = 16) -> torch.Tensor:
    return torch.randn(4, width, generator=torch.Generator().manual_seed(100 + step))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    for s in steps:
        model(batch(s)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def normal_and_fused(name: str, args: dict, lr: float):
    model_a, model_b = mlp(), mlp()
    bias_lr = lr if name == "AdaFactor" and not args else None
    normal = build_optimizer(groups(model_a, lr, bias_lr), lr, args, torch.device("cpu"), optimizer_type=name)
    fused = build_per_parameter_optimizer(groups(model_b, lr, bias_lr), lr, args, torch.device("cpu"),
                                          optimizer_type=name)
    fused.attach()
    return model_a, normal, model_b, fused


@pytest.mark.parametrize("name, args, lr", OPTIMIZERS)
def test_fused_equals_normal_bitwise_with_a_schedule(name, args, lr):
    model_a, normal, model_b, fused = normal_and_fused(name, args, lr)
    relative_step = name == "AdaFactor" and not args  # its own step size, reported by the `adafactor` schedule
    schedule, warmup = ("adafactor", 0) if relative_step else ("cosine", 2)
    sched_a = build_scheduler(normal, schedule, 6, warmup)
    sched_b = build_scheduler(fused, schedule, 6, warmup)
    train(model_a, normal, range(6), sched_a)
    train(model_b, fused, range(6), sched_b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert fused.param_groups[0]["lr"] == normal.param_groups[0]["lr"]
    assert relative_step or fused.param_groups[0]["lr"] != lr  # the schedule moved it
    # the state dict looks like the normal optimizer's: same groups, same per-parameter state
    assert_same_tensors(fused.state_dict(), normal.state_dict())


def test_the_inner_optimizers_follow_the_schedule():
    model = mlp(layers=1)
    fused = PerParameterOptimizer(groups(model, 1e-2), factory("AdamW", {}, 1e-2))
    fused.attach()
    scheduler = build_scheduler(fused, "linear", 4, 0)
    seen = []
    for s in range(3):
        model(batch(s)).sum().backward()
        seen.append([m.param_groups[0]["lr"] for m in fused.members.values()])
        fused.step()  # a no-op when fused; the loop calls it before the scheduler
        scheduler.step()
    assert seen == [[1e-2, 5e-3], [7.5e-3, 3.75e-3], [5e-3, 2.5e-3]]  # weight (lr), bias (lr / 2) per step


@pytest.mark.parametrize("name, args, lr", OPTIMIZERS)
def test_resume_across_the_lever_is_exact(name, args, lr):
    """3 steps normal → state dict → fused continues 3 steps == 6 uninterrupted normal steps; and back."""
    bias_lr = lr if name == "AdaFactor" and not args else None
    reference = mlp()
    ref_opt = build_optimizer(groups(reference, lr, bias_lr), lr, args, torch.device("cpu"), optimizer_type=name)
    train(reference, ref_opt, range(6))

    first = mlp()
    opt = build_optimizer(groups(first, lr, bias_lr), lr, args, torch.device("cpu"), optimizer_type=name)
    train(first, opt, range(3))
    resumed = copy.deepcopy(first)
    fused = PerParameterOptimizer(groups(resumed, lr, bias_lr), factory(name, args, lr))
    fused.load_state_dict(copy.deepcopy(opt.state_dict()))
    fused.attach()
    train(resumed, fused, range(3, 6))
    for pa, pb in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)

    # fused → normal: the fused run's state dict loads into the ordinary optimizer
    back = copy.deepcopy(resumed)
    normal = build_optimizer(groups(back, lr, bias_lr), lr, args, torch.device("cpu"), optimizer_type=name)
    normal.load_state_dict(copy.deepcopy(fused.state_dict()))
    fused.detach()
    train(resumed, fused, range(6, 8))  # detached: an ordinary step() after backward
    train(back, normal, range(6, 8))
    for pa, pb in zip(resumed.parameters(), back.parameters(), strict=True):
        assert torch.equal(pa, pb)


def count_live_gradients(params: list[torch.nn.Parameter], numel: list[int] | None = None) -> list[int]:
    """Registered before the lever's hooks: at each accumulation, how many parameters hold a gradient (and, into
    `numel`, how many gradient elements)."""
    live: list[int] = []

    def count(_p: torch.Tensor) -> None:
        live.append(sum(q.grad is not None for q in params))
        if numel is not None:
            numel.append(sum(q.grad.numel() for q in params if q.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    return live


def test_one_gradient_alive_at_a_time():
    model_a, normal, model_b, fused = normal_and_fused("AdamW", {}, 1e-3)
    params_a, params_b = list(model_a.parameters()), list(model_b.parameters())
    fused.detach()
    live_a, live_b = count_live_gradients(params_a), count_live_gradients(params_b)
    fused.attach()
    train(model_a, normal, range(2))
    train(model_b, fused, range(2))
    assert max(live_a) == len(params_a) == 12  # the normal path holds the whole gradient set before step()
    assert max(live_b) == 1  # fused: each gradient is used and freed before the next is accumulated
    assert all(p.grad is None for p in params_b)
    for pa, pb in zip(params_a, params_b, strict=True):
        assert torch.equal(pa, pb)


def test_tiny_dit_fine_tune_fused_equals_normal_and_keeps_under_one_block_of_gradients():
    x, t, ctx = inputs()
    runs = {}
    for fused_pass in (False, True):
        dit = small_dit().requires_grad_(True)
        params = [p for p in dit.parameters() if p.requires_grad]
        grads_numel: list[int] = []
        live = count_live_gradients(params, grads_numel)
        lr = 1e-3
        make = factory("AdamW", {}, lr)
        optimizer = PerParameterOptimizer([{"params": params, "lr": lr}], make) if fused_pass else make(
            [{"params": params, "lr": lr}])
        if fused_pass:
            optimizer.attach()
        for _ in range(2):
            dit(x, t, ctx).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[fused_pass] = (dit, max(live), max(grads_numel), len(params))
    (normal, live_n, numel_n, n), (fused, live_f, numel_f, _) = runs[False], runs[True]
    block = sum(p.numel() for p in fused.blocks[0].parameters())
    assert live_n == n and numel_n == sum(p.numel() for p in normal.parameters())
    assert live_f == 1 and numel_f <= max(p.numel() for p in fused.blocks[0].parameters()) < block
    for pa, pb in zip(normal.parameters(), fused.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_per_tensor_clipping_is_kohyas():
    """max_grad_norm in the fused pass clips each gradient on its own (kohya's hook), not the global norm."""
    lr, norm = 1e-2, 0.05
    model_a, model_b = mlp(), mlp()
    normal = build_optimizer(groups(model_a, lr), lr, {}, torch.device("cpu"), optimizer_type="AdamW")
    fused = PerParameterOptimizer(groups(model_b, lr), factory("AdamW", {}, lr))
    fused.attach(clip_per_tensor=norm)
    for s in range(3):
        model_a(batch(s)).square().mean().backward()
        for p in model_a.parameters():
            torch.nn.utils.clip_grad_norm_([p], norm)
        normal.step()
        normal.zero_grad()
        model_b(batch(s)).square().mean().backward()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_start_up_rules():
    ok = {"optimizer_type": "AdaFactor", "max_grad_norm": 0.0, "gradient_accumulation_steps": 1,
          "mixed_precision": "bf16"}
    assert check_fused_backward(**ok) == []
    notices = check_fused_backward(**{**ok, "optimizer_type": "AdamW", "max_grad_norm": 1.0})
    assert len(notices) == 1 and "each gradient is clipped to that norm on its own" in notices[0]
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4 .* set gradient_accumulation_steps = 1"):
        check_fused_backward(**{**ok, "gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError, match="Prodigy adapts one step size"):
        check_fused_backward(**{**ok, "optimizer_type": "Prodigy"})
    with pytest.raises(ConfigError, match="AdamWScheduleFree keeps its schedule"):
        check_fused_backward(**{**ok, "optimizer_type": "AdamWScheduleFree"})
    with pytest.raises(ConfigError, match='use mixed_precision = "bf16"'):
        check_fused_backward(**{**ok, "mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match="with 2 processes .* train on one process"):
        check_fused_backward(**ok, world_size=2)


def test_the_builder_notices_once(caplog):
    """build_per_parameter_optimizer: build_optimizer's arguments; its notices once, not once per tensor."""
    model = mlp()
    with caplog.at_level("WARNING"):
        fused = build_per_parameter_optimizer(groups(model, 1e-3), 1e-3, {"optim_bits": 8}, torch.device("cpu"),
                                              optimizer_type="AdamW8bit")
    assert len(fused.members) == 12
    notices = [r.message for r in caplog.records if "AdamW8bit" in r.message]
    assert len(notices) == 1 and "AdamW with fp32 states runs instead" in notices[0]
    assert type(fused.members[next(model.parameters())]) is torch.optim.AdamW


def test_the_builder_keeps_the_rules_between_groups():
    with pytest.raises(ConfigError, match="relative_step=True computes one step size"):
        build_per_parameter_optimizer(groups(mlp(), 1e-3), 1e-3, {}, torch.device("cpu"), optimizer_type="AdaFactor")
