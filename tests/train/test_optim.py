"""Optimizers: every kohya name builds and steps (installed packages for real, bitsandbytes / dadaptation through
fake modules), schedule-free train/eval switching, AdaFactor's relative step, effective lrs, ss_optimizer, and the
start-up errors for wrong combinations and missing packages (ConfigError from parse_train_args, or from the run's
start-up check `check_optimization` for the rules that need the class)."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch

from anima_trainer.config import ConfigError, make_train_config, parse_train_args
from anima_trainer.config import kohya_options as ko
from anima_trainer.train.optim import (
    SPECS,
    build_optimizer,
    build_scheduler,
    check_optimization,
    effective_lrs,
    is_schedule_free,
    optimizer_description,
    set_optimizer_train_mode,
)

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors",
            "--vae", "vae.safetensors", "--output_dir", "out", "--dataset_config", "dataset.toml"]


def checked(argv: list[str]):
    """The config as a run starts with it: parsed, then the start-up check of optimizer and schedule."""
    return check_optimization(parse_train_args([*REQUIRED, *argv]))


def error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        checked(argv)
    return str(e.value)


def groups(seed: int = 0) -> list[dict]:
    """Two named param groups as networks/base.py makes them (the LoRA+ half at a higher lr)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    b = torch.nn.Parameter(torch.randn(5, generator=g))
    return [{"params": [a], "lr": 1e-2, "name": "base"}, {"params": [b], "lr": 4e-2, "name": "base/plus"}]


def loss_step(opt: torch.optim.Optimizer, gs: list[dict]) -> float:
    opt.zero_grad()
    loss = sum(((p - 0.5) ** 2).sum() for g in gs for p in g["params"])
    loss.backward()
    opt.step()
    return float(loss.detach())


# --- fake optional packages ----------------------------------------------------------------------------------
class _Recording(torch.optim.SGD):
    """An SGD that remembers its keyword arguments (stands in for the 8-bit / D-Adaptation classes)."""


def _fake_class(name: str, defaults: dict) -> type:
    """A class `name` whose __init__ signature has the keywords of `defaults`, like the real one's."""

    def __init__(self, params, lr=1e-3, **kw):
        if set(kw) - set(defaults):
            raise TypeError(f"unexpected {set(kw) - set(defaults)}")
        _Recording.__init__(self, params, lr=lr)
        self.kwargs = {**defaults, **kw}

    P = inspect.Parameter
    __init__.__signature__ = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD),
         P("lr", P.POSITIONAL_OR_KEYWORD, default=1e-3)]
        + [P(k, P.POSITIONAL_OR_KEYWORD, default=v) for k, v in defaults.items()])
    return type(name, (_Recording,), {"__init__": __init__, "__module__": "fake"})


_ADAM = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "optim_bits": 32}
BNB = {"AdamW8bit": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "optim_bits": 32,
                     "min_8bit_size": 4096},
       "PagedAdamW": _ADAM, "PagedAdamW8bit": _ADAM, "PagedAdamW32bit": _ADAM,
       "Lion8bit": {"betas": (0.9, 0.99), "weight_decay": 0, "optim_bits": 32},
       "PagedLion8bit": {"betas": (0.9, 0.99), "weight_decay": 0, "optim_bits": 32},
       "SGD8bit": {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False}}


@pytest.fixture
def fake_bnb(monkeypatch):
    root, optim = types.ModuleType("bitsandbytes"), types.ModuleType("bitsandbytes.optim")
    for name, params in BNB.items():
        setattr(optim, name, _fake_class(name, params))
    root.optim = optim
    monkeypatch.setitem(sys.modules, "bitsandbytes", root)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", optim)
    return optim


class _DAdapt(_Recording):
    def step(self, closure=None):
        for g in self.param_groups:
            g["d"] = 3.0  # D-Adaptation keeps its estimate d in every group; the step is d·lr
        return super().step(closure)


