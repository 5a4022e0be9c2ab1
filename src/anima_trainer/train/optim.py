"""Optimizers by kohya's `--optimizer_type` names (plus torch / pytorch_optimizer classes and dotted paths).

Resolution of a name (case-insensitive): sd-scripts-anima aliases → kohya's names (table below) → a class of
torch.optim → a class of pytorch_optimizer → `module.Class`.  Optional packages are imported only when named;
a missing one is an error naming its `pip install`.  Schedulers live in schedulers.py (re-exported here).

`check_optimization(cfg)` is the start-up half of the optimizer/schedule rules (the other half, which needs no
class, is TrainConfig's validation: config/optimizer_rules.py): it lives here because every rule it runs asks
this module (or schedulers.py) for the class; setup_run calls it before any model loads.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from anima_trainer.config import TrainConfig
from anima_trainer.config.errors import ConfigError, did_you_mean
from anima_trainer.config.loader import locate_in_source
from anima_trainer.config.optimizer_rules import legacy_optimizer_flag, optimizer_name
from anima_trainer.train.schedulers import (
    build_scheduler,
    check_scheduler_args,
    resolve_scheduler_class,
    resolve_warmup,
    schedule_options,
)

__all__ = ["OptimizerSpec", "build_optimizer", "build_scheduler", "canonical_optimizer_name", "check_optimization",
           "check_optimizer_args", "component_lrs", "effective_lrs", "is_schedule_free", "is_schedule_free_class",
           "optimizer_description", "resolve_optimizer", "resolve_warmup", "set_optimizer_train_mode", "use_full_half",
           "uses_relative_step"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSpec:
    """How a kohya name is built: the class (first importable of `paths`), the pip package, kwargs always passed
    (`fixed`) or passed unless the user sets them (`defaults`), and whether it only runs on CUDA."""

    name: str
    paths: tuple[str, ...]
    package: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_cuda: bool = False
    one_lr: bool = False  # adapts one step size for all groups: differing group lrs are refused by the package


def _bnb(name: str, cls: str, **kw: Any) -> OptimizerSpec:
    return OptimizerSpec(name, (f"bitsandbytes.optim.{cls}",), "bitsandbytes", needs_cuda=True, **kw)


def _dadapt(name: str, path: str) -> OptimizerSpec:
    return OptimizerSpec(name, (path,), "dadaptation", one_lr=True)


_SPECS = [
    OptimizerSpec("AdamW", ("torch.optim.AdamW",)),
    _bnb("AdamW8bit", "AdamW8bit"),
    _bnb("PagedAdamW", "PagedAdamW"),
    _bnb("PagedAdamW8bit", "PagedAdamW8bit"),
    _bnb("PagedAdamW32bit", "PagedAdamW32bit"),
    _bnb("Lion8bit", "Lion8bit"),
    _bnb("PagedLion8bit", "PagedLion8bit"),
    _bnb("SGDNesterov8bit", "SGD8bit", fixed={"nesterov": True}, defaults={"momentum": 0.9}),
    # pytorch_optimizer's Lion (installed with the test extra), else lion-pytorch (what kohya imports)
    OptimizerSpec("Lion", ("pytorch_optimizer.Lion", "lion_pytorch.Lion"), "pytorch-optimizer"),
    OptimizerSpec("SGDNesterov", ("torch.optim.SGD",), fixed={"nesterov": True}, defaults={"momentum": 0.9}),
    _dadapt("DAdaptation", "dadaptation.experimental.DAdaptAdamPreprint"),
    _dadapt("DAdaptAdamPreprint", "dadaptation.experimental.DAdaptAdamPreprint"),
    _dadapt("DAdaptAdaGrad", "dadaptation.DAdaptAdaGrad"),
    _dadapt("DAdaptAdam", "dadaptation.DAdaptAdam"),
    _dadapt("DAdaptAdan", "dadaptation.DAdaptAdan"),
    _dadapt("DAdaptAdanIP", "dadaptation.experimental.DAdaptAdanIP"),
    _dadapt("DAdaptLion", "dadaptation.DAdaptLion"),
    _dadapt("DAdaptSGD", "dadaptation.DAdaptSGD"),
    OptimizerSpec("Prodigy", ("prodigyopt.Prodigy",), "prodigyopt", one_lr=True),
    OptimizerSpec("AdaFactor", ("transformers.optimization.Adafactor",), "transformers"),
    OptimizerSpec("RAdamScheduleFree", ("schedulefree.RAdamScheduleFree",), "schedulefree"),
    OptimizerSpec("AdamWScheduleFree", ("schedulefree.AdamWScheduleFree",), "schedulefree"),
    OptimizerSpec("SGDScheduleFree", ("schedulefree.SGDScheduleFree",), "schedulefree"),
]
SPECS: dict[str, OptimizerSpec] = {s.name.lower(): s for s in _SPECS}


def _optimizer_classes(module: Any) -> dict[str, type]:
    return {n: c for n, c in vars(module).items()
            if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and not n.startswith("_")}


def _pytorch_optimizer_classes() -> dict[str, type]:
    try:
        import pytorch_optimizer
    except ImportError:
        return {}
    return _optimizer_classes(pytorch_optimizer)


def _find(classes: dict[str, type], name: str) -> str | None:
    return next((n for n in classes if n.lower() == name.lower()), None)


def canonical_optimizer_name(value: str) -> str:
    """The stored form of an optimizer_type: kohya's spelling of its names, `torch.optim.X` /
    `pytorch_optimizer.X` for bare class names of those packages, else the dotted path as given."""
    name = optimizer_name(value)  # kohya's names and aliases ("" is AdamW), as TrainConfig stores them
    if name.lower() in SPECS:
        return SPECS[name.lower()].name
    if "." in name:
        return name
    if hit := _find(_optimizer_classes(torch.optim), name):
        return f"torch.optim.{hit}"
    po = _pytorch_optimizer_classes()
    if hit := _find(po, name):
        return f"pytorch_optimizer.{hit}"
    known = [s.name for s in _SPECS] + list(_optimizer_classes(torch.optim)) + list(po)
    extra = "" if po else " (pytorch_optimizer's classes need `pip install pytorch-optimizer`)"
    hint = did_you_mean(name, known)
    raise ValueError(f"unknown optimizer {value!r}{hint + ' ' if hint else '. '}Accepted: kohya's names "
                     f"({', '.join(s.name for s in _SPECS)}), a class of torch.optim or pytorch_optimizer{extra}, "
                     "or module.Class")


# pip names of the packages a dotted path may come from
_PIP = {"bitsandbytes": "bitsandbytes", "pytorch_optimizer": "pytorch-optimizer", "dadaptation": "dadaptation",
        "prodigyopt": "prodigyopt", "schedulefree": "schedulefree", "lion_pytorch": "lion-pytorch"}


# bitsandbytes' 8-bit and paged optimizer states exist to save GPU memory and run on CUDA only; on a machine without
# CUDA the same algorithm runs with ordinary fp32 states (a notice says so: the compatibility rule's "no meaning here")
NO_CUDA_EQUIVALENTS = {"adamw8bit": "AdamW", "pagedadamw": "AdamW", "pagedadamw8bit": "AdamW",
                       "pagedadamw32bit": "AdamW", "lion8bit": "Lion", "pagedlion8bit": "Lion",
                       "sgdnesterov8bit": "SGDNesterov"}


def without_cuda(optimizer_type: str) -> str | None:
    """The fp32 optimizer that stands in for a bitsandbytes one where there is no CUDA device, else None."""
    return NO_CUDA_EQUIVALENTS.get(canonical_optimizer_name(optimizer_type).lower())


def resolve_optimizer(optimizer_type: str,
                      cuda: bool | None = None) -> tuple[OptimizerSpec, type[torch.optim.Optimizer]]:
    """The spec and the imported class of a canonical optimizer_type; ValueError naming `pip install` when the
    package is missing, or when a dotted path is not an optimizer class.  Without CUDA (`cuda`, default: this
    machine) a bitsandbytes optimizer resolves to its fp32 equivalent (NO_CUDA_EQUIVALENTS)."""
    if not (torch.cuda.is_available() if cuda is None else cuda) and without_cuda(optimizer_type):
        optimizer_type = without_cuda(optimizer_type)
    name = canonical_optimizer_name(optimizer_type)
    spec = SPECS.get(name.lower())
    if spec is None:  # dotted path
        root = name.split(".", 1)[0]
        spec = OptimizerSpec(name, (name,), _PIP.get(root, ""), needs_cuda=root == "bitsandbytes")
    errors = []
    for path in spec.paths:
        module_name, _, cls_name = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            errors.append(f"{module_name}: {e}")
            continue
        classes = _optimizer_classes(module)
        hit = cls_name if isinstance(getattr(module, cls_name, None), type) else _find(classes, cls_name)
        cls = getattr(module, hit) if hit else None
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"{name!r} is not a torch.optim.Optimizer class{did_you_mean(cls_name, classes)}")
        if cls is torch.optim.AdamW:
            spec = SPECS["adamw"]
        return spec, cls
    if not spec.package:
        raise ValueError(f"{name!r}: cannot import {'; '.join(errors)}")
    raise ValueError(f"'{name}' needs the {spec.package} package, which is not installed: pip install {spec.package} "
                     f"({'; '.join(errors)})")


def is_schedule_free_class(cls: type) -> bool:
    """Schedule-free optimizers (schedulefree, pytorch_optimizer's ScheduleFree*) have train()/eval() modes."""
    return callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None))


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True when `optimizer` needs `set_optimizer_train_mode` around evaluation and saving."""
    return is_schedule_free_class(type(optimizer))


def set_optimizer_train_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Schedule-free optimizers keep the training point in the parameters; eval() swaps in the averaged weights
    (what should be sampled, validated and saved) and train() swaps back.  No-op for other optimizers."""
    if is_schedule_free(optimizer):
        optimizer.train() if training else optimizer.eval()  # type: ignore[attr-defined]


