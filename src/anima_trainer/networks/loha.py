"""LoHa (LyCORIS semantics): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), y = W x + multiplier · (alpha/dim) · ΔW x.

`hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a` [out, r], `hada_w2_b` [r, in] with r = dim; the scale
alpha/dim is what ComfyUI applies (alpha / hada_w1_b.shape[0]).  Init as LyCORIS: w1_a ~ N(0, 0.1),
w1_b ~ N(0, 1), w2_a = 0, w2_b ~ N(0, 1), so ΔW = 0 at start and w2_a gets the first gradient (the other
factors' gradients are products with w2_a and follow after one update).  `dropout` drops the branch input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from anima_trainer.networks.base import AdapterModule, AdapterNetwork

NETWORK_MODULE = "anima_trainer.networks.loha"


class LoHaModule(AdapterModule):
    NETWORK_MODULE = NETWORK_MODULE
    SUFFIXES: ClassVar[tuple[str, ...]] = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
    PLUS_SUFFIXES: ClassVar[tuple[str, ...]] = (".hada_w2_a",)  # kohya: LoRA+ on hada_w2_a

    def __init__(self, path: str, org: nn.Linear, dim: int, alpha: float, dropout: float | None) -> None:
        super().__init__(path, org, dim, alpha, dropout)
        out, inp = self.out_features, self.in_features
        self.hada_w1_a, self.hada_w1_b = self.new_param(out, dim), self.new_param(dim, inp)
        self.hada_w2_a, self.hada_w2_b = self.new_param(out, dim), self.new_param(dim, inp)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def tensors(self) -> dict[str, nn.Parameter]:
        return {".hada_w1_a": self.hada_w1_a, ".hada_w1_b": self.hada_w1_b,
                ".hada_w2_a": self.hada_w2_a, ".hada_w2_b": self.hada_w2_b}

    def delta_weight(self) -> torch.Tensor:
        return self.scale * ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b))


def build(dit: nn.Module, dim: int, alpha: float, dropout: float | None, args: dict[str, Any],
          **where: Any) -> AdapterNetwork:
    return AdapterNetwork(dit, LoHaModule, dim, alpha, dropout, args, algo="loha", **where)
