"""The modules a network patches in: one `AdapterModule` per adapted Linear, one `NormModule` per trained gain.

An algorithm is a subclass of `AdapterModule` (one per target Linear) that defines its factors (fp32
Parameters), the file suffix of each (`tensors()`), its `scale` (what ComfyUI applies for that file) and its
`delta_weight()`; the default branch is `dropout(x) @ ΔWᵀ`, LoRA overrides it to stay factored.  A module
adapts a Linear of the DiT (`model == "dit"`) or of the Qwen3 text encoder (`model == "text_encoder"`); its
`path` is the Linear's dotted path inside that model, its `name` the network-level unique name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from anima_trainer.models.fp8 import Fp8Linear
from anima_trainer.models.layers import rms_norm
from anima_trainer.networks.formats import TE_NAME_PREFIX, NetworkError, alpha_value
from anima_trainer.networks.inject import ForwardPatch

MODELS = ("dit", "text_encoder")


class PatchingModule(nn.Module):
    """A module that takes over the forward of `self._org[0]` while injected (see inject.ForwardPatch)."""

    def inject(self) -> None:
        self._patch = ForwardPatch(self._org[0], self.forward)

    def restore(self) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None


class AdapterModule(PatchingModule):
    """The adapter branch for one Linear: y = W x + multiplier · scale · branch(x); patched in by `inject()`."""

    NETWORK_MODULE: ClassVar[str] = ""
    SUFFIXES: ClassVar[tuple[str, ...]] = ()  # every suffix of this algorithm's files (all layouts)
    LOAD_ALIASES: ClassVar[dict[str, str]] = {}  # other spellings a file may use → our suffix
    PLUS_SUFFIXES: ClassVar[tuple[str, ...]] = ()  # the LoRA+ "up" factors (lr × loraplus_lr_ratio)
    # which model the adapted Linear belongs to: "dit" or "text_encoder" (set by AdapterNetwork)
    model: str = "dit"

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
        self._patch: ForwardPatch | None = None
        # speed levers (docs/performance.md "Levers of the training step"), switched by AdapterNetwork
        self.cast_factors_once = True
        self.fuse_qkv_down = True
        self.merged_forward = False  # network_args merged_forward (LoKr/LoHa: on unless set false)
        self.clear_cast()

    @property
    def name(self) -> str:
        """The module's unique name in its network: the DiT path, or `text_encoder.<Qwen3 path>`."""
        return TE_NAME_PREFIX + self.path if self.model == "text_encoder" else self.path

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

    def cast_factors(self) -> list[nn.Parameter]:
        """The fp32 factors the branch casts to the input's dtype (networks/factor_cast.py casts them once per
        forward pass instead); none by default (LoKr/LoHa cast the materialised ΔW)."""
        return []

    def stackable_down(self) -> nn.Parameter | None:
        """The [r, in] down factor (first of `cast_factors`) a fused q/k/v GEMM may stack with its neighbours'."""
        return None

    # --- once-per-forward casts (networks/factor_cast.py) ----------------------------------------------------
    def clear_cast(self) -> None:
        self._casts: tuple[torch.Tensor, ...] | None = None
        self._cast_versions: tuple[int, ...] = ()
        self._stacked_down: tuple[torch.Tensor, tuple[AdapterModule, ...]] | None = None

    def set_cast(self, casts: tuple[torch.Tensor, ...]) -> None:
        self._casts = casts
        self._cast_versions = tuple(p._version for p in self.cast_factors())

    def set_stacked_down(self, stacked: torch.Tensor, owners: tuple[AdapterModule, ...]) -> None:
        self._stacked_down = (stacked, owners)

    def cast_valid(self, index: int, param: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the pre-hook's cast of factor `index` is this dtype and still the parameter's value (eager:
        its `_version`; compiled: trusted, the pre-hook ran before the model)."""
        casts = self._casts
        return casts is not None and casts[index].dtype == dtype and (
            torch.compiler.is_compiling() or param._version == self._cast_versions[index])

    def factor(self, index: int, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Factor `index` (= `param`) in `dtype`: the once-per-forward cast when valid, else cast here."""
        if self.cast_valid(index, param, dtype):
            return self._casts[index]
        return param.to(dtype)

    # --- shared ----------------------------------------------------------------------------------------------
    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """scale · ΔW x (dropout on the branch input in training); ΔW materialised per forward."""
        if self.dropout and self.training:
            x = F.dropout(x, p=self.dropout)
        return F.linear(x, self.branch_weight().to(x.dtype))

    def branch_weight(self) -> torch.Tensor:
        """scale · ΔW in fp32 as this forward applies it.

        rank_dropout (training): kohya's LoKr rule, for LoKr and LoHa alike: each output row of ΔW is kept with
        probability 1 − p (one mask per forward) and the kept rows are scaled by 1/(1 − p)."""
        dw = self.delta_weight()
        if self.rank_dropout and self.training:
            keep = torch.rand(dw.shape[0], 1, device=dw.device) >= self.rank_dropout
            dw = dw * keep.to(dw.dtype) / (1.0 - self.rank_dropout)
        return dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.can_merge():
            org = self._org[0]
            bias = None if org.bias is None else org.bias.to(x.dtype)
            return F.linear(x, self.merged_weight(self.base_weight(), x.dtype), bias)
        return self.add_to_output(self._patch.org_forward(x), x)

    # --- merged forward (network_args merged_forward; docs/performance.md) -----------------------------------
    def can_merge(self) -> bool:
        """One GEMM with W + multiplier·ΔW instead of W x + multiplier·ΔW x: asked for, a frozen plain (or
        fp8-stored) Linear, a non-zero multiplier and no dropout on the branch input (which the base must not see).
        An fp8-compute Linear (models/fp8_compute.py) keeps its fp8 GEMM and adds the branch: merging would run
        the bf16 GEMM instead and silently drop the lever its user asked for."""
        if not self.merged_forward or self.multiplier == 0.0 or (self.dropout and self.training):
            return False
        org = self._org[0]
        return not org.weight.requires_grad and type(org).forward in (nn.Linear.forward, Fp8Linear.forward)

    def base_weight(self) -> torch.Tensor:
        """W of the adapted Linear (an fp8 one dequantized to fp32), without grad."""
        org = self._org[0]
        dequantize = getattr(org, "dequantized_weight", None)
        return (dequantize(torch.float32) if dequantize is not None else org.weight).detach()

    def merged_weight(self, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W + multiplier·scale·ΔW added in fp32, rounded once to `dtype`; the module_dropout and rank_dropout
        draws happen in the order `add_to_output` makes them (the same masks for the same seed)."""
        if self.module_dropout and self.training and float(torch.rand(())) < self.module_dropout:
            return base.to(dtype)
        return (base.float() + self.branch_weight() * self.multiplier).to(dtype)

    @staticmethod
    def merged_weights_fused(owners: tuple[AdapterModule, ...], packed: torch.Tensor) -> torch.Tensor | None:
        """The fused q/k/v GEMM's weight with each module's ΔW merged (rows of q, k, v), or None when one of
        them does not merge (then the packed base GEMM runs and each branch is added)."""
        if not all(o.can_merge() for o in owners):
            return None
        rows = packed.split([o.out_features for o in owners])
        return torch.cat([o.merged_weight(w, packed.dtype) for o, w in zip(owners, rows, strict=True)])

    def add_to_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` (the Linear's own output for `x`) plus this module's contribution; also used by the fused
        q/k/v GEMM (models/layers.py `patched_linear`), which computes `out` for three Linears at once."""
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
            raise NetworkError(f"{path}: module {self.name}: file has {extra}, this network stores {sorted(ours)} "
                               "(a different layout: check dim, factor, full_matrix, decompose_both, dora_wd)")
        for suffix, p in ours.items():
            t = slot[suffix][1]
            if tuple(t.shape) != tuple(p.shape):
                raise NetworkError(f"{path}: module {self.name}: {suffix[1:]} has shape {tuple(t.shape)} in the "
                                   f"file, {tuple(p.shape)} in this network (check dim and factor)")
        if not self.alpha_matters:
            return
        # ComfyUI: no alpha means scale 1, i.e. the same as alpha = rank
        file_alpha = (alpha_value(slot[".alpha"][1], f"{path}: {slot['.alpha'][0]}") if ".alpha" in slot
                      else float(self.rank))
        if file_alpha != float(torch.tensor(net_alpha, dtype=torch.float32)):
            raise NetworkError(f"{path}: module {self.name}: file has alpha {file_alpha:g}, network has alpha "
                               f"{net_alpha:g}; create the network with alpha={file_alpha:g}")

    @torch.no_grad()
    def load_file(self, slot: dict[str, tuple[str, torch.Tensor]]) -> None:
        for suffix, p in self.tensors().items():
            p.copy_(slot[suffix][1].to(torch.float32))


class NormModule(PatchingModule):
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
        self._patch: ForwardPatch | None = None

    def gain(self) -> torch.Tensor:
        if self.multiplier == 1.0:
            return self.weight
        return self.base + self.multiplier * (self.weight - self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the DiT RMSNorm's math with our gain
        return rms_norm(x, self.gain(), self.eps)