def _is_adafactor(cls: type) -> bool:
    return cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers")


def uses_relative_step(optimizer_type: str, optimizer_args: dict[str, Any]) -> bool:
    """AdaFactor with relative_step=True (transformers' default) computes its own lr: learning_rate is unused."""
    _, cls = resolve_optimizer(optimizer_type)
    return _is_adafactor(cls) and bool(optimizer_args.get("relative_step", True))


def accepted_args(cls: type) -> list[str]:
    """Keyword arguments of the class's __init__ (and its bases' when it forwards **kwargs)."""
    out: list[str] = []
    for klass in cls.__mro__:
        if klass in (torch.optim.Optimizer, object) or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        out += [n for n, p in params.items() if n not in ("self", "params", "lr", "defaults", *out)
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return out


def check_optimizer_args(optimizer_type: str, optimizer_args: dict[str, Any], lr: float | None = None) -> None:
    """Every key must be an argument of the optimizer; then the optimizer is built once on a dummy tensor so that
    bad values fail at start-up, not after the models are loaded.  ValueError with the reason."""
    if without_cuda(optimizer_type) and not torch.cuda.is_available():
        return  # its fp32 stand-in runs here (build_optimizer): bitsandbytes-only arguments are dropped there
    spec, cls = resolve_optimizer(optimizer_type)
    _check_keys(spec, cls, optimizer_args)
    if spec.needs_cuda:
        return  # bitsandbytes allocates on the GPU
    try:
        _construct(spec, cls, [torch.zeros(1, requires_grad=True)], 1e-4 if lr is None else lr, optimizer_args)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{spec.name} rejects {_fmt_args(optimizer_args)}: {e}") from None


def check_optimization(cfg: TrainConfig) -> TrainConfig:
    """The optimizer/schedule rules that need the classes, run at start-up before any model loads (setup_run; the
    commands also before --output_config writes a file): the optimizer_type is installed and resolves, its
    optimizer_args fit its signature and values, a schedule-free one runs without a schedule, AdaFactor's
    relative step goes with its `adafactor` schedule, lr_scheduler_type is a scheduler class taking
    lr_scheduler_args, and the schedule builds (when the step count is known).  Returns the config with the
    class-based names kohya-style (`torch.optim.SGD` for "sgd", `module.Class` for lr_scheduler_type); a mistake
    is a ConfigError naming the option, and the user's file and line (config/loader.py locate_in_source)."""
    try:
        return _check_optimization(cfg)
    except ValueError as e:  # ConfigError too
        raise ConfigError(locate_in_source(cfg, str(e))) from None


def _check_optimization(cfg: TrainConfig) -> TrainConfig:
    try:
        name = canonical_optimizer_name(cfg.optimizer_type)
        spec, cls = resolve_optimizer(name)  # the package must be installed (error names `pip install ...`)
    except ValueError as e:
        raise ValueError(f"{legacy_optimizer_flag(cfg) or 'optimizer_type'}: {e}") from None
    try:
        check_optimizer_args(name, cfg.optimizer_args, cfg.unet_lr or cfg.learning_rate)
    except ValueError as e:
        raise ValueError(f"optimizer_args: {e}") from None
    if is_schedule_free_class(cls):
        if cfg.lr_scheduler != "constant" or cfg.lr_warmup_steps or cfg.lr_scheduler_type:
            hint = ("; for a warm-up use its own optimizer_args warmup_steps=N"
                    if "warmup_steps" in accepted_args(cls) else "")
            raise ValueError(
                f"optimizer_type: '{spec.name}' is schedule-free and needs lr_scheduler = \"constant\" and "
                f"lr_warmup_steps = 0 (got lr_scheduler = '{cfg.lr_scheduler_type or cfg.lr_scheduler}', "
                f"lr_warmup_steps = {cfg.lr_warmup_steps}){hint}")
    if uses_relative_step(name, cfg.optimizer_args):  # config/optimizer_rules.py chose its schedule when unset
        if cfg.lr_scheduler != "adafactor" or cfg.lr_warmup_steps or cfg.lr_scheduler_type:
            raise ValueError(
                f"optimizer_type: AdaFactor with relative_step=True (its default) computes its own step size, "
                f"so it needs lr_scheduler = \"adafactor\" and lr_warmup_steps = 0 (got lr_scheduler = "
                f"'{cfg.lr_scheduler_type or cfg.lr_scheduler}', lr_warmup_steps = {cfg.lr_warmup_steps}); "
                "for a warm-up use optimizer_args warmup_init=True, or set optimizer_args relative_step=False "
                "(usually with scale_parameter=False) to use learning_rate with any lr_scheduler")
        if {"learning_rate", "unet_lr"} & cfg.model_fields_set:
            log.warning("learning_rate/unet_lr: not used by AdaFactor with relative_step=True (it computes "
                        "its own step size)")
    elif cfg.lr_scheduler == "adafactor":
        raise ValueError("lr_scheduler: 'adafactor' reports AdaFactor's own step size; it needs optimizer_type = "
                         "\"AdaFactor\" with relative_step=True (its default)")
    scheduler_type = cfg.lr_scheduler_type
    if scheduler_type:
        scheduler_cls = resolve_scheduler_class(scheduler_type)
        scheduler_type = f"{scheduler_cls.__module__}.{scheduler_cls.__name__}"
        check_scheduler_args(scheduler_cls, cfg.lr_scheduler_args)
    resolved = {"optimizer_type": name, "lr_scheduler_type": scheduler_type}
    if any(getattr(cfg, k) != v for k, v in resolved.items()):
        cfg = cfg.model_copy(update=resolved)
    if cfg.max_train_epochs is None:  # the step count is known: build the schedule once (as the loop will)
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        build_scheduler(dummy, cfg.lr_scheduler, cfg.max_train_steps, **schedule_options(cfg))
    return cfg


def _construct(spec: OptimizerSpec, cls: type, params: Any, lr: float, args: dict[str, Any]) -> torch.optim.Optimizer:
    kwargs = {**spec.defaults, **args, **spec.fixed}
    if _is_adafactor(cls) and kwargs.get("relative_step", True):
        return cls(params, lr=None, **kwargs)  # relative step: transformers refuses a manual lr
    return cls(params, lr=lr, **kwargs)


def build_optimizer(params: list[dict] | list[torch.nn.Parameter], lr: float, optimizer_args: dict | None = None,
                    device: torch.device | None = None, *, optimizer_type: str = "AdamW") -> torch.optim.Optimizer:
    """The optimizer over `params` (tensors or param groups with their own "lr"/"name").  AdamW is fused on CUDA
    and foreach elsewhere unless optimizer_args set either; schedule-free ones are returned in train mode."""
    params = list(params)
    if device is None:
        first = next((p for g in params for p in (g["params"] if isinstance(g, dict) else [g])), None)
        device = first.device if first is not None else torch.device("cpu")
    stand_in = without_cuda(optimizer_type) if device.type != "cuda" else None
    try:
        spec, cls = resolve_optimizer(optimizer_type, cuda=device.type == "cuda")
    except ValueError as e:
        raise ConfigError(f"optimizer_type: {e}") from None
    args = {k: _literal(v) for k, v in (optimizer_args or {}).items()}
    if stand_in:
        accepted = set(accepted_args(cls))
        dropped = sorted(k for k in args if k not in accepted)  # optim_bits, min_8bit_size, percentile_clipping …
        args = {k: v for k, v in args.items() if k in accepted}
        log.warning("notice: optimizer_type = %s: bitsandbytes' 8-bit/paged optimizer states exist to save GPU memory "
                    "and need CUDA; this run trains on %s, so %s with fp32 states runs instead (the same algorithm%s; "
                    "nothing to change)", optimizer_type, device.type, stand_in,
                    f"; its own optimizer_args {', '.join(dropped)} have no meaning there" if dropped else "")
    try:
        _check_keys(spec, cls, args)
    except ValueError as e:
        raise ConfigError(f"optimizer_args: {e}") from None
    if spec.needs_cuda and device.type != "cuda":
        raise ConfigError(f"optimizer_type: {spec.name} (bitsandbytes) runs on CUDA only; the training device is "
                          f"{device.type} (use AdamW there)")
    if spec.name == "AdamW" and "fused" not in args and "foreach" not in args:
        args["fused" if device.type == "cuda" else "foreach"] = True
    lrs = {g.get("lr", lr) for g in params if isinstance(g, dict)} - {0}
    if spec.one_lr and len(lrs) > 1:
        raise ConfigError(f"optimizer_type: {spec.name} adapts one step size for all parameters and refuses "
                          f"different learning rates per group ({', '.join(f'{x:g}' for x in sorted(lrs))}, from "
                          "network_reg_lrs / loraplus_lr_ratio); remove those or use another optimizer")
    if _is_adafactor(cls) and args.get("relative_step", True):
        if len(lrs) > 1:
            raise ConfigError("optimizer_args: AdaFactor with relative_step=True computes one step size for all "
                              "parameters, so per-group learning rates (network_reg_lrs, loraplus_lr_ratio) would be "
                              "ignored; set relative_step=False")
        params = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in params]
    if ("dadapt" in spec.name.lower() or spec.name == "Prodigy") and lr <= 0.1:
        log.warning("learning rate %g is low for %s, which adapts the step size (d·lr): use about 1.0", lr,
                    spec.name)
    try:
        optimizer = _construct(spec, cls, params, lr, args)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer_args: {spec.name} rejects {_fmt_args(args)}: {e}") from None
    set_optimizer_train_mode(optimizer, True)
    return optimizer


