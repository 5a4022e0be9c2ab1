"""What LoRA, LoKr and LoHa share: injection, targets, dropout, multiplier, norms, save/load and the save check.

An algorithm is a subclass of `AdapterModule` (one per target Linear) that defines its factors (fp32
Parameters), the file suffix of each (`tensors()`), its `scale` (what ComfyUI applies for that file) and its
`delta_weight()`; the default branch is `dropout(x) @ ΔWᵀ`, LoRA overrides it to stay factored.
`AdapterNetwork` holds the modules of one DiT (and, with `train_norm`, a `NormModule` per RMSNorm gain),
hooks them in, and writes/reads files under ComfyUI's names (`diffusion_model.<path>.<suffix>`, `.alpha`
fp32 scalar, norms as `.w_norm` differences).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import anima_trainer
from anima_trainer.fileio import NonFiniteError, atomic_save, check_writable, nonfinite_tensors
from anima_trainer.networks.hashes import with_hashes  # issue 15 (metadata): kohya's sshs_* hashes
from anima_trainer.networks.convert import read_comfy_named
from anima_trainer.networks.formats import (
    COMFY_PREFIX,
    KOHYA_PREFIX,
    NetworkError,
    alpha_value,
    check_comfy_keys,
    check_network_file,
)
from anima_trainer.networks.inject import (
    ForwardHook,
    check_network_args,
    find_target_modules,
    find_targets,
    first_match,
)

logger = logging.getLogger(__name__)
SAVE_FORMATS = ("comfy", "kohya", "diffusers")


class HookedModule(nn.Module):
    """A module that takes over the forward of `self._org[0]` while injected (see inject.ForwardHook)."""

    def inject(self) -> None:
        self._hook = ForwardHook(self._org[0], self.forward)

    def restore(self) -> None:
        if self._hook is not None:
            self._hook.restore()
            self._hook = None


class AdapterModule(HookedModule):
    """The adapter branch for one Linear: y = W x + multiplier · scale · branch(x); hooked in by `inject()`."""

    NETWORK_MODULE: ClassVar[str] = ""
    SUFFIXES: ClassVar[tuple[str, ...]] = ()  # every suffix of this algorithm's files (all layouts)
    LOAD_ALIASES: ClassVar[dict[str, str]] = {}  # other spellings a file may use → our suffix
    PLUS_SUFFIXES: ClassVar[tuple[str, ...]] = ()  # the LoRA+ "up" factors (lr × loraplus_lr_ratio)

    def __init__(self, path: str, org: nn.Linear, dim: int, alpha: float, dropout: float | None) -> None:
        super().__init__()
        self.path = path
        self.in_features, self.out_features = org.in_features, org.out_features
        self.device = org.weight.device  # fp32 on the DiT's device (meta stays meta: shapes only)
        self.dim = dim
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32, device=self.device))
        self.scale = float(alpha) / dim
        self.dropout = dropout
        self.rank_dropout = 0.0  # network_args; set by AdapterNetwork (training only)
        self.module_dropout = 0.0
        self.multiplier = 1.0
        self._org = (org,)  # a tuple: not registered as a submodule, so no DiT weights in our state_dict
        self._hook: ForwardHook | None = None

    def new_param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, device=self.device, dtype=torch.float32))

    # --- what an algorithm defines ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, nn.Parameter]:
        """{file suffix: Parameter} of this module's layout, e.g. {".lokr_w1": w1, ".lokr_w2_a": ..., ...}."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """scale · ΔW in fp32: what a merge adds to W at multiplier 1 (ComfyUI's result for the saved file)."""
        raise NotImplementedError

    @property
    def alpha_matters(self) -> bool:
        """False when ComfyUI ignores the file's alpha for this layout (LoKr with both factors full)."""
        return True

    @property
    def rank(self) -> int:
        """The rank ComfyUI divides alpha by (used when a file has no alpha: ComfyUI then applies scale 1)."""
        return self.dim

    def delta_norm(self) -> torch.Tensor:
        """Frobenius norm of the weight max-norm regularisation bounds (scale_weight_norms): scale · ΔW.
        Subclasses compute it without materialising ΔW where the algebra allows."""
        return self.delta_weight().norm()

    def norm_factors(self) -> list[nn.Parameter]:
        """The tensors ΔW is a product of (one factor each): scaling each by r^(1/n) scales ΔW by r."""
        return list(self.tensors().values())

    # --- shared ----------------------------------------------------------------------------------------------
    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """scale · ΔW x (dropout on the branch input in training); ΔW materialised per forward.

        rank_dropout (training): kohya's LoKr rule, for LoKr and LoHa alike: each output row of ΔW is kept with
        probability 1 − p (one mask per forward) and the kept rows are scaled by 1/(1 − p)."""
        if self.dropout and self.training:
            x = F.dropout(x, p=self.dropout)
        dw = self.delta_weight()
        if self.rank_dropout and self.training:
            keep = torch.rand(dw.shape[0], 1, device=dw.device) >= self.rank_dropout
            dw = dw * keep.to(dw.dtype) / (1.0 - self.rank_dropout)
        return F.linear(x, dw.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to_output(self._hook.org_forward(x), x)

    def add_to_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` (the Linear's own output for `x`) plus this module's contribution; also used by the fused
        q/k/v GEMM (models/layers.py `hooked_linear`), which computes `out` for three Linears at once."""
        if self.multiplier == 0.0:
            return out
        # module_dropout (training): the whole branch is skipped for this forward with probability p
        if self.module_dropout and self.training and float(torch.rand(())) < self.module_dropout:
            return out
        return out + self.branch(x) * self.multiplier

    def check_file(self, slot: dict[str, tuple[str, torch.Tensor]], path: Path, net_alpha: float) -> None:
        """Raise NetworkError when the file's tensors for this module do not fit it (layout, shapes, alpha)."""
        ours = self.tensors()
        extra = sorted(set(slot) - set(ours) - {".alpha"})
        if extra:
            raise NetworkError(f"{path}: module {self.path}: file has {extra}, this network stores {sorted(ours)} "
                               "(a different layout: check dim, factor, full_matrix, decompose_both, dora_wd)")
        for suffix, p in ours.items():
            t = slot[suffix][1]
            if tuple(t.shape) != tuple(p.shape):
                raise NetworkError(f"{path}: module {self.path}: {suffix[1:]} has shape {tuple(t.shape)} in the "
                                   f"file, {tuple(p.shape)} in this network (check dim and factor)")
        if not self.alpha_matters:
            return
        # ComfyUI: no alpha means scale 1, i.e. the same as alpha = rank
        file_alpha = (alpha_value(slot[".alpha"][1], f"{path}: {slot['.alpha'][0]}") if ".alpha" in slot
                      else float(self.rank))
        if file_alpha != float(torch.tensor(net_alpha, dtype=torch.float32)):
            raise NetworkError(f"{path}: module {self.path}: file has alpha {file_alpha:g}, network has alpha "
                               f"{net_alpha:g}; create the network with alpha={file_alpha:g}")

    @torch.no_grad()
    def load_file(self, slot: dict[str, tuple[str, torch.Tensor]]) -> None:
        for suffix, p in self.tensors().items():
            p.copy_(slot[suffix][1].to(torch.float32))


class NormModule(HookedModule):
    """A trainable RMSNorm gain (train_norm): an fp32 master `weight` used by the norm's forward while injected.

    The DiT's own tensor is not changed (remove() gives the exact original back); at multiplier m the gain is
    base + m·(weight − base), as ComfyUI applies a `.w_norm` difference at strength m.
    """

    def __init__(self, path: str, org: nn.Module) -> None:
        super().__init__()
        self.path = path
        base = org.weight.detach().to(torch.float32).clone()
        self.weight = nn.Parameter(base.clone())
        self.register_buffer("base", base)
        self.eps = org.eps
        self.multiplier = 1.0
        self._org = (org,)
        self._hook: ForwardHook | None = None

    def gain(self) -> torch.Tensor:
        if self.multiplier == 1.0:
            return self.weight
        return self.base + self.multiplier * (self.weight - self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the DiT RMSNorm's math with our gain
        g = self.gain()
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), g, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * g.to(x.dtype)


def _linear(dit: nn.Module, path: str) -> nn.Linear:
    try:
        module = dit.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise NetworkError(f"module {path} is not a Linear of this DiT (a different model size or family?)")
    return module


COMPONENTS = ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter")


def anima_component(path: str) -> str:
    """kohya's get_anima_param_groups rule for a DiT path: anything under `llm_adapter` first, then
    `.self_attn`, `.cross_attn`, `.mlp`, `.adaln_modulation` (→ "mod") as substrings, else "base"."""
    if "llm_adapter" in path:
        return "llm_adapter"
    for key, name in ((".self_attn", "self_attn"), (".cross_attn", "cross_attn"), (".mlp", "mlp"),
                      (".adaln_modulation", "mod")):
        if key in path:
            return name
    return "base"


def find_norms(dit: nn.Module) -> dict[str, nn.Module]:
    """{path: RMSNorm} of every norm gain of the DiT and its LLM adapter (the LayerNorms have no parameters)."""
    from anima_trainer.models.layers import RMSNorm

    return {name: m for name, m in dit.named_modules() if isinstance(m, RMSNorm)}


class AdapterNetwork(nn.Module):
    """All adapter modules of one DiT (plus norm gains with train_norm); created injected by `create_network`."""

    def __init__(self, dit: nn.Module, module_cls: type[AdapterModule], dim: int, alpha: float,
                 dropout: float | None, network_args: dict[str, Any], algo: str = "lora",
                 module_kwargs: dict[str, Any] | None = None, extra_known: tuple[str, ...] = (),
                 module_specs: dict[str, tuple[int, float, dict[str, Any]]] | None = None) -> None:
        """`module_specs` ({path: (dim, alpha, module kwargs)}, from a file: networks/rebuild.py) fixes the
        targets and each module's dim/alpha/layout; without it targets come from network_args."""
        super().__init__()
        parsed = check_network_args(network_args, algo, extra_known)
        if module_specs is not None:
            targets = {p: _linear(dit, p) for p in module_specs}
        elif parsed["target_modules"] is not None:  # sd-scripts-anima's target list
            targets = find_target_modules(dit, parsed["target_modules"])
        else:
            targets = find_targets(dit, parsed["include_patterns"], parsed["exclude_patterns"],
                                   parsed["train_llm_adapter"])
        if not targets:
            raise NetworkError("no DiT module matches the network targets; check include_patterns/exclude_patterns")
        self.algo, self.module_cls = algo, module_cls
        self.dim, self.alpha, self.dropout = dim, float(alpha), dropout
        self.train_norm = parsed["train_norm"]
        self.network_args = {k: (v if isinstance(v, str) else repr(v)) for k, v in network_args.items()}
        self._dit = (dit,)
        kw = module_kwargs or {}
        specs = {}  # network_reg_dims: first full match wins, 0 skips the module; alpha stays global
        for p in targets:
            d = first_match(parsed["network_reg_dims"], p)
            specs[p] = module_specs[p] if module_specs is not None else (dim if d is None else d, alpha, {})
        targets = {p: m for p, m in targets.items() if specs[p][0] > 0}
        if not targets:
            raise NetworkError("no DiT module left: network_reg_dims gives dim 0 to every target")
        widest = max(min(m.in_features, m.out_features) for m in targets.values())
        biggest = max(specs[p][0] for p in targets)
        if module_specs is None and algo in ("lora", "loha") and biggest > widest:  # LoKr: dims >= 100000 = full
            raise NetworkError(f"network_dim: dim {biggest} is larger than the rank of any target module (at most "
                               f"{widest} = min(in, out) of the widest), so it would only waste memory (a huge dim "
                               f"cannot even be allocated); use a dim <= {widest}")
        self.lora_modules = nn.ModuleList(module_cls(p, m, specs[p][0], specs[p][1], dropout, **{**kw, **specs[p][2]})
                                          for p, m in targets.items())
        self.modules_by_name: dict[str, AdapterModule] = {m.path: m for m in self.lora_modules}
        for m in self.lora_modules:
            m.rank_dropout, m.module_dropout = parsed["rank_dropout"], parsed["module_dropout"]
        self.loraplus_lr_ratio: float | None = parsed["loraplus_lr_ratio"]
        # network_reg_lrs: {module path: lr} for the modules a rule full-matches (first rule wins)
        self.reg_lrs: dict[str, float] = {}
        for p in self.modules_by_name:
            lr = first_match(parsed["network_reg_lrs"], p)
            if lr is not None:
                self.reg_lrs[p] = float(lr)
        self.norm_modules = nn.ModuleList(NormModule(p, m) for p, m in (find_norms(dit) if self.train_norm
                                                                        else {}).items())
        self.norms_by_name: dict[str, NormModule] = {m.path: m for m in self.norm_modules}
        self.injected = False
        self.inject()
        if parsed["verbose"]:
            self.log_targets()

    def target_table(self) -> list[tuple[str, str, int, float, str]]:
        """(module path, algorithm, dim, alpha, lr) per adapter module; lr is `base` or the network_reg_lrs value,
        `×r` marks a LoRA+ ratio on the module's up factors."""
        rows = []
        plus = f" (up ×{self.loraplus_lr_ratio:g})" if self.loraplus_lr_ratio is not None else ""
        for p, m in self.modules_by_name.items():
            lr = f"{self.reg_lrs[p]:g}" if p in self.reg_lrs else "base"
            rows.append((p, self.algo, m.dim, float(m.alpha), lr + plus))
        return rows

    def log_targets(self) -> None:
        rows = self.target_table()
        width = max(len(r[0]) for r in rows)
        lines = [f"{'module':<{width}}  algo  {'dim':>5}  {'alpha':>8}  lr"]
        lines += [f"{p:<{width}}  {a:<4}  {d:>5}  {al:>8g}  {lr}" for p, a, d, al, lr in rows]
        lines += [f"norm gain {p} (train_norm)  lr base" for p in self.norms_by_name]
        logger.info("%s network: %d module(s)\n%s", self.algo, len(rows), "\n".join(lines))

    @property
    def trains_llm_adapter(self) -> bool:
        """Whether anything inside `llm_adapter` is trained (then its output cannot be cached)."""
        return any(p.startswith("llm_adapter.") for p in [*self.modules_by_name, *self.norms_by_name])

    # ------------------------------------------------------------------------------------ lifecycle --
    def _all(self) -> list[nn.Module]:
        return [*self.lora_modules, *self.norm_modules]

    def inject(self) -> None:
        if self.injected:
            return
        done = []
        try:
            for m in self._all():
                m.inject()
                done.append(m)
        except NetworkError:
            for m in done:
                m.restore()
            raise
        self.injected = True

    def remove(self) -> None:
        """Restore the DiT's original forwards (the network keeps its weights; `inject()` re-hooks)."""
        for m in self._all():
            m.restore()
        self.injected = False

    def set_multiplier(self, m: float) -> None:
        for module in self._all():
            module.multiplier = float(m)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float) -> tuple[int, float, float]:
        """kohya's scale_weight_norms, after each optimizer step: per module the norm of scale · ΔW (LoRA:
        alpha/dim · up @ down) is clamped to `max_norm` by scaling its factors (LoRA: up and down by √ratio, as
        kohya; LoKr/LoHa: each factor by ratio^(1/n), as LyCORIS).  Norm gains are not touched.

        Returns kohya's (keys_scaled, mean norm, max norm) of the norms after scaling; one host read."""
        mods = list(self.lora_modules)
        norms = torch.stack([m.delta_norm().float() for m in mods])
        clamped = norms.clamp(min=max_norm / 2)  # kohya: avoids 0/0; below max/2 the ratio is 1 anyway
        ratio = clamped.clamp(max=max_norm) / clamped
        for m, r in zip(mods, ratio, strict=True):
            factors = m.norm_factors()
            step = r ** (1.0 / len(factors))
            for t in factors:
                t.mul_(step.to(t.dtype))
        after = norms * ratio
        keys, mean, top = torch.stack([(ratio != 1).sum().float(), after.mean(), after.max()]).tolist()
        return int(keys), mean, top

    def max_norm_notice(self) -> str | None:
        """What scale_weight_norms means for this algorithm when it differs from kohya's own module (a notice)."""
        if self.algo == "lora":
            return None
        return (f"scale_weight_norms with {self.algo}: kohya's networks.{self.algo} has no max-norm and trains "
                "without it (with a warning); here it is applied as LyCORIS (lycoris.kohya) does: each factor "
                "scaled so that ‖scale·ΔW‖ <= scale_weight_norms; remove scale_weight_norms for kohya's result")

    def cast_trainable(self, dtype: torch.dtype) -> None:
        """full_bf16 / full_fp16 (kohya): the trained tensors themselves in half precision, so the optimizer's
        state follows; the DiT, alphas and norm bases are left as they are."""
        for p in self.trainable_parameters():
            p.data = p.data.to(dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*(p for m in self.lora_modules for p in m.tensors().values()),
                *(m.weight for m in self.norm_modules)]

    def param_groups(self, lr: float, component_lrs: dict[str, float | None] | None = None) -> list[dict]:
        """Optimizer groups: one per lr (the base `lr`, then each distinct network_reg_lrs value in module
        order), each split in two with loraplus_lr_ratio (the algorithm's PLUS_SUFFIXES at lr × ratio).
        A group whose lr is 0 is dropped (kohya): those factors stay fixed.

        component_lrs ({"self_attn"|"cross_attn"|"mlp"|"mod"|"llm_adapter": lr or None}, kohya v0.11's
        --self_attn_lr ...): a module (or norm gain) of that component (`anima_component`) trains in a group
        named after it at that lr; None = the base lr; 0 = frozen (requires_grad off, as kohya's
        get_anima_param_groups).  A network_reg_lrs rule matching the module wins over its component's lr.
        Every group has a `name`: `base`, `reg_lr=<lr>` or the component, with `/plus` for the LoRA+ half."""
        comp = {k: v for k, v in (component_lrs or {}).items() if v is not None}
        unknown = sorted(set(comp) - set(COMPONENTS))
        if unknown:
            raise NetworkError(f"component learning rates: unknown component(s) {unknown}; known: {COMPONENTS}")
        buckets: dict[str, tuple[float, list[nn.Parameter], list[nn.Parameter]]] = {"base": (float(lr), [], [])}
        ratio = self.loraplus_lr_ratio
        counts: dict[str, int] = dict.fromkeys(comp, 0)
        frozen: list[nn.Parameter] = []

        def group_of(path: str) -> tuple[str, float]:
            if path in self.reg_lrs:
                return f"reg_lr={self.reg_lrs[path]:g}", self.reg_lrs[path]
            c = anima_component(path)
            if c in comp:
                counts[c] += 1
                return c, float(comp[c])
            return "base", float(lr)

        for p, m in self.modules_by_name.items():
            name, group_lr = group_of(p)
            if name in comp and group_lr == 0:
                frozen.extend(m.tensors().values())
                continue
            _, plain, plus = buckets.setdefault(name, (group_lr, [], []))
            for suffix, t in m.tensors().items():
                (plus if ratio is not None and suffix in m.PLUS_SUFFIXES else plain).append(t)
        for p, m in self.norms_by_name.items():
            c = anima_component(p)
            name, group_lr = (c, float(comp[c])) if c in comp else ("base", float(lr))
            if name in comp:
                counts[c] += 1
                if group_lr == 0:
                    frozen.append(m.weight)
                    continue
            buckets.setdefault(name, (group_lr, [], []))[1].append(m.weight)
        for t in frozen:
            t.requires_grad_(False)
        if comp:
            logger.info("component learning rates (kohya's --*_lr): %s", ", ".join(
                f"{c} {'frozen' if v == 0 else f'{v:g}'} ({counts[c]} module(s))" for c, v in comp.items()))
            for c in (c for c, n in counts.items() if n == 0):
                hint = {"llm_adapter": " (set network_args train_llm_adapter=true to train it)",
                        "mod": " (the AdaLN modulation Linears are excluded by default; include_patterns "
                               "['.*adaln_modulation.*'] trains them)"}.get(c, "")
                logger.warning("%s_lr = %g: no trained module belongs to %s, so it changes nothing%s", c, comp[c],
                               c, hint)
        groups = []
        for name, (group_lr, plain, plus) in buckets.items():
            if plain:
                groups.append({"params": plain, "lr": group_lr, "name": name})
            if plus:
                groups.append({"params": plus, "lr": group_lr * ratio, "name": name + "/plus"})
        groups = [g for g in groups if g["lr"] > 0]
        if not groups:
            raise NetworkError("every parameter group has lr 0 (learning rate / network_reg_lrs / component "
                               "lrs): nothing to train")
        return groups

    # ----------------------------------------------------------------------------------------- files --
    def state_tensors(self, dtype: torch.dtype | None = None, save_format: str = "comfy") -> dict[str, torch.Tensor]:
        """The tensors `save` writes: weights in `dtype` (default fp32), alpha fp32; names ComfyUI-native
        (`diffusion_model.<path>`) or, with save_format="kohya", `lora_unet_<path with _>`."""
        if save_format not in SAVE_FORMATS:
            raise NetworkError(f"save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
        if save_format == "diffusers":  # diffusers' layout (scale folded into lora_B): networks/diffusers_format.py
            from anima_trainer.networks.diffusers_format import diffusers_tensors
            return diffusers_tensors(self, dtype)[0]
        dtype = dtype or torch.float32

        def name(path: str) -> str:
            return COMFY_PREFIX + path if save_format == "comfy" else KOHYA_PREFIX + path.replace(".", "_")

        out = {}
        for m in self.lora_modules:
            key = name(m.path)
            for suffix, p in m.tensors().items():
                out[key + suffix] = p.detach().to("cpu", dtype).contiguous()
            out[key + ".alpha"] = m.alpha.detach().to("cpu", torch.float32).clone()
        for m in self.norm_modules:
            out[name(m.path) + ".w_norm"] = (m.weight.detach() - m.base).to("cpu", dtype).contiguous()
        return out

    def metadata(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        meta = {}
        for k, v in (extra or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise NetworkError(f"metadata {k!r}: keys and values must be str (got {type(v).__name__}); "
                                   "stringify numbers, json.dumps structures")
            meta[k] = v
        # dim/alpha describe this file and always win; module name and args may come from the caller
        meta.setdefault("ss_network_module", self.module_cls.NETWORK_MODULE)
        if self.network_args:
            meta.setdefault("ss_network_args", json.dumps(self.network_args, sort_keys=True))
        # kohya's resize_lora convention: "Dynamic" when the modules' ranks (alphas) differ
        dims = {m.dim for m in self.lora_modules}
        alphas = {float(m.alpha) for m in self.lora_modules}
        meta.update({"ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
                     "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
                     "anima_trainer_version": anima_trainer.__version__})
        return meta

    def save(self, path: str | Path, *, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
             overwrite: bool = False, save_format: str = "comfy") -> Path:
        """Atomic, fsync'd write (fileio); refused (NonFiniteError, nothing written) when a weight is NaN/Inf as
        written, e.g. beyond fp16's range after the cast; checked against ComfyUI's key rules before the file
        takes `path`'s name.

        save_format: "comfy" (`diffusion_model.*`, default) or "kohya" (`lora_unet_*`); both load in ComfyUI;
        "diffusers": diffusers' Anima loader's layout (LoRA only; ComfyUI does not read it)."""
        if save_format == "diffusers":  # its own layout and key check: networks/diffusers_format.py
            from anima_trainer.networks.diffusers_format import save_diffusers
            return save_diffusers(self, path, metadata=metadata, dtype=dtype, overwrite=overwrite)
        path = Path(path)
        if path.suffix != ".safetensors":
            raise NetworkError(f"{path}: network files are .safetensors")
        check_writable(path, overwrite)

        def check(tmp: Path) -> None:
            check_comfy_keys(tmp, self._dit[0])
            check_writable(path, overwrite)  # a file that appeared meanwhile is still not replaced unasked

        tensors = self.state_tensors(dtype, save_format)
        try:
            return atomic_save(tensors, path, with_hashes(tensors, self.metadata(metadata)), what="network file ",
                               check=check)
        except NonFiniteError as e:
            if dtype not in (None, torch.float32) and not nonfinite_tensors(self.state_tensors(None, save_format)):
                name = str(dtype).removeprefix("torch.")
                raise NonFiniteError(f"{e} (finite in fp32, beyond {name}'s range: set save_precision to "
                                     "fp32 or bf16)") from None
            raise

    def load_weights(self, path: str | Path) -> None:
        """Load a file of this algorithm and layout, strictly: ComfyUI (`diffusion_model.*`), kohya
        (`lora_unet_*`) or PEFT/diffusers names (converted first, networks/convert.py)."""
        path = Path(path)
        check_network_file(path)
        sd = read_comfy_named(path, self._dit[0])
        names = {COMFY_PREFIX + p: p for p in [*self.modules_by_name, *self.norms_by_name]}
        suffixes: dict[str, str] = {".alpha": ".alpha"}
        suffixes.update({s: s for s in self.module_cls.SUFFIXES})
        suffixes.update(self.module_cls.LOAD_ALIASES)
        norm_suffixes = {".w_norm": ".w_norm"}
        found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        unknown = []
        for key, tensor in sd.items():
            hit = None
            for s, canonical in sorted([*suffixes.items(), *norm_suffixes.items()], key=lambda t: -len(t[0])):
                prefix = key[: -len(s)]
                if key.endswith(s) and prefix in names:
                    is_norm = names[prefix] in self.norms_by_name
                    if is_norm == (s in norm_suffixes):
                        hit = (prefix, canonical)
                    break
            if hit is None:
                unknown.append(key)
                continue
            slot = found.setdefault(names[hit[0]], {})
            if hit[1] in slot:
                raise NetworkError(f"{path}: module {names[hit[0]]} appears twice ({slot[hit[1]][0]} and {key})")
            slot[hit[1]] = (key, tensor)
        if unknown:
            raise NetworkError(f"{path}: {len(unknown)} key(s) are not {self.algo} weights of this network's modules "
                               f"(different targets, algorithm or train_norm?): {sorted(unknown)[:8]}")
        missing = [p for p, m in self.modules_by_name.items()
                   if not set(m.SUFFIXES) & set(found.get(p, {}))]
        if missing:
            words = "/".join(s.lstrip(".") for s in self.lora_modules[0].tensors())  # this layout's names
            raise NetworkError(f"{path}: no {words} weights for {len(missing)} module(s) of this network: "
                               f"{missing[:8]}")
        missing = [p for p in self.norms_by_name if ".w_norm" not in found.get(p, {})]
        if missing:
            raise NetworkError(f"{path}: train_norm is on but the file has no .w_norm for {len(missing)} norm(s): "
                               f"{missing[:8]} (train without train_norm to load a file without norms)")
        for p, m in self.modules_by_name.items():
            m.check_file(found[p], path, float(m.alpha))
        for p, m in self.norms_by_name.items():
            w = found[p][".w_norm"][1]
            if tuple(w.shape) != tuple(m.weight.shape):
                raise NetworkError(f"{path}: norm {p}: w_norm has shape {tuple(w.shape)}, the gain "
                                   f"{tuple(m.weight.shape)}")
        with torch.no_grad():
            for p, m in self.modules_by_name.items():
                m.load_file(found[p])
            for p, m in self.norms_by_name.items():
                m.weight.copy_(m.base + found[p][".w_norm"][1].to(device=m.base.device, dtype=torch.float32))


def create_network(dit: nn.Module, algo: str = "lora", dim: int = 4, alpha: float | None = 1.0,
                   dropout: float | None = None, **network_args: Any) -> AdapterNetwork:
    """Build a network for `dit` and inject it (the DiT's forwards now include the adapter branch).

    algo: "lora" | "lokr" | "loha"; network_args: include_patterns, exclude_patterns, train_llm_adapter,
    train_norm, rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, network_reg_dims,
    network_reg_lrs, verbose (all; kohya semantics, docs/training.md), factor, full_matrix, decompose_both (lokr).
    """
    from anima_trainer.networks import loha, lokr, lora

    builders = {"lora": lora.build, "lokr": lokr.build, "loha": loha.build}
    if algo not in builders:
        raise NetworkError(f"algo={algo!r} is not supported; use one of {sorted(builders)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise NetworkError(f"network dim must be a positive integer, got {dim!r}")
    if alpha is None or alpha == 0:  # kohya: no alpha means alpha = dim (scale 1)
        alpha = float(dim)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise NetworkError(f"network alpha must be a finite number >= 0, got {alpha!r}")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise NetworkError(f"network_dropout must be in [0, 1), got {dropout!r}")
    return builders[algo](dit, dim, float(alpha), float(dropout) if dropout else None, dict(network_args))
