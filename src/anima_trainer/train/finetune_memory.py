"""The memory model of fine-tuning the DiT itself (issue 19): bytes per trained parameter for its weights,
master copy, gradients and optimizer state under each memory lever, and one step's predicted peak, so that
`vram_budget_gb` can plan fine-tunes the way train/vram_plan.py plans LoRA runs.

Per trained parameter (bytes; `trained_bytes` sums them over the real tensor shapes):

| weights (`weights`) | weights | master | gradients |
|---|---|---|---|
| "fp32" | 4 | 0 | 4 (+ 2 for the bf16 copy autocast saves for backward) |
| "bf16_master" (bf16 compute copy + fp32 master) | 2 | 4 | 2 |
| "bf16_compensated" (train/bf16_update.py) | 2 | 2 (int16 remainder) | 2 |
| "bf16" (kohya's full_bf16: plain, small updates round away) | 2 | 0 | 2 |

| optimizer state (`optimizer`) | bytes |
|---|---|
| "adamw" (two fp32 moments) | 8 |
| "adamw8bit" (bitsandbytes: two 8-bit moments + an fp32 absmax per 256-block each) | 2 + 8/256 |
| "adafactor" (kohya's recipe, beta1 None: factored, fp32) | 4·(m+n) per m×n matrix, 4 per vector element |

The EMA of the trained weights (`ema`, train/ema.py): an fp32 shadow, 4 bytes per trained parameter on the
device with `ema = "device"`, in host memory with `ema = "host"` (device: 0), none with `ema = "none"`.

`fused_backward` (train/fused_backward.py) leaves one gradient alive at a time: the largest tensor's instead of
the set.  `optimizer_offload` keeps the state in host memory (device: 0): the option of the same name
(train/optimizer_offload.py; the host weight and gradient buffers are host memory too).  The compensated path and
the fused pass widen one parameter at a time to fp32 (weight + gradient: 8 bytes × the largest tensor).

`estimate_finetune_memory` adds the frozen weights (compute dtype) and the activations of the step (the LoRA
estimator's constants, train/memory_estimate.py: the same block inputs are kept for the weight gradients), all
predicted — not measured.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from anima_trainer.models.dit import AnimaDiT
from anima_trainer.train.memory_estimate import estimate_training_memory, gib

__all__ = ["EMA_PLACES", "OPTIMIZER_STATES", "WEIGHT_MODES", "TrainedBytes", "estimate_finetune_memory",
           "optimizer_state_bytes", "trained_bytes", "trained_shapes"]

WEIGHT_MODES = {  # weights, master, gradient bytes per trained parameter
    "fp32": (4, 0, 4), "bf16_master": (2, 4, 2), "bf16_compensated": (2, 2, 2), "bf16": (2, 0, 2)}
OPTIMIZER_STATES = ("adamw", "adamw8bit", "adafactor")
ADAMW8BIT_BLOCK = 256  # bitsandbytes' block size for its 8-bit optimizer states
EMA_PLACES = ("none", "device", "host")  # where the EMA's fp32 shadow is (train/ema.py's ema_device)
EMA_BYTES = 4  # per trained parameter: the fp32 shadow


def optimizer_state_bytes(shape: Sequence[int], optimizer: str) -> float:
    """Bytes of optimizer state one tensor of `shape` holds."""
    numel = math.prod(shape)
    if optimizer == "adamw":
        return 8.0 * numel
    if optimizer == "adamw8bit":
        return 2.0 * numel + 2 * 4 * math.ceil(numel / ADAMW8BIT_BLOCK)
    if optimizer == "adafactor":
        if len(shape) < 2:
            return 4.0 * numel
        rows, cols = math.prod(shape[:-1]), shape[-1]
        return 4.0 * (rows + cols)
    raise ValueError(f"optimizer = {optimizer!r}: accepted are {', '.join(OPTIMIZER_STATES)}")


@dataclass(frozen=True)
class TrainedBytes:
    """Device bytes of the trained parameters: weights, master/remainder, gradients, optimizer state, the
    transient fp32 copy of one tensor (compensated/fused steps) and the EMA shadow; `host` = what lives in CPU
    memory instead."""

    params: int
    weights: float
    master: float
    grads: float
    optimizer_state: float
    transient: float
    host: float = 0.0
    ema: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.master + self.grads + self.optimizer_state + self.transient + self.ema


def trained_bytes(shapes: Sequence[Sequence[int]], *, weights: str = "fp32", optimizer: str = "adamw",
                  fused_backward: bool = False, optimizer_offload: bool = False,
                  autocast_copy: bool = False, ema: str = "none") -> TrainedBytes:
    """The device bytes of training tensors of `shapes` under the levers (module docstring).  `autocast_copy`:
    fp32 weights whose bf16 copies autocast keeps for backward (+2 bytes each; with gradient checkpointing
    the caller passes only one block's tensors).  `ema`: where the EMA shadow is ("none", "device", "host")."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights = {weights!r}: accepted are {', '.join(WEIGHT_MODES)}")
    if ema not in EMA_PLACES:
        raise ValueError(f"ema = {ema!r}: accepted are {', '.join(EMA_PLACES)}")
    w, m, g = WEIGHT_MODES[weights]
    sizes = [math.prod(s) for s in shapes]
    n, largest = sum(sizes), max(sizes, default=0)
    state = sum(optimizer_state_bytes(s, optimizer) for s in shapes)
    grads = g * (largest if fused_backward else n)
    widened = weights == "bf16_compensated" or (fused_backward and weights == "bf16_master")
    transient = 8.0 * largest if widened else 0.0
    copy = 2.0 * n if autocast_copy and weights == "fp32" else 0.0
    shadow = float(EMA_BYTES * n) if ema != "none" else 0.0
    return TrainedBytes(n, w * n + copy, m * n, grads, 0.0 if optimizer_offload else state, transient,
                        (state if optimizer_offload else 0.0) + (shadow if ema == "host" else 0.0),
                        shadow if ema == "device" else 0.0)


_SHAPES: dict[tuple, list[tuple[str, tuple[int, ...]]]] = {}


def _named_shapes(dit_config: Any) -> list[tuple[str, tuple[int, ...]]]:
    key = tuple(sorted(vars(dit_config).items()))
    if key not in _SHAPES:
        with torch.device("meta"):
            dit = AnimaDiT(dit_config)
        _SHAPES[key] = [(n, tuple(p.shape)) for n, p in dit.named_parameters()]
    return _SHAPES[key]


def trained_shapes(dit_config: Any, patterns: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the DiT's parameters whose name matches one of the regexes `patterns` (re.search; None:
    all), from a DiT built on the meta device (no memory)."""
    compiled = [re.compile(p) for p in patterns] if patterns is not None else None
    return {n: s for n, s in _named_shapes(dit_config)
            if compiled is None or any(c.search(n) for c in compiled)}


def estimate_finetune_memory(dit_config: Any, *, patterns: Sequence[str] | None = None,
                             resolution: int | tuple[int, int] = 1024, batch: int = 1, dtype: str = "bf16",
                             gradient_checkpointing: bool = True, weights: str = "fp32", optimizer: str = "adamw",
                             fused_backward: bool = False, optimizer_offload: bool = False,
                             ema: str = "none") -> dict[str, float]:
    """Predicted peak device memory (GiB) of one fine-tuning step: the frozen weights in the compute `dtype`,
    the trained parameters under the levers (`trained_bytes`, with the EMA shadow where `ema` puts it: "none",
    "device", "host"), and the activations (train/memory_estimate.py).
    Not included: text encoder and VAE (cache their outputs), CUDA context and allocator slack (~0.5–1 GiB),
    block swap."""
    shapes = trained_shapes(dit_config, patterns)
    all_shapes = trained_shapes(dit_config)
    elem = 4 if dtype in ("fp32", "no") else 2
    frozen = elem * sum(math.prod(s) for n, s in all_shapes.items() if n not in shapes)
    trained = trained_bytes(list(shapes.values()), weights=weights, optimizer=optimizer,
                            fused_backward=fused_backward, optimizer_offload=optimizer_offload, ema=ema)
    copies = 0.0
    if weights == "fp32" and elem == 2:  # autocast's bf16 copies of the fp32 weights, saved for backward
        per_block = [sum(math.prod(s) for n, s in shapes.items() if n.startswith(f"blocks.{i}."))
                     for i in range(dit_config.num_blocks)]
        copies = 2.0 * (max(per_block) + sum(math.prod(s) for n, s in shapes.items() if not n.startswith("blocks."))
                        if gradient_checkpointing else trained.params)
    act = estimate_training_memory(dit_config, resolution=resolution, batch=batch, rank=1, dtype=dtype,
                                   gradient_checkpointing=gradient_checkpointing)["activations_gib"]
    total = frozen + trained.total + copies
    return {"trained_params": trained.params, "frozen_weights_gib": gib(frozen), "trained_gib": gib(trained.total),
            "weights_gib": gib(trained.weights), "master_gib": gib(trained.master), "grads_gib": gib(trained.grads),
            "optimizer_state_gib": gib(trained.optimizer_state), "autocast_copies_gib": gib(copies),
            "transient_gib": gib(trained.transient), "ema_gib": gib(trained.ema), "host_gib": gib(trained.host),
            "activations_gib": act,
            "total_gib": gib(total) + act}