def _check_keys(spec: OptimizerSpec, cls: type, args: dict[str, Any]) -> None:
    accepted = accepted_args(cls)
    for k in args:
        if k == "lr":
            raise ValueError("'lr' cannot be set here; use learning_rate")
        if k in spec.fixed:
            raise ValueError(f"{spec.name} always uses {k}={spec.fixed[k]}; remove {k!r} (or name the plain class, "
                             f"e.g. optimizer_type = \"{cls.__module__}.{cls.__name__}\")")
        if k not in accepted:
            raise ValueError(f"{spec.name} has no argument {k!r}{did_you_mean(k, accepted)} ({spec.name} accepts: "
                             f"{', '.join(accepted) or 'nothing'})")


def _fmt_args(args: dict[str, Any]) -> str:
    return "(" + ",".join(f"{k}={v}" for k, v in args.items()) + ")"


def optimizer_description(optimizer_type: str, args: dict[str, Any] | None = None) -> str:
    """kohya's ss_optimizer: `module.Class(k=v,...)` with the user's optimizer_args and the defaults we add
    (e.g. `torch.optim.adamw.AdamW(weight_decay=0.01)`, `torch.optim.sgd.SGD(momentum=0.9)`)."""
    try:
        spec, cls = resolve_optimizer(optimizer_type)
        path = f"{cls.__module__}.{cls.__name__}"
    except ValueError:
        spec = SPECS.get(optimizer_type.lower(), OptimizerSpec(optimizer_type, (optimizer_type,)))
        path = spec.paths[0]
    shown = {**{k: v for k, v in spec.defaults.items() if k not in (args or {})}, **(args or {})}
    return path + (_fmt_args(shown) if shown else "")