@pytest.fixture
def fake_dadapt(monkeypatch):
    root, exp = types.ModuleType("dadaptation"), types.ModuleType("dadaptation.experimental")
    for mod, names in ((root, ("DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptLion", "DAdaptSGD")),
                       (exp, ("DAdaptAdamPreprint", "DAdaptAdanIP"))):
        for name in names:
            cls = _fake_class(name, {"d0": 1e-6, "growth_rate": float("inf")})
            setattr(mod, name, type(name, (_DAdapt, cls), {}))
    root.experimental = exp
    monkeypatch.setitem(sys.modules, "dadaptation", root)
    monkeypatch.setitem(sys.modules, "dadaptation.experimental", exp)
    return root


# --- every name builds and steps ------------------------------------------------------------------------------
INSTALLED = ["AdamW", "adamw", "SGDNesterov", "Lion", "Prodigy", "AdaFactor", "RAdamScheduleFree",
             "adamw_schedulefree", "SGDScheduleFree", "CAME", "pytorch_optimizer.CAME", "torch.optim.SGD", "adam",
             "pytorch_optimizer.ScheduleFreeAdamW"]


@pytest.mark.parametrize("name", INSTALLED)
def test_installed_optimizers_build_and_step(name):
    gs = groups()
    if name == "Prodigy":
        gs[1]["lr"] = gs[0]["lr"]  # Prodigy refuses different lrs per group (tested below)
    before = [p.detach().clone() for g in gs for p in g["params"]]
    args = {"relative_step": False, "scale_parameter": False} if name == "AdaFactor" else {}
    opt = build_optimizer(gs, 1e-2, args, torch.device("cpu"), optimizer_type=name)
    losses = [loss_step(opt, gs) for _ in range(6)]  # RAdam-style ones make no update in the first steps
    after = [p.detach() for g in gs for p in g["params"]]
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(after, before, strict=True))
    assert [g["name"] for g in opt.param_groups] == ["base", "base/plus"]
    assert losses[-1] < losses[0]


def test_adamw_fused_on_cuda_foreach_elsewhere_unless_set():
    cpu = build_optimizer(groups(), 1e-3, None, torch.device("cpu"))
    assert type(cpu) is torch.optim.AdamW and cpu.defaults["foreach"] is True and not cpu.defaults["fused"]
    cuda = build_optimizer(groups(), 1e-3, None, torch.device("cuda"))  # only the flag is read: fused kernels
    assert cuda.defaults["fused"] is True and not cuda.defaults["foreach"]
    user = build_optimizer(groups(), 1e-3, {"foreach": "False"}, torch.device("cuda"))
    assert not user.defaults["fused"] and user.defaults["foreach"] is False
    args = build_optimizer(groups(), 1e-3, {"weight_decay": "0.0", "betas": "(0.9, 0.99)"})
    assert args.param_groups[0]["betas"] == (0.9, 0.99) and args.param_groups[0]["weight_decay"] == 0.0


def test_sgd_nesterov_is_torch_sgd_with_kohyas_momentum():
    gs, ref_gs = groups(), groups()
    opt = build_optimizer(gs, 1e-2, {}, optimizer_type="SGDNesterov")
    ref = torch.optim.SGD(ref_gs, lr=1e-2, momentum=0.9, nesterov=True)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    for _ in range(3):
        loss_step(opt, gs), loss_step(ref, ref_gs)
    for g, r in zip(gs, ref_gs, strict=True):
        assert torch.equal(g["params"][0], r["params"][0])
    assert build_optimizer(groups(), 1e-2, {"momentum": 0.5}, optimizer_type="SGDNesterov").defaults["momentum"] == 0.5


