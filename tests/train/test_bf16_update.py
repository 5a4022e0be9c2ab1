"""bf16 weights without an fp32 master (train/bf16_update.py): plain bf16 updates stall where the compensated
ones equal the fp32 master path bit for bit, for SGD, AdamW and Adafactor, fused or not, across a resume."""

from __future__ import annotations

import copy

import pytest
import torch

from anima_trainer.train.bf16_update import REMAINDER_KEY, compensated_step, join_fp32, split_fp32
from anima_trainer.train.fused_backward import PerParameterOptimizer
from anima_trainer.train.optim import build_optimizer

ADAFACTOR = {"relative_step": False, "scale_parameter": False, "warmup_init": False}


def test_split_and_join_are_exact_and_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10_000, generator=g) * s for s in (1e-30, 1e-6, 1e-2, 1.0, 1e4, 1e30)])
    weight, remainder = split_fp32(x)
    assert weight.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert torch.equal(join_fp32(weight, remainder), x)
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(weight[~ties], x[~ties].to(torch.bfloat16))  # torch's round-to-nearest
    half_ulp = x.abs() * 2.0**-8
    assert bool(((weight.float() - x).abs() <= half_ulp).all())
    assert torch.equal(join_fp32(weight, None), weight.float())


def sgd_run(dtype: torch.dtype, bf16_update: str | None, start: torch.Tensor, lr: float = 1e-5,
            steps: int = 2000) -> tuple[torch.Tensor, PerParameterOptimizer]:
    p = torch.nn.Parameter(start.to(dtype, copy=True))
    opt = PerParameterOptimizer([p], lambda groups: torch.optim.SGD(groups, lr=lr), bf16_update=bf16_update)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p, opt


def test_small_updates_stall_in_plain_bf16_and_are_exact_compensated():
    """lr 1e-5 on weights of ~1 (2⁻¹⁷ relative: under half a bf16 ulp): 2000 steps should move them by 0.02."""
    start = (1 + torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.5).bfloat16()
    reference, _ = sgd_run(torch.float32, None, start)
    plain, _ = sgd_run(torch.bfloat16, None, start)
    compensated, opt = sgd_run(torch.bfloat16, "compensated", start)
    assert torch.equal(plain, start)  # every update rounded away
    moved = start.float() - reference.detach()  # fp32 itself rounds each step to its 2⁻²³ grid: 0.1 % off
    assert moved.min().item() == pytest.approx(0.02, rel=2e-3) and moved.max().item() == pytest.approx(0.02, rel=2e-3)
    remainder = opt.members[compensated].state[compensated][REMAINDER_KEY]
    assert torch.equal(join_fp32(compensated.data, remainder), reference.data)  # the fp32 path, bit for bit
    assert torch.equal(compensated.data, split_fp32(reference.data)[0])  # its nearest bf16 value


def mlp(dtype: torch.dtype) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    return model.to(dtype)


def batch(step: int) -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(50 + step))


def master_path(name: str, args: dict, lr: float, steps: int) -> list[torch.Tensor]:
    """The reference: fp32 master weights, a bf16 compute copy (nearest) for forward and backward, fp32 grads."""
    model = mlp(torch.bfloat16)
    master = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    opt = build_optimizer(master, lr, args, torch.device("cpu"), optimizer_type=name)
    for s in range(steps):
        model(batch(s).bfloat16()).float().square().mean().backward()
        with torch.no_grad():
            for m, p in zip(master, model.parameters(), strict=True):
                m.grad = p.grad.float()
                p.grad = None
            opt.step()
            for m, p in zip(master, model.parameters(), strict=True):
                p.copy_(split_fp32(m.detach())[0])
    return [m.detach() for m in master]


def compensated_path(name: str, args: dict, lr: float, steps: range, fused: bool,
                     model: torch.nn.Module | None = None, state: dict | None = None):
    model = model if model is not None else mlp(torch.bfloat16)
    opt = PerParameterOptimizer(list(model.parameters()), lambda g: build_optimizer(
        g, lr, args, torch.device("cpu"), optimizer_type=name), bf16_update="compensated")
    if state is not None:
        opt.load_state_dict(state)
    if fused:
        opt.attach()
    for s in steps:
        model(batch(s).bfloat16()).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    joined = [join_fp32(p.data, opt.members[p].state[p][REMAINDER_KEY]) for p in model.parameters()]
    return model, opt, joined


@pytest.mark.parametrize("name, args", [("AdamW", {"weight_decay": 0.01}), ("AdaFactor", ADAFACTOR)])
@pytest.mark.parametrize("fused", [False, True])
def test_compensated_bf16_equals_the_fp32_master_path(name, args, fused):
    lr = 1e-4
    reference = master_path(name, args, lr, 8)
    model, opt, joined = compensated_path(name, args, lr, range(8), fused)
    for a, b in zip(joined, reference, strict=True):
        assert torch.equal(a, b)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inner = opt.state_dict()["state"][0]
    assert inner[REMAINDER_KEY].dtype == torch.int16
    float_state = [v for k, v in inner.items() if k not in (REMAINDER_KEY, "step") and torch.is_tensor(v)]
    assert float_state and all(v.dtype == torch.float32 for v in float_state)  # the state is fp32


def test_compensated_resume_is_exact():
    lr, name, args = 1e-4, "AdamW", {}
    reference = master_path(name, args, lr, 8)
    model, opt, _ = compensated_path(name, args, lr, range(4), fused=True)
    state = copy.deepcopy(opt.state_dict())
    _, resumed, joined = compensated_path(name, args, lr, range(4, 8), fused=True, model=copy.deepcopy(model),
                                          state=state)
    for a, b in zip(joined, reference, strict=True):
        assert torch.equal(a, b)
    loaded = resumed.members[next(iter(resumed.members))].state
    assert all(v[REMAINDER_KEY].dtype == torch.int16 for v in loaded.values())


def test_compensated_step_refuses_other_dtypes():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="not bfloat16"):
        compensated_step(torch.optim.SGD([p], lr=1.0), p)
