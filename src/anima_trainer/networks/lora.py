"""LoRA for the Anima DiT: y = W x + multiplier · (alpha/dim) · up(dropout(down(x))).

Parameters are always fp32; the branch runs in the input's dtype (weights cast in forward), so a bf16 DiT,
autocast and non-reentrant checkpointing all work.  `down` is Kaiming-uniform (a=√5), `up` zero, so the
network starts as the identity.  Files use ComfyUI's native names (`diffusion_model.<path>.lora_down.weight`
[r, in], `.lora_up.weight` [out, r], `.alpha` fp32 scalar); kohya's `lora_unet_<path_>` files load too.
Injection, targets, norms (train_norm), save/load: `networks/base.py`.

DoRA (`dora_wd=true`): input-axis weight decomposition, the only form ComfyUI reproduces
(docs/comfyui_formats.md §3): W' = Wc · m / ‖Wc[:, j]‖ with Wc = W + (alpha/dim)·up@down and a trained
magnitude `dora_scale` [1, in] (fp32, initialised to the column norms of W, so W' = W at start).  The branch
adds W' − W (materialised in fp32 per forward, norms differentiated exactly); at multiplier m the result is
W + m·(W' − W), which is ComfyUI's rule for a DoRA file at strength m.  network_dropout then drops the branch
input and rank_dropout masks output rows of W' − W (the shared rule in base.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from anima_trainer.networks.base import AdapterModule, AdapterNetwork
from anima_trainer.networks.formats import NetworkError
from anima_trainer.networks.inject import parse_bool

NETWORK_MODULE = "anima_trainer.networks.lora"
LoRANetwork = AdapterNetwork  # the network class is shared by every algorithm

__all__ = ["NETWORK_MODULE", "LoRAModule", "LoRANetwork", "build"]


class LoRAModule(AdapterModule):
    """The low-rank branch for one Linear; patched into the Linear's forward by `inject()`."""

    NETWORK_MODULE = NETWORK_MODULE
    SUFFIXES: ClassVar[tuple[str, ...]] = (".lora_down.weight", ".lora_up.weight", ".dora_scale")
    # lora_A/lora_B is what kohya's ComfyUI converter writes
    LOAD_ALIASES: ClassVar[dict[str, str]] = {".lora_A.weight": ".lora_down.weight",
                                              ".lora_B.weight": ".lora_up.weight"}
    PLUS_SUFFIXES: ClassVar[tuple[str, ...]] = (".lora_up.weight",)

    def __init__(self, path: str, org: nn.Linear, dim: int, alpha: float, dropout: float | None,
                 dora_wd: bool = False) -> None:
        super().__init__(path, org, dim, alpha, dropout)
        self.lora_down = nn.Linear(self.in_features, dim, bias=False, device=self.device, dtype=torch.float32)
        self.lora_up = nn.Linear(dim, self.out_features, bias=False, device=self.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dora_wd = dora_wd
        if dora_wd:  # magnitude per input column, + ComfyUI's eps so that W' = W at start
            norm = org.weight.detach().to(torch.float32).norm(dim=0, keepdim=True)
            self.dora_scale = nn.Parameter(norm + torch.finfo(torch.float32).eps)

    def tensors(self) -> dict[str, nn.Parameter]:
        out = {".lora_down.weight": self.lora_down.weight, ".lora_up.weight": self.lora_up.weight}
        if self.dora_wd:
            out[".dora_scale"] = self.dora_scale
        return out

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # factored: never materialises ΔW (except DoRA)
        if self.dora_wd:
            return super().branch(x)
        lx = F.linear(x, self.factor(0, self.lora_down.weight, x.dtype))
        if self.dropout and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            # kohya: one Bernoulli mask over the rank channels per sample (shared by all its tokens), and the
            # branch rescaled by 1/(1 − p)
            shape = (lx.shape[0],) + (1,) * (lx.dim() - 2) + (self.dim,) if lx.dim() > 1 else (self.dim,)
            keep = torch.rand(shape, device=lx.device) >= self.rank_dropout
            lx = lx * keep.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return F.linear(lx, self.factor(1, self.lora_up.weight, lx.dtype)) * scale

    def cast_factors(self) -> list[nn.Parameter]:
        return [] if self.dora_wd else [self.lora_down.weight, self.lora_up.weight]

    def stackable_down(self) -> nn.Parameter | None:
        return None if self.dora_wd else self.lora_down.weight

    def fusable_down(self) -> bool:
        """Whether this branch may share a down GEMM with its q/k/v neighbours: plain LoRA, a non-zero
        multiplier, and no random draw in training (dropout, rank_dropout, module_dropout: the draws must stay
        in the separate branches' order)."""
        return (self.fuse_qkv_down and not self.dora_wd and self.multiplier != 0.0
                and not (self.training and (self.dropout or self.rank_dropout or self.module_dropout)))

    @staticmethod
    def add_to_outputs_fused(owners: tuple[LoRAModule, ...], outs: tuple[torch.Tensor, ...],
                             x: torch.Tensor) -> list[torch.Tensor] | None:
        """q/k/v of one self-attention (same input `x`, `outs` their base outputs): the three down projections as
        one GEMM against the stacked [r_q + r_k + r_v, in] down factors, then each up projection; the same sum
        as three `add_to_output` calls up to GEMM rounding.  None (run them separately) when one cannot fuse."""
        if not all(o.fusable_down() for o in owners):
            return None
        dtype = x.dtype
        stacked = owners[0]._stacked_down
        if stacked is not None and all(a is b for a, b in zip(stacked[1], owners, strict=True)) and all(
                o.cast_valid(0, o.lora_down.weight, dtype) for o in owners):
            down = stacked[0]
        else:
            down = torch.cat([o.factor(0, o.lora_down.weight, dtype) for o in owners])
        lxs = F.linear(x, down).split([o.dim for o in owners], dim=-1)
        return [out + (F.linear(lx, o.factor(1, o.lora_up.weight, lx.dtype)) * o.scale) * o.multiplier
                for o, out, lx in zip(owners, outs, lxs, strict=True)]

    def delta_norm(self) -> torch.Tensor:
        """‖alpha/dim · up @ down‖_F from the rank×rank Gram matrices (never the out×in product); with DoRA the
        low-rank part too, as LyCORIS bounds it."""
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        sq = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
        return sq.sqrt() * abs(self.scale)

    def norm_factors(self) -> list[nn.Parameter]:
        return [self.lora_up.weight, self.lora_down.weight]  # kohya: both by √ratio (not dora_scale)

    def delta_weight(self) -> torch.Tensor:
        """alpha/dim · up @ down in fp32 (what a merge adds to W at multiplier 1); with DoRA W' − W."""
        dw = self.scale * (self.lora_up.weight @ self.lora_down.weight)
        if not self.dora_wd:
            return dw
        w = self._org[0].weight.to(torch.float32)
        merged = w + dw
        norm = merged.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps  # ComfyUI's eps
        return merged * (self.dora_scale / norm) - w

    def check_file(self, slot: dict[str, tuple[str, torch.Tensor]], path: Path, net_alpha: float) -> None:
        if not {".lora_down.weight", ".lora_up.weight"} <= set(slot):
            raise NetworkError(f"{path}: module {self.name}: no lora_down/lora_up weights (has {sorted(slot)})")
        down, up = slot[".lora_down.weight"][1], slot[".lora_up.weight"][1]
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != self.in_features or up.shape[0] != self.out_features:
            raise NetworkError(f"{path}: module {self.name}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} "
                               f"do not fit Linear({self.in_features}->{self.out_features})")
        if down.shape[0] != self.dim or up.shape[1] != self.dim:
            raise NetworkError(f"{path}: module {self.name}: file has dim (rank) {down.shape[0]}, network has dim "
                               f"{self.dim}; create the network with dim={down.shape[0]}")
        super().check_file(slot, path, net_alpha)


def build(dit: nn.Module, dim: int, alpha: float, dropout: float | None, args: dict[str, Any],
          **where: Any) -> AdapterNetwork:
    kw = {"dora_wd": parse_bool("dora_wd", args.get("dora_wd", False))}
    return AdapterNetwork(dit, LoRAModule, dim, alpha, dropout, args, algo="lora", module_kwargs=kw,
                          extra_known=("dora_wd",), **where)
