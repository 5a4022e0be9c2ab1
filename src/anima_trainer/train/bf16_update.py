"""bf16 weights without an fp32 master copy: compensated updates (`full_bf16` for a fine-tune).

A bf16 weight resolves 2⁻⁸ of its magnitude: an update below half of that (lr 1e-5 on a weight of ~1 is 2⁻¹⁷)
rounds away completely and plain bf16 training stalls.  The cures, per trained parameter (AdamW's two moments
kept in fp32, 8 bytes, in each; gradients not counted):

- plain bf16 (2 bytes weights): updates below half a bf16 ulp vanish, training stalls;
- fp32 master copy (2 + 4): fp32 updates;
- Kahan with a bf16 (or fp16) compensation buffer (2 + 2): the buffer rounds too; with steady updates of
  2⁻¹⁷·abs(w) the value drifts by about one bf16 ulp (bf16 buffer) or 3 % of the movement (fp16 buffer) in
  2000 steps (measured on CPU while choosing);
- stochastic rounding (2 + 0): right in expectation only, each step adds noise of up to one bf16 ulp;
- compensated with the exact remainder (ours, 2 + 2 as int16): bit-identical to the fp32 master path.

Ours is Kahan's compensation with the compensation term stored exactly: an fp32 value x is split into its
nearest bf16 value (the weight the forward uses) and the remainder x − bf16(x), which is an integer number of
x's fp32 ulps between −2¹⁵ and 2¹⁵ and so fits an int16 (integer arithmetic on the bit patterns:
`hi = (bits + 0x8000) & 0xFFFF0000`, `remainder = bits − hi`).  Joining the two gives x back bit for bit, so each
update is computed on the exact fp32 value: the same result as an fp32 master copy, at 4 bytes per parameter
instead of 6, deterministic (nothing random for the bit-exact resume to carry), and the forward sees
round-to-nearest weights.  A bf16 or fp16 compensation buffer costs the same 2 bytes but rounds (table).

kohya's `full_bf16` casts the trained weights to bf16 with no master copy and steps them plainly (small updates
round away); only its fused Adafactor rounds stochastically (library/adafactor_fused.py `copy_stochastic_`).
Ours differs: the updates are exact.

How: for one parameter, the joined fp32 value is what the inner optimizer steps, in fp32, with an fp32 gradient
and fp32 state; the result is split back into the bf16 weight and the int16 remainder.  Only one parameter is
widened at a time (train/fused_backward.py `PerParameterOptimizer` steps them one by one, fused or not), so the
transient fp32 copy is one tensor, never a master set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["REMAINDER_KEY", "compensated_step", "join_fp32", "split_fp32", "widened"]

REMAINDER_KEY = "fp32_remainder"  # the int16 remainder, kept in the parameter's optimizer state (saved with it)
_ROUND = 0x8000
_HIGH = -0x10000  # 0xFFFF0000 as an int32


def split_fp32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `x` → (its nearest bf16 value, the exact remainder as int16 in units of x's fp32 ulp); ties round
    away from zero (torch's `.to(torch.bfloat16)` rounds them to even: an int16 cannot hold the +2¹⁵ remainder
    that would leave).  `join_fp32` inverts it bit for bit."""
    bits = x.view(torch.int32)
    high = (bits + _ROUND).bitwise_and_(_HIGH)
    remainder = (bits - high).to(torch.int16)
    return high.view(torch.float32).to(torch.bfloat16), remainder


def join_fp32(weight: torch.Tensor, remainder: torch.Tensor | None) -> torch.Tensor:
    """The fp32 value a bf16 `weight` and its int16 `remainder` stand for (a new tensor)."""
    high = weight.float()
    if remainder is None:
        return high
    return (high.view(torch.int32) + remainder.to(torch.int32)).view(torch.float32)


@contextmanager
def widened(p: torch.Tensor) -> Iterator[torch.Tensor]:
    """`p` as fp32 inside the block (its bf16 storage back afterwards, unchanged): lets an optimizer create or
    load fp32 state for a bf16 parameter (torch casts loaded state to the parameter's dtype)."""
    low = p.data
    p.data = low.float()
    try:
        yield p.data
    finally:
        p.data = low


@torch.no_grad()
def compensated_step(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
    """One compensated step of the single-parameter `optimizer` on the bf16 parameter `p` (gradient in p.grad):
    the optimizer steps the exact fp32 value (weight joined with its remainder) with an fp32 gradient, so its
    state is fp32; afterwards `p` holds the nearest bf16 value and the state's REMAINDER_KEY the rest."""
    if p.dtype != torch.bfloat16:
        raise ValueError(f"compensated_step: the parameter is {p.dtype}, not bfloat16")
    state = optimizer.state.get(p)
    remainder = state.pop(REMAINDER_KEY, None) if state else None  # optimizers initialise on an empty state
    grad, low = p.grad, p.data
    high = join_fp32(low, remainder)
    p.data, p.grad = high, grad.float()
    try:
        optimizer.step()
    finally:
        p.data, p.grad = low, grad
    weight, remainder = split_fp32(high)
    low.copy_(weight)
    optimizer.state[p][REMAINDER_KEY] = remainder
