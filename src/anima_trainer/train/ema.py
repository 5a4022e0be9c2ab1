"""EMA of the trained network's weights (`ema_decay`): the fp32 shadow copy, its update after each optimizer step,
the swap that lets saves and previews use it, and its part of a training state.

The shadow and its update are diffusers' `EMAModel` (diffusers.training_utils, a dependency already): after the
n-th optimizer step (t = n − 1) every shadow tensor s of a trained parameter p becomes s − (1 − d_t)·(s − p), with
d_0 = 0 (the first update copies the weights) and, for t ≥ 1, d_t = min(ema_decay, (1 + t) / (10 + t)) with
`ema_warmup` (diffusers' default rule) or d_t = ema_decay without it.  Only the network's trainable tensors are
shadowed (never the frozen model), in fp32 on the parameters' device; every data-parallel process holds the same
parameters, so every process's shadow is the same and only the main one writes files.  In a state folder the
shadow is `ema.safetensors` (the tensors, in `trainable_parameters()` order) + `ema.json` (the update count and
settings), written like the optimizer's state (no pickle) and checksummed with the rest of the state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from anima_trainer.config import TrainConfig
from anima_trainer.networks import AdapterNetwork
from anima_trainer.train import training_state as states

log = logging.getLogger(__name__)

STATE_NAME = "ema"  # ema.json + ema.safetensors in a state folder


def has_ema_state(folder: Path) -> bool:
    """Whether a training state folder holds an EMA (states of runs without `ema_decay` do not)."""
    return (Path(folder) / f"{STATE_NAME}.json").is_file()


class NetworkEMA:
    """The EMA shadow of a network's trainable parameters (see the module doc)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = True) -> None:
        from diffusers.training_utils import EMAModel  # heavy import: only when the EMA is on

        self.params = list(params)
        self.decay, self.warmup = decay, warmup
        # without warm-up the decay is held at ema_decay by its floor (min_decay); foreach: one fused update
        self._ema = EMAModel(self.params, decay=decay, min_decay=0.0 if warmup else decay, foreach=True)
        self._ema.to(dtype=torch.float32)  # fp32 shadows also for full_bf16 / full_fp16 weights

    @property
    def shadow(self) -> list[torch.Tensor]:
        """The EMA weights, one fp32 tensor per trainable parameter (same order)."""
        return self._ema.shadow_params

    @property
    def updates(self) -> int:
        """Optimizer steps averaged so far (t + 1 of the module doc)."""
        return self._ema.optimization_step

    def decay_at(self, updates: int) -> float:
        """d_t of the `updates`-th update (1-based), as the update uses it."""
        return self._ema.get_decay(updates)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step (not after accumulation micro-steps): move the shadow toward the weights."""
        self._ema.step(self.params)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the network for the duration (a save, a preview); the training weights are put back
        exactly (bit for bit) afterwards, also when the body raises."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]  # on the device: no host round trip
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)  # cast to the parameter's dtype (full_bf16: rounded, as a save would)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept, strict=True):
                    p.copy_(k)

    def reset(self) -> None:
        """Start again from the current weights (a resume from a state without EMA): the warm-up restarts."""
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                s.copy_(p)
        self._ema.optimization_step = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The shadow by position, for the finiteness check before a state is written."""
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def write_state(self, folder: Path) -> None:
        """`ema.safetensors` + `ema.json` into a state folder being written (train/training_state.py)."""
        states.write_nested(Path(folder), STATE_NAME, self._ema.state_dict())

    def load_state(self, folder: Path) -> None:
        """The shadow and update count from a state folder whose checksums were verified (load_state).  The
        current ema_decay / ema_warmup apply from here on (a change is logged by the resume check)."""
        folder = Path(folder)
        saved = states.read_nested(folder, STATE_NAME)
        shadow = saved.get("shadow_params") if isinstance(saved, dict) else None
        if not isinstance(shadow, list) or not all(isinstance(t, torch.Tensor) for t in shadow):
            raise states.StateError(folder, f"{STATE_NAME}.json", "not an EMA state (needs 'shadow_params')")
        if len(shadow) != len(self.params) or any(tuple(s.shape) != tuple(p.shape)
                                                  for s, p in zip(shadow, self.params, strict=True)):
            raise states.StateError(folder, f"{STATE_NAME}.safetensors",
                                    f"holds {len(shadow)} tensors that do not match the network's {len(self.params)} "
                                    "trained parameters (the network settings changed since the state was saved)")
        try:
            self._ema.load_state_dict(saved)
        except (ValueError, TypeError) as e:
            raise states.StateError(folder, f"{STATE_NAME}.json", f"not a valid EMA state ({e})") from None
        self._ema.decay, self._ema.min_decay = self.decay, 0.0 if self.warmup else self.decay
        self._ema.shadow_params = [s.to(p.device, torch.float32) for s, p in zip(shadow, self.params, strict=True)]


def build_ema(cfg: TrainConfig, network: AdapterNetwork) -> NetworkEMA | None:
    """The run's EMA (None with ema_decay unset), started from the network's current weights."""
    if cfg.ema_decay is None:
        return None
    return NetworkEMA(network.trainable_parameters(), cfg.ema_decay, cfg.ema_warmup)


def resume_ema(ema: NetworkEMA | None, folder: Path) -> None:
    """After the network was loaded from state `folder`: the state's EMA, or, from a state without one, an EMA
    that starts at the loaded weights (with a notice).  A state's EMA with ema_decay now unset is not used."""
    if ema is None:
        if has_ema_state(folder):
            log.info("resume: %s holds an EMA of the weights; ema_decay is unset, so it is not used", folder)
        return
    if has_ema_state(folder):
        ema.load_state(folder)
        return
    ema.reset()
    log.warning("notice: resume: %s has no EMA of the weights (saved without ema_decay): the EMA starts from the "
                "state's weights at step %d (its warm-up, if on, starts again)", folder,
                states.read_progress(folder).step)