@pytest.mark.parametrize("name, cls, extra", [
    ("AdamW8bit", "AdamW8bit", {}), ("PagedAdamW", "PagedAdamW", {}), ("PagedAdamW8bit", "PagedAdamW8bit", {}),
    ("PagedAdamW32bit", "PagedAdamW32bit", {}), ("Lion8bit", "Lion8bit", {}), ("PagedLion8bit", "PagedLion8bit", {}),
    ("SGDNesterov8bit", "SGD8bit", {"nesterov": True, "momentum": 0.9}),
    ("bitsandbytes.optim.AdamW8bit", "AdamW8bit", {}),
])
def test_bitsandbytes_wiring(fake_bnb, name, cls, extra):
    gs = groups()
    opt = build_optimizer(gs, 1e-2, {"weight_decay": "0.1"}, torch.device("cuda"), optimizer_type=name)
    assert type(opt) is getattr(fake_bnb, cls)
    assert opt.kwargs["weight_decay"] == 0.1 and all(opt.kwargs[k] == v for k, v in extra.items())
    loss_step(opt, gs)
    if name.startswith("bitsandbytes."):  # a class path is taken literally: no stand-in
        with pytest.raises(ConfigError, match=rf"optimizer_type: {name} \(bitsandbytes\) runs on CUDA only; the "
                                              r"training device is cpu"):
            build_optimizer(groups(), 1e-2, None, torch.device("cpu"), optimizer_type=name)
        with pytest.raises(ConfigError, match="runs on CUDA only"):  # device taken from the parameters
            build_optimizer(groups(), 1e-2, None, optimizer_type=name)


