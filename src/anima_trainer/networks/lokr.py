"""LoKr (LyCORIS semantics): ΔW = kron(w1, w2), y = W x + multiplier · scale · ΔW x.

Factorisation: out → (out_l, out_k), in → (in_m, in_n) by `factorization(·, factor)`: factor -1 (default)
picks the most balanced divisor pair; a positive factor that divides the size gives (factor, size/factor);
otherwise the most balanced pair with its smaller part ≤ factor.  The smaller part goes to w1 [out_l, in_m],
the larger to w2 [out_k, in_n] (2048 → 32·64, 1024 → 32·32, 8192 → 64·128).

Layouts (network_args `full_matrix`, `decompose_both`, and `dim`):
* w2 = `lokr_w2_a` [out_k, r] @ `lokr_w2_b` [r, in_n] with r = dim, unless full_matrix, dim ≥ 100000 (the
  kohya/LyCORIS sentinel) or dim ≥ max(out_k, in_n)/2: then the full `lokr_w2` [out_k, in_n];
* w1 = `lokr_w1` [out_l, in_m], or `lokr_w1_a` @ `lokr_w1_b` with decompose_both and dim < max(out_l, in_m)/2.

Scale = what ComfyUI applies to the saved file: alpha / dim when w2 (else w1) is decomposed; **1 when both
factors are full** (ComfyUI ignores alpha then; we still write the configured `.alpha`).

Init (ΔW = 0 at start): w1 (or w1_a, w1_b) and w2_a Kaiming-uniform (a=√5), w2_b zero / full w2 zero.  At the
first step only the zero factor gets a gradient (the others' gradients are products with it); after one
update every factor receives gradient.  `dropout` (network_dropout) drops the branch input.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from anima_trainer.networks.base import AdapterModule, AdapterNetwork
from anima_trainer.networks.formats import NetworkError
from anima_trainer.networks.inject import parse_bool

NETWORK_MODULE = "anima_trainer.networks.lokr"
FULL_MATRIX_DIM_SENTINEL = 100000
EXTRA_ARGS = ("factor", "full_matrix", "decompose_both")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m ≤ n (LyCORIS rule, see the module doc)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        k = m + 1
        while dimension % k:
            k += 1
        if k + dimension // k > m + n or k > limit:
            break
        m, n = k, dimension // k
    return min(m, n), max(m, n)


class LoKrModule(AdapterModule):
    NETWORK_MODULE = NETWORK_MODULE
    SUFFIXES: ClassVar[tuple[str, ...]] = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a",
                                           ".lokr_w2_b")
    PLUS_SUFFIXES: ClassVar[tuple[str, ...]] = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b")  # kohya: LoRA+ on w1

    def __init__(self, path: str, org: nn.Linear, dim: int, alpha: float, dropout: float | None,
                 factor: int = -1, full_matrix: bool = False, decompose_both: bool = False,
                 layout: tuple[tuple[int, int], bool, bool, int] | None = None) -> None:
        """`layout` = (w1 shape, w1 decomposed, w2 decomposed, w1 rank) overrides the rules (a file's layout)."""
        super().__init__(path, org, dim, alpha, dropout)
        if layout is None:
            out_l, out_k = factorization(self.out_features, factor)
            in_m, in_n = factorization(self.in_features, factor)
            self.w1_decomposed = decompose_both and dim < max(out_l, in_m) / 2
            self.w2_decomposed = not full_matrix and dim < max(out_k, in_n) / 2
            w1_rank = dim
        else:
            (out_l, in_m), self.w1_decomposed, self.w2_decomposed, w1_rank = layout
            if self.out_features % out_l or self.in_features % in_m:
                raise NetworkError(f"module {path}: lokr_w1 shape {(out_l, in_m)} does not divide "
                                   f"({self.out_features}, {self.in_features})")
            out_k, in_n = self.out_features // out_l, self.in_features // in_m

        def kaiming(p: nn.Parameter) -> None:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

        if self.w1_decomposed:
            self.lokr_w1_a, self.lokr_w1_b = self.new_param(out_l, w1_rank), self.new_param(w1_rank, in_m)
            kaiming(self.lokr_w1_a)
            kaiming(self.lokr_w1_b)
        else:
            self.lokr_w1 = self.new_param(out_l, in_m)
            kaiming(self.lokr_w1)
        if self.w2_decomposed:
            self.lokr_w2_a, self.lokr_w2_b = self.new_param(out_k, dim), self.new_param(dim, in_n)
            kaiming(self.lokr_w2_a)
            nn.init.zeros_(self.lokr_w2_b)
        else:
            self.lokr_w2 = self.new_param(out_k, in_n)
            nn.init.zeros_(self.lokr_w2)
        # ComfyUI: alpha / rank of the decomposed factor (w2 first); both full → alpha ignored, scale 1
        self.scale = float(alpha) / self.rank if self.alpha_matters else 1.0

    @property
    def rank(self) -> int:
        return self.dim if self.w2_decomposed or not self.w1_decomposed else self.lokr_w1_b.shape[0]

    @property
    def alpha_matters(self) -> bool:
        return self.w1_decomposed or self.w2_decomposed

    def tensors(self) -> dict[str, nn.Parameter]:
        out = ({".lokr_w1_a": self.lokr_w1_a, ".lokr_w1_b": self.lokr_w1_b} if self.w1_decomposed
               else {".lokr_w1": self.lokr_w1})
        out.update({".lokr_w2_a": self.lokr_w2_a, ".lokr_w2_b": self.lokr_w2_b} if self.w2_decomposed
                   else {".lokr_w2": self.lokr_w2})
        return out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.w1_decomposed else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.w2_decomposed else self.lokr_w2
        return w1, w2

    def delta_norm(self) -> torch.Tensor:
        """‖scale · kron(w1, w2)‖_F = |scale| · ‖w1‖_F · ‖w2‖_F (no Kronecker product materialised)."""
        w1, w2 = self.factors()
        return abs(self.scale) * w1.float().norm() * w2.float().norm()

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        return self.scale * torch.kron(w1, w2)


def parse_factor(value: Any) -> int:
    try:
        factor = int(str(value).strip()) if not isinstance(value, int) or isinstance(value, bool) else value
    except ValueError:
        factor = 0
    if isinstance(value, bool) or factor == 0 or factor < -1:
        raise NetworkError(f"network_args factor must be -1 (balanced) or a positive integer, got {value!r}")
    return factor


def build(dit: nn.Module, dim: int, alpha: float, dropout: float | None, args: dict[str, Any],
          **where: Any) -> AdapterNetwork:
    kw = {"factor": parse_factor(args.get("factor", -1)),
          "full_matrix": parse_bool("full_matrix", args.get("full_matrix", False)) or dim >= FULL_MATRIX_DIM_SENTINEL,
          "decompose_both": parse_bool("decompose_both", args.get("decompose_both", False))}
    return AdapterNetwork(dit, LoKrModule, dim, alpha, dropout, args, algo="lokr", module_kwargs=kw,
                          extra_known=EXTRA_ARGS, **where)
