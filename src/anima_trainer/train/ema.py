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

A fine-tune (training_mode = "finetune") shadows exactly the trained DiT parameters (`DiTFinetune.
trainable_parameters()`); its `<name>-ema.safetensors` is then a whole DiT checkpoint (what `DiTFinetune.save`
writes, with the EMA weights swapped in).

Where the shadow lives (`ema_device`): "device" = beside the weights, as above; "cpu" = in host
memory (pinned when CUDA is available; OneTrainer's `ema = CPU`): after each optimizer step the trained weights
are copied into a host staging buffer in their own dtype (non_blocking into pinned memory, then one wait for the
copies) and the same diffusers update runs there, so the device holds no shadow (4 bytes per trained parameter
saved).  The swap then keeps the training weights in that staging buffer, not on the device.  "auto": on the
host for a fine-tune whose shadow is more than `HOST_SHARE` of the device memory available at start (the
`vram_budget_gb` when set, else the CUDA device's free memory when the EMA is built), else on the device; LoRA
keeps its EMA on the device (as before).  The update's arithmetic is the same on either side; between a CPU and
a GPU the last bit may differ where one of them contracts the multiply-add.  No update interval (OneTrainer's
`ema_update_step_interval`) is offered: the EMA follows every optimizer step.

Compensated bf16 fine-tunes (train/bf16_update.py) average the bf16 weights as stored, not their exact fp32 values
(the weight joined with the int16 remainder of the optimizer state), by choice: the difference does not reach
what the EMA is used for.  Its weights reach saves and previews through `swapped`, which copies the shadow into
the bf16 parameters, so they are rounded to bf16 either way (0.25 bf16 ulp mean error against the fp32 shadow).
Measured on CPU (bench/ema_bf16_exact.py, 2026-12-07, torch 2.13: 200 000 weights ~ N(0, 0.02), 200 AdamW steps,
ema_decay 0.99 with warm-up, against the EMA of an fp32-master run fed the same gradients, which the exact average
equals bitwise): averaging the rounded weights moves the saved bf16 EMA by one ulp in 2.9 % / 4.7 % / 3.8 % of
the elements at lr 1e-6 / 1e-5 / 1e-4, its mean error from 0.248 / 0.249 / 0.250 to 0.249 / 0.254 / 0.257 ulp
(≤ 3 % more than the bf16 rounding itself).  The fp32 shadow itself differs by 29 % / 1.2 % / 0.05 % of the
EMA's mean movement, but at lr 1e-6 that movement (6e-5) is half a bf16 ulp of these weights, below what the bf16
file holds.  Averaging the exact values would cost a transient fp32 copy of every trained weight per step (4
bytes per parameter, what the compensated update saves) or a per-parameter update instead of diffusers' fused one.
In a fine-tune sharded with FSDP2 (train/sharded_run.py) the trained parameters are DTensors holding this
process's shard: each process shadows its own shard (`fsdp.local_shard`: the shard's plain tensor, fp32, same update and
swap), so the EMA is sharded like the weights and costs 4 bytes per trained parameter / N per process.  In a
state, the shadows go into the sharded checkpoint beside the model and optimizer (`sharded_state`, train/fsdp.py)
and `ema.json` holds only the update count and settings; the `-ema` file is gathered from the shards with the
EMA swapped in, in every process, and written by the main one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from anima_trainer.config import TrainConfig
from anima_trainer.networks import AdapterNetwork
from anima_trainer.train import training_state as states
from anima_trainer.train.fsdp import local_shard

log = logging.getLogger(__name__)

STATE_NAME = "ema"  # ema.json + ema.safetensors in a state folder
HOST_SHARE = 0.25  # ema_device = "auto": a fine-tune's shadow above this share of the device memory goes to the host


def has_ema_state(folder: Path) -> bool:
    """Whether a training state folder holds an EMA (states of runs without `ema_decay` do not)."""
    return (Path(folder) / f"{STATE_NAME}.json").is_file()


class NetworkEMA:
    """The EMA shadow of a network's trainable parameters (see the module doc)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = True,
                 host: bool = False) -> None:
        from diffusers.training_utils import EMAModel  # heavy import: only when the EMA is on

        self.params = list(params)
        self.decay, self.warmup, self.host = decay, warmup, host
        self.sharded = any(local_shard(p) is not p for p in self.params)  # FSDP2: DTensor parameters, shard shadows
        self.reshard: Callable[[], None] = lambda: None  # sharded: drops gathered weights around a swap
        # host: the weights' copies the update reads (their dtype; pinned with CUDA, so the copies can be async)
        self._staging = [torch.empty(local_shard(p).shape, dtype=p.dtype, device="cpu", pin_memory=_pinned())
                         .requires_grad_(p.requires_grad) for p in self.params] if host else []
        # without warm-up the decay is held at ema_decay by its floor (min_decay); foreach: one fused update
        self._ema = EMAModel(self._stage(), decay=decay, min_decay=0.0 if warmup else decay, foreach=True)
        self._ema.to(dtype=torch.float32)  # fp32 shadows also for full_bf16 / full_fp16 weights
        if host and _pinned():
            self._ema.pin_memory()

    def _stage(self) -> list[torch.Tensor]:
        """The tensors the update averages in: the parameters themselves, or (host) their copies in the staging
        buffer, complete when this returns."""
        if not self.host:  # sharded: views of the shards that keep requires_grad (diffusers only averages those)
            with torch.enable_grad():
                return [local_shard(p) for p in self.params]
        with torch.no_grad():
            for s, p in zip(self._staging, self.params, strict=True):
                s.copy_(local_shard(p).detach(), non_blocking=True)
        for device in {p.device for p in self.params if p.device.type == "cuda"}:
            torch.cuda.current_stream(device).synchronize()  # the async copies have landed
        return self._staging

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
        self._ema.step(self._stage())

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the network for the duration (a save, a preview); the training weights are put back
        exactly (bit for bit) afterwards, also when the body raises."""
        with torch.no_grad():  # device: kept there (no host round trip); host: in the staging buffer
            kept = self._stage() if self.host else [local_shard(p).detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                local_shard(p).copy_(s)  # cast to the parameter's dtype (full_bf16: rounded, as a save would)
        self.reshard()  # sharded: no forward may reuse weights gathered before the swap
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept, strict=True):
                    local_shard(p).copy_(k)
            self.reshard()

    def reset(self) -> None:
        """Start again from the current weights (a resume from a state without EMA): the warm-up restarts."""
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                s.copy_(local_shard(p))
        self._ema.optimization_step = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The shadow by position, for the finiteness check before a state is written."""
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def sharded_state(self) -> dict[str, torch.Tensor]:
        """Sharded: the shadows as DTensors laid out like their parameters (each process's shard, sharing the
        shadow's memory), by position, for the sharded checkpoint to save and to load into in place."""
        from torch.distributed.tensor import DTensor

        return {f"{STATE_NAME}.{i}": DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape,
                                                       stride=p.stride(), run_check=False)
                for i, (s, p) in enumerate(zip(self.shadow, self.params, strict=True))}

    def write_state(self, folder: Path) -> None:
        """`ema.safetensors` + `ema.json` into a state folder being written (train/training_state.py); sharded:
        `ema.json` alone (the shadows are in the sharded checkpoint, `sharded_state`)."""
        saved = self._ema.state_dict()
        if self.sharded:
            saved = {**{k: v for k, v in saved.items() if k != "shadow_params"}, "sharded": True}
        states.write_nested(Path(folder), STATE_NAME, saved)

    def load_state(self, folder: Path) -> None:
        """The shadow and update count from a state folder whose checksums were verified (load_state).  The
        current ema_decay / ema_warmup apply from here on (a change is logged by the resume check)."""
        folder = Path(folder)
        saved = states.read_nested(folder, STATE_NAME)
        if isinstance(saved, dict) and bool(saved.get("sharded", False)) != self.sharded:
            raise states.StateError(folder, f"{STATE_NAME}.json", "an EMA saved sharded resumed unsharded, or the "
                                    "other way round")
        if self.sharded:  # the shadows were loaded with the sharded checkpoint (train/sharded_run.py `loader`)
            self._load_settings(folder, {k: v for k, v in saved.items() if k != "sharded"})
            return
        shadow = saved.get("shadow_params") if isinstance(saved, dict) else None
        if not isinstance(shadow, list) or not all(isinstance(t, torch.Tensor) for t in shadow):
            raise states.StateError(folder, f"{STATE_NAME}.json", "not an EMA state (needs 'shadow_params')")
        if len(shadow) != len(self.params) or any(tuple(s.shape) != tuple(p.shape)
                                                  for s, p in zip(shadow, self.params, strict=True)):
            raise states.StateError(folder, f"{STATE_NAME}.safetensors",
                                    f"holds {len(shadow)} tensors that do not match the network's {len(self.params)} "
                                    "trained parameters (the network settings changed since the state was saved)")
        self._load_settings(folder, saved)
        self._ema.shadow_params = [s.to("cpu" if self.host else p.device, torch.float32)
                                   for s, p in zip(shadow, self.params, strict=True)]
        if self.host and _pinned():
            self._ema.pin_memory()

    def _load_settings(self, folder: Path, saved: dict) -> None:
        """The update count (and the shadows when `saved` holds them) from a state; the current ema_decay /
        ema_warmup apply from here on."""
        try:
            self._ema.load_state_dict(saved)
        except (ValueError, TypeError) as e:
            raise states.StateError(folder, f"{STATE_NAME}.json", f"not a valid EMA state ({e})") from None
        self._ema.decay, self._ema.min_decay = self.decay, 0.0 if self.warmup else self.decay


def _pinned() -> bool:
    """Whether host tensors are pinned (page-locked): with CUDA, so device-to-host copies can be asynchronous."""
    return torch.cuda.is_available()


def ema_on_host(ema_device: str, *, finetunes: bool, shadow_bytes: int, device: torch.device,
                budget_bytes: float | None = None) -> bool:
    """Whether the shadow lives in host memory (module doc): "cpu" always, "device" never; "auto" for a fine-tune
    whose shadow exceeds HOST_SHARE of `budget_bytes` (vram_budget_gb) or, without a budget, of the CUDA device's
    free memory now.  LoRA's "auto", and any run without a CUDA device, keep it beside the weights."""
    if ema_device != "auto":
        return ema_device == "cpu"
    if not finetunes:
        return False
    if budget_bytes is None:
        if device.type != "cuda":
            return False  # the weights are in host memory already
        budget_bytes = torch.cuda.mem_get_info(device)[0]
    return shadow_bytes > HOST_SHARE * budget_bytes


def build_ema(cfg: TrainConfig, network: AdapterNetwork) -> NetworkEMA | None:
    """The run's EMA (None with ema_decay unset), started from the network's current weights, on the device or
    the host as `ema_device` decides (`ema_on_host`)."""
    if cfg.ema_decay is None:
        return None
    params = network.trainable_parameters()
    shadow_bytes = 4 * sum(p.numel() for p in params)
    budget = cfg.vram_budget_gb  # a number of GiB, "auto" or unset
    host = ema_on_host(cfg.ema_device, finetunes=cfg.finetunes, shadow_bytes=shadow_bytes, device=params[0].device,
                       budget_bytes=budget * 2**30 if isinstance(budget, int | float) else None)
    if host:
        log.info("EMA of the trained weights in host memory (ema_device = %r): %.2f GiB fp32%s, updated by the CPU "
                 "after every optimizer step (ema_device = \"device\" keeps it on the card)", cfg.ema_device,
                 shadow_bytes / 2**30, ", pinned" if _pinned() else "")
    ema = NetworkEMA(params, cfg.ema_decay, cfg.ema_warmup, host=host)
    if ema.sharded:  # FSDP2 (train/sharded_run.py): a swap frees the units' gathered weights
        from anima_trainer.train.fsdp import reshard

        ema.reshard = lambda: reshard(network.dit)
    return ema


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