def effective_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The lr each group really steps with, keyed by the group's "name" (else `group<i>`): d·lr for D-Adaptation
    and Prodigy (kohya's `lr/d*lr`), the warm-up-scaled lr of schedule-free ones, Adafactor's relative step."""
    out: dict[str, float] = {}
    for i, g in enumerate(optimizer.param_groups):
        name = str(g.get("name", f"group{i}"))
        lr = g.get("scheduled_lr", g.get("lr"))
        if g.get("relative_step") and hasattr(optimizer, "_get_lr"):
            state = next((optimizer.state[p] for p in g["params"] if optimizer.state.get(p)), None)
            lr = optimizer._get_lr(g, state) if state and "step" in state else 0.0
        out[name] = float(lr or 0.0) * float(g.get("d", 1.0))
    return out


COMPONENT_LR_FIELDS = {"self_attn": "self_attn_lr", "cross_attn": "cross_attn_lr", "mlp": "mlp_lr", "mod": "mod_lr",
                       "llm_adapter": "llm_adapter_lr"}


def component_lrs(cfg: Any) -> dict[str, float | None]:
    """kohya v0.11's --self_attn_lr ... --llm_adapter_lr as {component: lr or None} for network.param_groups."""
    return {c: getattr(cfg, f) for c, f in COMPONENT_LR_FIELDS.items()}


def use_full_half(network: Any, dtype: torch.dtype, scaler: torch.amp.GradScaler | None = None) -> None:
    """full_bf16 / full_fp16 (kohya: `network.to(weight_dtype)`): the trained tensors in `dtype`, so gradients
    and the optimizer's state (built afterwards) are half precision too.  fp16 gradients are unscaled by the
    gradient scaler as kohya's patch_accelerator_for_fp16_training allows (torch refuses them otherwise).

    Refused (ConfigError) for LoKr with a full-matrix w2: ComfyUI applies it at scale 1 (alpha ignored), so the
    factors hold O(1/√n) values that lr-sized updates move by far less than half precision resolves
    (bf16: 2⁻⁸ relative) — the updates would round away and the factor would not train."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"full_bf16/full_fp16 need a half-precision dtype, got {dtype}")
    flag = "full_bf16" if dtype == torch.bfloat16 else "full_fp16"
    full = [m.name for m in network.lora_modules if getattr(m, "w2_decomposed", True) is False]
    if full:
        raise ConfigError(f"{flag}: LoKr with a full-matrix w2 ({len(full)} module(s), e.g. {full[0]}; full_matrix "
                          "or a network_dim >= half the factor size) trains at scale 1, where half-precision "
                          "factors round lr-sized updates away; remove " + flag + " (the adapter stays fp32) or "
                          "use a smaller network_dim")
    network.cast_trainable(dtype)
    if dtype == torch.float16 and scaler is not None and scaler.is_enabled():
        unscale = scaler._unscale_grads_

        def allow_fp16(optimizer: Any, inv_scale: torch.Tensor, found_inf: torch.Tensor, _allow: bool) -> Any:
            return unscale(optimizer, inv_scale, found_inf, True)

        scaler._unscale_grads_ = allow_fp16  # type: ignore[method-assign]
    if getattr(network, "algo", None) == "finetune":  # its optimizer state: train/optimizer_levers.py decides
        log.info("%s: the fine-tuned DiT weights and their gradients in %s", flag, str(dtype).removeprefix("torch."))
    else:
        log.info("%s: adapter weights, gradients and optimizer state in %s", flag, str(dtype).removeprefix("torch."))


def _literal(value: Any) -> Any:
    """'0.01' → 0.01, '(0.9,0.99)' → (0.9, 0.99), 'True' → True; kohya passes optimizer_args as strings."""
    if not isinstance(value, str):
        return value
    import ast

    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
