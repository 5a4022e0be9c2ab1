"""What LoRA, LoKr and LoHa share: the network — targets, injection, dropout, multiplier, norms, max-norm.

`AdapterNetwork` holds the adapter modules (networks/modules.py) of one DiT and, with `text_encoder=`, of the
Qwen3 text encoder (kohya's lora_anima: `lora_te_*` modules on Qwen3Attention / Qwen3MLP Linears), plus a
`NormModule` per DiT RMSNorm gain with `train_norm`; it patches them in at creation.  Its optimizer groups are
networks/param_groups.py, its files (names, save, strict load) networks/files.py; `create_network`
(networks/create.py) picks the algorithm module (lora.py, lokr.py, loha.py) that builds one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anima_trainer.models.layers import RMSNorm
from anima_trainer.networks import files
from anima_trainer.networks.files import SAVE_FORMATS
from anima_trainer.networks.factor_cast import FactorCaster, group_key
from anima_trainer.networks.formats import TE_NAME_PREFIX, NetworkError
from anima_trainer.networks.inject import (
    check_network_args,
    find_target_modules,
    find_targets,
    find_text_encoder_targets,
    first_match,
)
from anima_trainer.networks.modules import AdapterModule, PatchingModule, NormModule
from anima_trainer.networks.param_groups import COMPONENTS, anima_component, param_groups

__all__ = ["COMPONENTS", "SAVE_FORMATS", "AdapterModule", "AdapterNetwork", "PatchingModule", "NormModule",
           "anima_component", "find_norms"]

logger = logging.getLogger(__name__)


def _linear(model: nn.Module, path: str, what: str = "DiT") -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise NetworkError(f"module {path} is not a Linear of this {what} (a different model size or family?)")
    return module


def find_norms(dit: nn.Module) -> dict[str, nn.Module]:
    """{path: RMSNorm} of every norm gain of the DiT and its LLM adapter (the LayerNorms have no parameters)."""
    return {name: m for name, m in dit.named_modules() if isinstance(m, RMSNorm)}


class AdapterNetwork(nn.Module):
    """All adapter modules of one DiT and/or its Qwen3 text encoder (plus DiT norm gains with train_norm);
    created injected by `create_network`.  `lora_modules` holds the DiT modules first, then the text encoder's
    (so a DiT-only network's state_dict names do not change when a text encoder is added)."""

    def __init__(self, dit: nn.Module, module_cls: type[AdapterModule], dim: int, alpha: float,
                 dropout: float | None, network_args: dict[str, Any], algo: str = "lora",
                 module_kwargs: dict[str, Any] | None = None, extra_known: tuple[str, ...] = (),
                 module_specs: dict[str, tuple[int, float, dict[str, Any]]] | None = None,
                 text_encoder: nn.Module | None = None, train_dit: bool = True) -> None:
        """`module_specs` ({module name: (dim, alpha, module kwargs)}, from a file: networks/rebuild.py; text-
        encoder modules named `text_encoder.<path>`) fixes the targets and each module's dim/alpha/layout;
        without it targets come from network_args (DiT: unless `train_dit` is False; text encoder: when
        `text_encoder` is given)."""
        super().__init__()
        parsed = check_network_args(network_args, algo, extra_known)
        targets: dict[str, tuple[str, str, nn.Linear]] = {}  # name → (model, path, Linear)
        if module_specs is not None:
            for n in module_specs:
                if n.startswith(TE_NAME_PREFIX):
                    if text_encoder is None:
                        raise NetworkError(f"module {n} is a text-encoder module, but no text encoder was given")
                    path = n[len(TE_NAME_PREFIX):]
                    targets[n] = ("text_encoder", path, _linear(text_encoder, path, "text encoder (Qwen3)"))
                else:
                    targets[n] = ("dit", n, _linear(dit, n))
        else:
            if train_dit:
                if parsed["target_modules"] is not None:  # sd-scripts-anima's target list
                    dit_targets = find_target_modules(dit, parsed["target_modules"])
                else:
                    dit_targets = find_targets(dit, parsed["include_patterns"], parsed["exclude_patterns"],
                                               parsed["train_llm_adapter"])
                targets.update({p: ("dit", p, m) for p, m in dit_targets.items()})
            if text_encoder is not None:  # target_modules names DiT modules only: the TE gets kohya's targets
                te_targets = find_text_encoder_targets(text_encoder, parsed["include_patterns"],
                                                       parsed["exclude_patterns"])
                targets.update({TE_NAME_PREFIX + p: ("text_encoder", p, m) for p, m in te_targets.items()})
        if not targets:
            if not train_dit and text_encoder is None:
                raise NetworkError("nothing to train: train_dit is off (network_train_text_encoder_only) and no "
                                   "text encoder was given")
            where = "DiT" + (" or text-encoder" if text_encoder is not None else "")
            raise NetworkError(f"no {where} module matches the network targets; check "
                               "include_patterns/exclude_patterns/target_modules")
        self.algo, self.module_cls = algo, module_cls
        self.dim, self.alpha, self.dropout = dim, float(alpha), dropout
        self.train_norm = parsed["train_norm"]
        self.network_args = {k: (v if isinstance(v, str) else repr(v)) for k, v in network_args.items()}
        self._dit = (dit,)
        self._text_encoder = (text_encoder,)
        kw = module_kwargs or {}
        specs = {}  # network_reg_dims (full match on the path in its model): first match wins, 0 skips
        for n, (_, p, _) in targets.items():
            d = first_match(parsed["network_reg_dims"], p)
            specs[n] = module_specs[n] if module_specs is not None else (dim if d is None else d, alpha, {})
        targets = {n: t for n, t in targets.items() if specs[n][0] > 0}
        if not targets:
            raise NetworkError("no module left: network_reg_dims gives dim 0 to every target")
        widest = max(min(t[2].in_features, t[2].out_features) for t in targets.values())
        biggest = max(specs[n][0] for n in targets)
        if module_specs is None and algo in ("lora", "loha") and biggest > widest:  # LoKr: dims >= 100000 = full
            raise NetworkError(f"network_dim: dim {biggest} is larger than the rank of any target module (at most "
                               f"{widest} = min(in, out) of the widest), so it would only waste memory (a huge dim "
                               f"cannot even be allocated); use a dim <= {widest}")
        ordered = [n for n, t in targets.items() if t[0] == "dit"] + [n for n, t in targets.items()
                                                                       if t[0] == "text_encoder"]
        modules = []
        for n in ordered:
            model, p, m = targets[n]
            module = module_cls(p, m, specs[n][0], specs[n][1], dropout, **{**kw, **specs[n][2]})
            module.model = model
            modules.append(module)
        self.lora_modules = nn.ModuleList(modules)
        self.modules_by_name: dict[str, AdapterModule] = {m.name: m for m in self.lora_modules}
        for m in self.lora_modules:
            m.rank_dropout, m.module_dropout = parsed["rank_dropout"], parsed["module_dropout"]
            m.merged_forward = parsed["merged_forward"]
        self.loraplus_lr_ratio: float | None = parsed["loraplus_lr_ratio"]  # the DiT's
        self.loraplus_text_encoder_lr_ratio: float | None = parsed["loraplus_text_encoder_lr_ratio"]
        # network_reg_lrs: {module name: lr} for the modules a rule full-matches (on the path; first rule wins)
        self.reg_lrs: dict[str, float] = {}
        for n, m in self.modules_by_name.items():
            lr = first_match(parsed["network_reg_lrs"], m.path)
            if lr is not None:
                self.reg_lrs[n] = float(lr)
        norms = find_norms(dit) if self.train_norm and (train_dit or module_specs is not None) else {}
        if self.train_norm and not train_dit and module_specs is None:
            logger.warning("train_norm trains the DiT's norm gains; with train_dit off (network_train_text_encoder_"
                           "only) no DiT parameter trains, so train_norm changes nothing")
        self.norm_modules = nn.ModuleList(NormModule(p, m) for p, m in norms.items())
        self.norms_by_name: dict[str, NormModule] = {m.path: m for m in self.norm_modules}
        groups: dict[str, list[AdapterModule]] = {}
        for m in self.lora_modules:
            groups.setdefault(group_key(m), []).append(m)
        # q/k/v down factors stacked in one cast (a fused GEMM reads it whole) unless module_dropout may skip one
        # of them (its grad must then stay None, not a zero slice of the stack)
        self._caster = FactorCaster(groups, stack_qkv=not parsed["module_dropout"])
        self.injected = False
        self.inject()
        if parsed["verbose"]:
            self.log_targets()

    @property
    def dit(self) -> nn.Module:
        return self._dit[0]

    @property
    def text_encoder(self) -> nn.Module | None:
        """The Qwen3Model this network was created with (None: a DiT-only network)."""
        return self._text_encoder[0]

    def dit_modules(self) -> list[AdapterModule]:
        return [m for m in self.lora_modules if m.model == "dit"]

    def text_encoder_modules(self) -> list[AdapterModule]:
        return [m for m in self.lora_modules if m.model == "text_encoder"]

    @property
    def trains_text_encoder(self) -> bool:
        """Whether any module adapts the text encoder (then its outputs cannot be cached)."""
        return any(m.model == "text_encoder" for m in self.lora_modules)

    @property
    def trains_dit(self) -> bool:
        """Whether any module or norm gain adapts the DiT."""
        return bool(self.norm_modules) or any(m.model == "dit" for m in self.lora_modules)

    def target_table(self) -> list[tuple[str, str, int, float, str]]:
        """(module path, algorithm, dim, alpha, lr) per adapter module; lr is `base` or the network_reg_lrs value,
        `×r` marks a LoRA+ ratio on the module's up factors."""
        rows = []
        for n, m in self.modules_by_name.items():
            ratio = self.loraplus_text_encoder_lr_ratio if m.model == "text_encoder" else self.loraplus_lr_ratio
            plus = f" (up ×{ratio:g})" if ratio is not None else ""
            lr = f"{self.reg_lrs[n]:g}" if n in self.reg_lrs else ("text_encoder" if m.model == "text_encoder"
                                                                   else "base")
            rows.append((n, self.algo, m.dim, float(m.alpha), lr + plus))
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
        return any(m.model == "dit" and m.path.startswith("llm_adapter.") for m in self.lora_modules) or any(
            p.startswith("llm_adapter.") for p in self.norms_by_name)

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
        for model, name in ((self.dit, "dit"), (self.text_encoder, "text_encoder")):
            keys = [k for k, members in self._caster.groups.items() if members[0].model == name]
            if model is not None and keys:
                self._caster.hook(model, keys)
        self.injected = True

    def remove(self) -> None:
        """Restore the DiT's original forwards (the network keeps its weights; `inject()` patches again)."""
        for m in self._all():
            m.restore()
        self._caster.remove()
        self.injected = False

    def set_speed_levers(self, *, cast_factors_once: bool | None = None, fuse_qkv_down: bool | None = None) -> None:
        """Switch the step's speed levers (both on by default; same results, docs/performance.md): the LoRA
        factors cast once per forward pass (networks/factor_cast.py), the q/k/v down projections as one GEMM."""
        for m in self.lora_modules:
            if cast_factors_once is not None:
                m.cast_factors_once = bool(cast_factors_once)
                m.clear_cast()
            if fuse_qkv_down is not None:
                m.fuse_qkv_down = bool(fuse_qkv_down)

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

    def param_groups(self, lr: float, component_lrs: dict[str, float | None] | None = None,
                     text_encoder_lr: float | None = None) -> list[dict]:
        """Optimizer groups with kohya's learning-rate rules (networks/param_groups.py)."""
        return param_groups(self, lr, component_lrs, text_encoder_lr)

    # ----------------------------------------------------------------------------------------- files --
    def state_tensors(self, dtype: torch.dtype | None = None, save_format: str = "comfy") -> dict[str, torch.Tensor]:
        """The tensors `save` writes: weights in `dtype` (default fp32), alpha fp32; names ComfyUI-native
        (`diffusion_model.<path>`, text encoder `text_encoders.qwen3_06b.transformer.model.<path>`) or, with
        save_format="kohya", `lora_unet_<path with _>` / `lora_te_<path with _>`."""
        return files.state_tensors(self, dtype, save_format)

    def metadata(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return files.metadata(self, extra)

    def save(self, path: str | Path, *, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
             overwrite: bool = False, save_format: str = "comfy") -> Path:
        """Atomic, fsync'd write (fileio); refused (NonFiniteError, nothing written) when a weight is NaN/Inf as
        written, e.g. beyond fp16's range after the cast; checked against ComfyUI's key rules before the file
        takes `path`'s name.

        save_format: "comfy" (default: every key loads in ComfyUI) or "kohya" (`lora_unet_*` load in ComfyUI;
        text-encoder `lora_te_*` keys are kohya's names, which ComfyUI skips: formats.comfy_skipped_keys);
        "diffusers": diffusers' Anima loader's layout (LoRA only; ComfyUI does not read it)."""
        return files.save(self, path, metadata_extra=metadata, dtype=dtype, overwrite=overwrite,
                          save_format=save_format)

    def load_weights(self, path: str | Path, *, fresh_missing_side: bool = False) -> list[str]:
        """Load a file of this algorithm and layout, strictly: ComfyUI (`diffusion_model.*`,
        `text_encoders.qwen3_06b.transformer.model.*`), kohya (`lora_unet_*`, `lora_te_*`) or PEFT/diffusers
        names (converted first, networks/convert.py).  Text-encoder keys in a network without text-encoder
        modules (or the reverse) are a NetworkError saying what to change.

        `fresh_missing_side` (kohya's network_weights, a non-strict load): a file with no module at all for
        one side (a DiT-only file into a network that also trains the text encoder, or the reverse) loads the
        side it has and leaves the other side's modules as initialised.  Returns the names left fresh."""
        return files.load_weights(self, path, fresh_missing_side=fresh_missing_side)