@pytest.mark.parametrize("name, stand_in", [
    ("AdamW8bit", torch.optim.AdamW), ("PagedAdamW", torch.optim.AdamW), ("PagedAdamW8bit", torch.optim.AdamW),
    ("PagedAdamW32bit", torch.optim.AdamW), ("SGDNesterov8bit", torch.optim.SGD),
])
def test_bitsandbytes_without_cuda_runs_its_fp32_stand_in_with_a_notice(monkeypatch, caplog, name, stand_in):
    """Issue 14 (compatibility rule 2): 8-bit/paged states only save GPU memory, so on a machine without CUDA the
    same algorithm runs with fp32 states — a kohya config naming AdamW8bit trains unchanged (CI, CPU users)."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not even installed: nothing of it is imported
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = parse_train_args([*REQUIRED, "--optimizer_type", name, "--optimizer_args", "weight_decay=0.1",
                          "optim_bits=8"])
    assert (c.optimizer_type, c.optimizer_args) == (name, {"weight_decay": 0.1, "optim_bits": 8})
    gs, ref_gs = groups(), groups()
    with caplog.at_level("WARNING", logger="anima_trainer.train.optim"):
        opt = build_optimizer(gs, 1e-2, c.optimizer_args, torch.device("cpu"), optimizer_type=name)
    assert type(opt) is stand_in and opt.defaults["weight_decay"] == 0.1 and "optim_bits" not in opt.defaults
    assert (f"notice: optimizer_type = {name}: bitsandbytes' 8-bit/paged optimizer states exist to save GPU memory "
            f"and need CUDA; this run trains on cpu, so {stand_in.__name__.replace('SGD', 'SGDNesterov')} with fp32 "
            "states runs instead (the same algorithm; its own optimizer_args optim_bits have no meaning there; "
            "nothing to change)") in caplog.text
    plain = "AdamW" if stand_in is torch.optim.AdamW else "SGDNesterov"
    ref = build_optimizer(ref_gs, 1e-2, {"weight_decay": 0.1}, torch.device("cpu"), optimizer_type=plain)
    for _ in range(2):
        loss_step(opt, gs), loss_step(ref, ref_gs)
    for g, r in zip(gs, ref_gs, strict=True):  # exactly the plain optimizer's steps
        assert torch.equal(g["params"][0], r["params"][0])


def test_bitsandbytes_config_with_and_without_the_package(fake_bnb, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine: bitsandbytes itself is used
    c = checked(["--optimizer_type", "adamw8bit", "--optimizer_args", "optim_bits=8"])
    assert (c.optimizer_type, c.optimizer_args) == ("AdamW8bit", {"optim_bits": 8})
    assert optimizer_description(c.optimizer_type, c.optimizer_args) == "fake.AdamW8bit(optim_bits=8)"
    assert checked(["--use_8bit_adam"]).optimizer_type == "AdamW8bit"  # kohya's legacy flag
    assert error(["--optimizer_type", "AdamW8bit", "--optimizer_args", "foo=1"]) == (
        "optimizer_args: AdamW8bit has no argument 'foo' (AdamW8bit accepts: betas, eps, weight_decay, optim_bits, "
        "min_8bit_size)")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: importing it fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    msg = error(["--optimizer_type", "PagedAdamW8bit"])
    assert msg.startswith("optimizer_type: 'PagedAdamW8bit' needs the bitsandbytes package, which is not "
                          "installed: pip install bitsandbytes")
    assert error(["--use_8bit_adam"]).startswith("use_8bit_adam: 'AdamW8bit' needs the bitsandbytes package")
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        build_optimizer(groups(), 1e-2, None, torch.device("cuda"), optimizer_type="AdamW8bit")


@pytest.mark.parametrize("name, cls", [("DAdaptation", "experimental.DAdaptAdamPreprint"),
                                       ("DAdaptAdamPreprint", "experimental.DAdaptAdamPreprint"),
                                       ("DAdaptAdaGrad", "DAdaptAdaGrad"), ("dadaptadam", "DAdaptAdam"),
                                       ("DAdaptAdan", "DAdaptAdan"), ("DAdaptAdanIP", "experimental.DAdaptAdanIP"),
                                       ("DAdaptLion", "DAdaptLion"), ("DAdaptSGD", "DAdaptSGD")])
def test_dadaptation_wiring_and_d_times_lr(fake_dadapt, name, cls):
    with pytest.raises(ConfigError, match="refuses different learning rates per group"):
        build_optimizer(groups(), 1.0, optimizer_type=name)
    gs = groups()
    gs[0]["lr"] = gs[1]["lr"] = 0.5
    opt = build_optimizer(gs, 0.5, {"d0": "1e-5"}, optimizer_type=name)
    expected_cls = fake_dadapt
    for part in cls.split("."):
        expected_cls = getattr(expected_cls, part)
    assert type(opt) is expected_cls and opt.kwargs["d0"] == 1e-5
    assert effective_lrs(opt) == {"base": 0.5, "base/plus": 0.5}  # before the first step: no d yet
    loss_step(opt, gs)
    assert effective_lrs(opt) == {"base": 1.5, "base/plus": 1.5}  # d·lr, kohya's lr/d*lr


def test_dadaptation_missing_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dadaptation", None)
    assert error(["--optimizer_type", "DAdaptAdam"]).startswith(
        "optimizer_type: 'DAdaptAdam' needs the dadaptation package, which is not installed: pip install dadaptation")


def test_lion_prefers_pytorch_optimizer_then_lion_pytorch(monkeypatch):
    import pytorch_optimizer

    assert type(build_optimizer(groups(), 1e-4, optimizer_type="Lion")) is pytorch_optimizer.Lion
    fake = types.ModuleType("lion_pytorch")
    fake.Lion = _fake_class("Lion", {"betas": (0.9, 0.99), "weight_decay": 0.0, "use_triton": False})
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    monkeypatch.setitem(sys.modules, "lion_pytorch", fake)
    opt = build_optimizer(groups(), 1e-4, {"use_triton": False}, optimizer_type="lion")
    assert type(opt) is fake.Lion
    assert parse_train_args([*REQUIRED, "--use_lion_optimizer"]).optimizer_type == "Lion"
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    assert error(["--optimizer_type", "Lion"]).startswith(
        "optimizer_type: 'Lion' needs the pytorch-optimizer package, which is not installed: pip install "
        "pytorch-optimizer")


def test_prodigy_effective_lr_is_d_times_lr():
    with pytest.raises(ConfigError, match=r"optimizer_type: Prodigy adapts one step size for all parameters and "
                                          r"refuses different learning rates per group \(0.01, 0.04, from"):
        build_optimizer(groups(), 1.0, optimizer_type="Prodigy")
    gs = groups()
    for g in gs:
        g["lr"] = 1.0
    opt = build_optimizer(gs, 1.0, {"d_coef": "2.0"}, optimizer_type="Prodigy")
    for _ in range(4):
        loss_step(opt, gs)
    eff = effective_lrs(opt)
    assert eff == {g["name"]: g["d"] * g["lr"] for g in opt.param_groups}
    assert eff["base"] != opt.param_groups[0]["lr"] and opt.param_groups[0]["d"] > 1e-6  # d has grown from d0


def test_adafactor_relative_step_and_its_schedule():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = build_optimizer([{"params": [p], "lr": 1e-4, "name": "base"}], 1e-4, {}, optimizer_type="AdaFactor")
    assert opt.param_groups[0]["relative_step"] is True
    sched = build_scheduler(opt, "adafactor", 10)
    for _ in range(3):
        loss_step(opt, [{"params": [p]}])
        sched.step()
    # transformers' rule: min(1e-2, 1/sqrt(step)) × max(eps2, RMS(param before the step))
    state = opt.state[p]
    expected = min(1e-2, 1 / 3 ** 0.5) * max(1e-3, float(state["RMS"]))
    assert sched.get_last_lr() == pytest.approx([expected]) and effective_lrs(opt) == pytest.approx({"base": expected})
    with pytest.raises(ConfigError, match="per-group learning rates .* would be ignored; set relative_step=False"):
        build_optimizer(groups(), 1e-4, {}, optimizer_type="AdaFactor")
    fixed = build_optimizer(groups(), 1e-4, {"relative_step": "False", "scale_parameter": "False"},
                            optimizer_type="adafactor")
    assert [g["lr"] for g in fixed.param_groups] == [1e-2, 4e-2]


def test_schedule_free_train_eval_switching():
    gs = groups()
    opt = build_optimizer(gs, 1e-2, {"warmup_steps": "4"}, optimizer_type="AdamWScheduleFree")
    assert is_schedule_free(opt) and opt.param_groups[0]["train_mode"]  # returned ready to step
    loss_step(opt, gs)
    assert effective_lrs(opt) == pytest.approx({"base": 1e-2 / 4, "base/plus": 4e-2 / 4})  # its own warm-up
    for _ in range(4):
        loss_step(opt, gs)
    y = [g["params"][0].detach().clone() for g in gs]
    set_optimizer_train_mode(opt, False)
    # schedulefree: training point y = (1 - β1)·z + β1·x; eval() puts the average x into the parameters
    beta = opt.param_groups[0]["betas"][0]
    for g, y_ in zip(gs, y, strict=True):
        z = opt.state[g["params"][0]]["z"]
        torch.testing.assert_close(g["params"][0].detach(), (y_ - (1 - beta) * z) / beta)
        assert not torch.allclose(g["params"][0], y_)
    assert not opt.param_groups[0]["train_mode"]
    set_optimizer_train_mode(opt, False)  # idempotent
    set_optimizer_train_mode(opt, True)
    for g, y_ in zip(gs, y, strict=True):
        torch.testing.assert_close(g["params"][0].detach(), y_)
    adamw_gs = groups()
    adamw = build_optimizer(adamw_gs, 1e-2)
    loss_step(adamw, adamw_gs)
    before = [g["params"][0].detach().clone() for g in adamw_gs]
    set_optimizer_train_mode(adamw, False)
    assert not is_schedule_free(adamw)
    assert all(torch.equal(g["params"][0], b) for g, b in zip(adamw_gs, before, strict=True))


def test_custom_dotted_optimizer_and_args_with_equals(monkeypatch):
    mod = types.ModuleType("my_optims")

    class Tagged(torch.optim.SGD):
        def __init__(self, params, lr=0.1, tag: str = "", momentum=0.0):
            super().__init__(params, lr=lr, momentum=momentum)
            self.tag = tag

    mod.Tagged, mod.NotAnOptimizer = Tagged, dict
    monkeypatch.setitem(sys.modules, "my_optims", mod)
    c = checked(["--optimizer_type", "my_optims.Tagged", "--optimizer_args", "tag=a=b", "momentum=0.5"])
    assert c.optimizer_args == {"tag": "a=b", "momentum": 0.5}  # split at the first '='
    opt = build_optimizer(groups(), 1e-2, c.optimizer_args, optimizer_type=c.optimizer_type)
    assert type(opt) is Tagged and opt.tag == "a=b" and opt.defaults["momentum"] == 0.5
    assert error(["--optimizer_type", "my_optims.NotAnOptimizer"]) == \
        "optimizer_type: 'my_optims.NotAnOptimizer' is not a torch.optim.Optimizer class"
    assert error(["--optimizer_type", "my_optims.Taged"]) == \
        "optimizer_type: 'my_optims.Taged' is not a torch.optim.Optimizer class; did you mean 'Tagged'?"


# --- config errors ---------------------------------------------------------------------------------------------
def test_schedule_free_needs_constant_schedule_without_warmup():
    msg = error(["--optimizer_type", "RAdamScheduleFree", "--lr_scheduler", "cosine"])
    assert msg == ("optimizer_type: 'RAdamScheduleFree' is schedule-free and needs lr_scheduler = \"constant\" and "
                   "lr_warmup_steps = 0 (got lr_scheduler = 'cosine', lr_warmup_steps = 0)")
    msg = error(["--optimizer_type", "adamw_schedulefree", "--lr_scheduler", "constant_with_warmup",
                 "--lr_warmup_steps", "10"])
    assert "lr_scheduler = 'constant_with_warmup', lr_warmup_steps = 10" in msg
    assert msg.endswith("; for a warm-up use its own optimizer_args warmup_steps=N")
    msg = error(["--optimizer_type", "SGDScheduleFree", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps",
                 "0.1"])
    assert "needs lr_scheduler = \"constant\" and lr_warmup_steps = 0" in msg
    # a warm-up with the default constant schedule is refused by TrainConfig's validation, before the start-up
    # check that knows the class is schedule-free
    assert error(["--optimizer_type", "SGDScheduleFree", "--lr_warmup_steps", "0.1"]).startswith(
        "lr_warmup_steps: the 'constant' scheduler has no warm-up")
    c = checked(["--optimizer_type", "sgd_schedulefree", "--optimizer_args", "warmup_steps=100"])
    assert (c.optimizer_type, c.lr_scheduler, c.optimizer_args) == ("SGDScheduleFree", "constant",
                                                                    {"warmup_steps": 100})


def test_optimizer_name_and_args_errors():
    msg = error(["--optimizer_type", "prodgy"])
    assert msg.startswith("optimizer_type: unknown optimizer 'prodgy'; did you mean 'Prodigy'? Accepted: kohya's "
                          "names (AdamW, AdamW8bit,")
    msg = error(["--optimizer_type", "Prodigy", "--optimizer_args", "d_cof=2"])
    assert msg.startswith("optimizer_args: Prodigy has no argument 'd_cof'; did you mean 'd_coef'? (Prodigy "
                          "accepts: betas, beta3, eps, weight_decay, decouple, use_bias_correction, safeguard_warmup, "
                          "d0, d_coef, growth_rate")
    assert error(["--optimizer_type", "AdamW", "--optimizer_args", "lr=1"]) == \
        "optimizer_args: 'lr' cannot be set here; use learning_rate"
    assert error(["--optimizer_args", "betas=(1.5,0.9)"]) == \
        "optimizer_args: AdamW rejects (betas=(1.5, 0.9)): Invalid beta parameter at index 0: 1.5"
    assert error(["--optimizer_type", "SGDNesterov", "--optimizer_args", "nesterov=False"]).startswith(
        "optimizer_args: SGDNesterov always uses nesterov=True; remove 'nesterov'")
    assert error(["--use_8bit_adam", "--use_lion_optimizer"]) == \
        "use_8bit_adam and use_lion_optimizer: only one of them may be set"
    assert error(["--use_lion_optimizer", "--optimizer_type", "Prodigy"]).startswith(
        "use_lion_optimizer: kohya's legacy flag for optimizer_type = \"Lion\" conflicts with optimizer_type = "
        "\"Prodigy\"")
    assert error(["--optimizer_type", "AdaFactor", "--lr_scheduler", "cosine"]).startswith(
        "optimizer_type: AdaFactor with relative_step=True (its default) computes its own step size, so it needs "
        "lr_scheduler = \"adafactor\" and lr_warmup_steps = 0 (got lr_scheduler = 'cosine', lr_warmup_steps = 0)")
    assert error(["--lr_scheduler", "adafactor"]).startswith("lr_scheduler: 'adafactor' reports AdaFactor's own")


def test_optimizer_names_resolve_and_metadata():
    assert {s.name for s in SPECS.values()} == set(ko.KOHYA_OPTIMIZERS)
    for given, stored in (("ADAMW", "AdamW"), ("torch.optim.AdamW", "AdamW"), ("prodigy", "Prodigy"),
                          ("came", "pytorch_optimizer.CAME"), ("adam", "torch.optim.Adam"), ("", "AdamW")):
        assert check_optimization(make_train_config(_values(optimizer_type=given))).optimizer_type == stored, given
    c = parse_train_args([*REQUIRED, "--optimizer_type", "AdaFactor"])  # a fill by name: TrainConfig's validation
    assert c.lr_scheduler == "adafactor"  # kohya switches AdaFactor's relative step to its own schedule
    assert optimizer_description("AdamW", {"weight_decay": 0.01}) == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert optimizer_description("AdamW", {}) == "torch.optim.adamw.AdamW"
    assert optimizer_description("SGDNesterov", {}) == "torch.optim.sgd.SGD(momentum=0.9)"  # as kohya writes it
    assert optimizer_description("Prodigy", {"d_coef": 2.0, "betas": (0.9, 0.99)}) == \
        "prodigyopt.prodigy.Prodigy(d_coef=2.0,betas=(0.9, 0.99))"
    c = check_optimization(make_train_config(_values(optimizer_type="came", optimizer_args=["weight_decay=0.01"])))
    assert optimizer_description(c.optimizer_type, c.optimizer_args) == \
        "pytorch_optimizer.optimizer.came.CAME(weight_decay=0.01)"


def _values(**kw) -> dict:
    return {"pretrained_model_name_or_path": "d", "qwen3": "q", "vae": "v", "output_dir": "o",
            "dataset_config": "ds", **kw}


def test_no_longer_listed_as_unimplemented():
    for name in ("lr_decay_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_min_lr_ratio",
                 "lr_scheduler_timescale", "lr_scheduler_type", "lr_scheduler_args", "use_8bit_adam",
                 "use_lion_optimizer"):
        assert name not in ko.RULES


# --- the start-up check: where users meet it ---------------------------------------------------------------------
_MISSING_MODELS_TOML = """\
pretrained_model_name_or_path = "missing/dit.safetensors"
qwen3 = "missing/qwen3.safetensors"
vae = "missing/vae.safetensors"
output_dir = "out"
dataset_config = "missing/dataset.toml"

[optimizer]
optimizer_type = "AdamW"
optimizer_args = ["weight_decy=0.1"]
"""
_WEIGHT_DECY = ("optimizer_args: AdamW has no argument 'weight_decy'; did you mean 'weight_decay'? (AdamW accepts: "
                "betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused)")


def test_bad_optimizer_args_in_a_toml_fail_at_start_up_before_any_file_is_opened(tmp_path, monkeypatch, capsys):
    """Validating the TOML needs no optimizer class, so it passes; the run's start-up refuses it before the
    (missing) model files, tokenizers and dataset are looked at, naming the option, the file and the line."""
    from anima_trainer.cli import main
    from anima_trainer.train.loop import run_training

    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "train.toml"
    toml.write_text(_MISSING_MODELS_TOML, encoding="utf-8")
    cfg = parse_train_args(["--config_file", str(toml)])
    with pytest.raises(ConfigError) as e:
        run_training(cfg)
    assert str(e.value) == f"{_WEIGHT_DECY} (in train.toml line 9)"
    # the command line wins over the TOML: then no file and line are named
    with pytest.raises(ConfigError) as e:
        run_training(parse_train_args(["--config_file", str(toml), "--optimizer_args", "weight_decy=0.2"]))
    assert str(e.value) == _WEIGHT_DECY
    assert main(["train", "--config_file", str(toml)]) == 2  # the real entry point: one line, exit status 2
    assert f"{_WEIGHT_DECY} (in train.toml line 9)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cache_command_runs_the_same_start_up_check(tmp_path, monkeypatch, capsys):
    from anima_trainer.cli import main

    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "train.toml"
    toml.write_text(_MISSING_MODELS_TOML, encoding="utf-8")
    assert main(["cache", "--config_file", str(toml)]) == 2
    assert f"{_WEIGHT_DECY} (in train.toml line 9)" in capsys.readouterr().err


def test_output_config_writes_only_a_config_that_starts_and_as_it_starts(tmp_path, monkeypatch, capsys):
    """kohya's --output_config writes a config only after every option is checked — the start-up check too —
    and writes the class-based names as a run resolves them."""
    from anima_trainer.cli import main

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "written.toml"
    bad = ["train", *REQUIRED, "--optimizer_args", "weight_decy=0.1", "--output_config", "--config_file", str(target)]
    assert main(bad) == 2
    assert _WEIGHT_DECY in capsys.readouterr().err and not target.exists()
    assert main(["train", *REQUIRED, "--optimizer_type", "sgd", "--lr_scheduler_type", "steplr", "--lr_scheduler_args",
                 "step_size=2", "--output_config", "--config_file", str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    assert 'optimizer_type = "torch.optim.SGD"' in text
    assert 'lr_scheduler_type = "torch.optim.lr_scheduler.StepLR"' in text


def test_convert_config_refuses_an_optimizer_that_would_not_start(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from anima_trainer.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "root.toml").write_text(
        '[model]\ntransformer_path = "m/dit.safetensors"\nvae_path = "m/vae.safetensors"\n'
        'text_encoder_path = "m/qwen3.safetensors"\nt5_tokenizer_path = "m/t5"\n[dataset]\ndata_dir = "imgs"\n'
        '[training]\n[optimizer]\ntype = "adamw"\nbeta1 = 1.5\n', encoding="utf-8")
    assert main(["convert-config", "root.toml", "--out", "out"]) == 2
    assert ("the converted settings do not validate (nothing written):\noptimizer_args: AdamW rejects "
            "(weight_decay=0.01,eps=1e-08,betas=(1.5, 0.999)): Invalid beta parameter at index 0: 1.5"
            ) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validating_a_config_loads_no_torch():
    """`import anima_trainer.config` and parsing a config with optimizer and schedule settings import no torch
    (and no optimizer package): those rules need the classes and run at start-up."""
    import subprocess

    code = ("import sys\n"
            "from anima_trainer.config import parse_train_args\n"
            f"cfg = parse_train_args({REQUIRED!r} + ['--optimizer_type', 'Prodigy', '--optimizer_args', 'd_coef=2',\n"
            "    '--lr_scheduler', 'piecewise_constant', '--lr_scheduler_args', 'step_rules=1:10,0.1'])\n"
            "loaded = sorted(m for m in ('torch', 'prodigyopt', 'transformers', 'pytorch_optimizer') if m in "
            "sys.modules)\n"
            "print(cfg.optimizer_type, loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Prodigy []"
