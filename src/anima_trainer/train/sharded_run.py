"""A fine-tune sharded with FSDP2 inside the real training run (the engine: train/fsdp.py).

When it shards (`wants_sharding`): `training_mode = "finetune"` with several processes and `fsdp_sharding =
"auto"` (the default); `fsdp_sharding = "off"` keeps plain data parallel (every process holds the whole DiT,
gradients all-reduced as for LoRA).  The LoRA path never shards.

What changes in a sharded run, and only there (`ShardedFinetune`):

- the DiT is sharded block by block after `prepare_dit` (the fine-tune selection already set), and the
  `DiTFinetune` the loop trains is built again over the sharded DiT (its parameters are DTensors now); the
  optimizer is built over those;
- the per-step gradient average is FSDP's reduce-scatter (`ShardedGradientSync`, the loop's `grad_sync`
  interface around `fsdp.micro_batch`) instead of the data-parallel all-reduce; clipping is torch's
  `clip_grad_norm_`, which computes the global norm over DTensor shards;
- a state holds the sharded model + optimizer (`stage_state`: every process writes its shards with DCP into a
  staging folder, which the main process moves into the state folder it writes and renames as always,
  train/training_state.py); a resume loads them back (`loader`) and needs the same number of processes;
- a network file (step, epoch, final) is the whole DiT gathered on the main process (`gather`) and written by it
  through `DiTFinetune.save`;
- every forward of the sharded DiT is a collective (each unit all-gathers its weights), so what samples or
  measures runs in every process together, on the same inputs, with the same number of DiT calls: the previews
  (`preview_roles`: every process samples the same prompts, seeds and sizes; only the main process decodes and
  writes the images and their events; a stop signal cancels them in all processes at the same sampler step)
  and the validation loss (every process builds the same validator and computes the same loss on the same
  held-out batches; only the main process logs it).  Neither touches the training RNG or the weights, so a run
  with them trains bit for bit as one without them;
- the EMA (ema_decay, train/ema.py) averages each process's own shards; its shadows are staged with the state's
  shards (`stage_state`) and loaded back with them (`loader`), and `gather` gathers a second whole DiT with the
  EMA swapped in for the `-ema` file.

What FSDP cannot do here is refused at start-up (`check_shardable`), naming the option and the fix.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.config.loader import locate_in_source
from anima_trainer.networks.full_finetune import DiTFinetune
from anima_trainer.train.ema import NetworkEMA, has_ema_state
from anima_trainer.train.distributed import Distributed, check_supported, launched_by_accelerate_fsdp
from anima_trainer.train.fsdp import (full_state_dict, load_sharded, local_shard, micro_batch,
                                      mixed_precision_policy, save_sharded, shard_dit, shard_units, upcast_trained)
from anima_trainer.train.monitor import NonFiniteStateError, nonfinite_tensors

log = logging.getLogger(__name__)

ACCELERATE_FSDP_NOTICE = ("accelerate launch --use_fsdp (distributed_type FSDP): the trainer shards the fine-tune "
                          "itself, one FSDP2 unit per DiT block (train/fsdp.py); accelerate's FSDP plugin settings "
                          "(fsdp_* of the launch or its config file) are not used")


def wants_sharding(cfg: TrainConfig, world_size: int) -> bool:
    """Whether this run shards the DiT with FSDP2 (see the module doc)."""
    return cfg.finetunes and world_size > 1 and cfg.fsdp_sharding == "auto"


FULL_BF16_SHARDED_NOTICE = ("full_bf16: a fine-tune sharded over several processes keeps fp32 master shards of the "
                            "trained weights (4 bytes per parameter / N processes) and computes in bf16 "
                            "(mixed_precision = \"bf16\"), so updates below half a bf16 step are kept; the trained "
                            "weights are not held in bf16")
SHARDING_REFUSALS = {  # option → why a sharded fine-tune cannot honour it
    "full_fp16": "it re-casts the trained weights after sharding and needs the fp16 gradient scaler",
    "fused_backward_pass": "its per-parameter step would run before FSDP reduce-scatters the gradient",
    "eval_every_n_steps": "the evaluation runs on the main process alone, and every forward of a sharded DiT needs "
                          "all processes",
    "eval_every_n_epochs": "the evaluation runs on the main process alone, and every forward of a sharded DiT "
                           "needs all processes",
    "preservation_loss_weight": "its base-model forward swaps the trained weights' storage for their base values, "
                                "which is not tried on FSDP's sharded parameters",
    "blocks_to_swap": "block swap streams whole block weights from the host; a sharded block is all-gathered "
                      "from the processes instead",
    "fp8_base": "fp8 storage of the frozen Linears is not tried on FSDP-sharded blocks",
    "compile_blocks": "torch.compile of sharded blocks is not tried yet (compile_blocks = \"auto\" stays eager)",
}
SHARDING_FIX = ("; remove it for a fine-tune sharded over several processes (or set fsdp_sharding = \"off\" to train "
        "data-parallel with the whole DiT in every process, or run one process)")


def check_shardable(cfg: TrainConfig) -> None:
    """ConfigError naming the option and the fix for what a sharded fine-tune cannot honour: the options that
    need the whole weights in one process (the evaluation: it runs on the main process only, and every forward
    of a sharded DiT is a collective), or that change the weights' storage under FSDP.  An option set in the
    TOML is named with its file and line."""
    for name, reason in SHARDING_REFUSALS.items():
        value = getattr(cfg, name, None)
        if name == "compile_blocks":
            value = value is True
        if value:
            raise ConfigError(locate_in_source(cfg, f"{name}: {reason}{SHARDING_FIX}"))
    if cfg.mixed_precision == "fp16":
        raise ConfigError(locate_in_source(cfg, "mixed_precision = \"fp16\": the gradient scaler is not tried with "
                                           "FSDP; use \"bf16\" (or \"no\") for a fine-tune sharded over several "
                                           "processes, or set fsdp_sharding = \"off\""))


class ShardedGradientSync:
    """The loop's `grad_sync` for a sharded DiT: FSDP reduce-scatters (averages) each unit's gradients during
    the backward of a step's last micro-batch (`micro_batch`); earlier micro-batches accumulate locally.
    Nothing is left to do after the backward (`finish`)."""

    def __init__(self, dit: nn.Module) -> None:
        self.dit = dit

    @contextmanager
    def backward(self, *, last: bool) -> Iterator[None]:
        with micro_batch(self.dit, last=last):
            yield

    def finish(self) -> None:
        """Already averaged by FSDP's reduce-scatter during the last backward."""

    def close(self) -> None:
        """No hooks of its own to remove."""

    def __enter__(self) -> ShardedGradientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ShardedFinetune:
    """The sharded DiT of a run, the `DiTFinetune` over it, and its collective save and load steps (every
    process calls each of them at the same point)."""

    dit: nn.Module
    network: DiTFinetune
    dist: Distributed
    staging: Path  # where the processes write a state's shards before the main process moves them into it

    @classmethod
    def start(cls, cfg: TrainConfig, dit: nn.Module, network: DiTFinetune, dist: Distributed,
              device: torch.device) -> ShardedFinetune:
        """Shard `dit` (the selection of `network` already set) and build the fine-tune over its sharded
        parameters.  mixed_precision = "bf16" keeps kohya's meaning (fp32 weights, bf16 forward): the trained
        parameters are upcast to fp32 first, so each process holds 1/N of an fp32 master, and FSDP gathers and
        computes in bf16 with fp32 gradient reduction (frozen ones stay bf16); "no" gathers and computes in fp32,
        as a single process does.  Collective."""
        bf16 = cfg.mixed_precision == "bf16"
        if bf16:
            upcast_trained(dit)
        try:
            compute = torch.bfloat16 if bf16 else torch.float32
            shard_dit(dit, device=device, mp_policy=mixed_precision_policy(device, compute))
        except ValueError as e:
            raise ConfigError(f"fsdp_sharding: {e}") from None
        sharded = DiTFinetune(dit, trainable_patterns=network.trainable_patterns,
                              train_llm_adapter=network.train_llm_adapter_opt, base_file=network.base_file)
        main_pid = dist.gather_objects(os.getpid())[0]  # the staging name: the main process's, as its states'
        staging = Path(cfg.output_dir) / f".{cfg.output_name}-state.tmp-{main_pid}-shards"
        if dist.is_main:
            units = len(shard_units(dit))
            adapter = ", the LLM adapter" if units > len(dit.blocks) else ""
            log.info("fine-tune sharded with FSDP2 over %d processes: %d units (%d blocks%s + the root), each "
                     "process holds 1/%d of the weights, gradients and optimizer state%s", dist.world_size, units + 1,
                     len(dit.blocks), adapter, dist.world_size,
                     " (fp32 master shards, bf16 compute)" if bf16 else "")
        return cls(dit, sharded, dist, staging)

    def gradient_sync(self) -> ShardedGradientSync:
        return ShardedGradientSync(self.dit)

    def _check_finite(self, optimizer: torch.optim.Optimizer, ema: NetworkEMA | None) -> None:
        """NonFiniteStateError in every process when any process's shards (weights, optimizer moments, EMA)
        hold NaN/Inf: a state is only written from finite values (as `Saver._state` checks unsharded)."""
        local = {n: local_shard(p) for n, p in self.network.state_dict().items()}
        local.update({f"optimizer.{i}.{k}": local_shard(v) for i, s in enumerate(optimizer.state.values())
                      for k, v in s.items() if isinstance(v, torch.Tensor) and v.is_floating_point()})
        local.update(ema.state_tensors() if ema is not None else {})
        bad = nonfinite_tensors(local)
        if self.dist.any_true(bool(bad)):
            shown = ", ".join(bad[:5]) if bad else "in another process's shards"
            raise NonFiniteStateError(f"the sharded state: not saved, tensors hold NaN/Inf ({shown})")

    def stage_state(self, optimizer: torch.optim.Optimizer, ema: NetworkEMA | None = None) -> Path:
        """Every process writes its shards of the model, optimizer and EMA (`ema`, its shard shadows) into the
        staging folder (DCP); returns the DCP folder for `save_state(sharded=...)`.  Collective."""
        self._check_finite(optimizer, ema)
        if self.dist.is_main and self.staging.exists():
            shutil.rmtree(self.staging)
        self.dist.barrier()
        target = save_sharded(self.staging, self.dit, optimizer, ema.sharded_state() if ema is not None else None)
        self.dist.barrier()  # every shard is on disk before the main process moves the folder
        return target

    def staged_done(self) -> None:
        """After the main process moved the shards into the state: the empty staging folder goes."""
        if self.dist.is_main:
            shutil.rmtree(self.staging, ignore_errors=True)

    def gather(self, ema: NetworkEMA | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The whole DiT on the main process (CPU; empty elsewhere) for a network file, and with `ema` the
        whole DiT with the EMA weights swapped in (for its `-ema` file; None without).  Collective."""
        if ema is None:
            return full_state_dict(self.dit), None
        with ema.swapped():
            averaged = full_state_dict(self.dit)
        return full_state_dict(self.dit), averaged

    def loader(self, optimizer: torch.optim.Optimizer,
               ema: NetworkEMA | None = None) -> Callable[[Path, bool], None]:
        """`load_state(sharded=...)`: the state's shards into the sharded DiT and `optimizer` (only the model
        when the optimizer starts fresh), and into `ema`'s shadows when the state holds an EMA (its update
        count follows in `resume_ema`).  Collective."""
        def load(folder: Path, fresh_optimizer: bool) -> None:
            extra = ema.sharded_state() if ema is not None and has_ema_state(folder) else None
            try:
                load_sharded(folder, self.dit, optimizer, model_only=fresh_optimizer, extra=extra)
            except Exception as e:  # noqa: BLE001 - DCP reports a misfit as one of several error types
                raise ConfigError(f"resume: the sharded state in {folder} does not fit this fine-tune "
                                  f"({type(e).__name__}: {str(e)[:300]}); the selection, the optimizer or its groups "
                                  "changed since it was saved (resume_ignore_optimizer_mismatch = true starts a fresh "
                                  "optimizer)") from None
        return load


def check_launch(cfg: TrainConfig, accelerator: Any) -> TrainConfig:
    """The launch, before anything is read: `check_supported` (an FSDP launch is accepted for a fine-tune only),
    then what a sharded fine-tune cannot honour (`check_shardable`).  An `accelerate launch --use_fsdp` of a
    fine-tune gets one notice that accelerate's FSDP settings are not used.  Returns the config the run uses:
    a sharded one with compile_blocks = "auto" runs eager (torch.compile of sharded blocks is not tried)."""
    check_supported(accelerator, finetune=cfg.finetunes)
    fsdp_launch = launched_by_accelerate_fsdp() or str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")
    if fsdp_launch and cfg.finetunes and cfg.fsdp_sharding == "off":
        raise ConfigError(locate_in_source(cfg, "fsdp_sharding = \"off\" asks for plain data parallel, but the "
                                           "launch asks for FSDP (accelerate launch --use_fsdp / distributed_type: "
                                           "FSDP); launch with --multi_gpu, or remove fsdp_sharding = \"off\""))
    if fsdp_launch and accelerator.is_main_process:
        log.warning("notice: %s", ACCELERATE_FSDP_NOTICE)
    if not wants_sharding(cfg, accelerator.num_processes):
        return cfg
    check_shardable(cfg)
    update: dict[str, Any] = {"compile_blocks": False} if cfg.compile_blocks == "auto" else {}
    if cfg.full_bf16:  # kohya: bf16 weights stepped plainly; sharded, the fp32 master costs 1/N of it
        if accelerator.is_main_process:
            log.warning("notice: %s", FULL_BF16_SHARDED_NOTICE)
        update["full_bf16"] = False
    return cfg.model_copy(update=update) if update else cfg


def start_sharding(cfg: TrainConfig, dit: nn.Module, network: Any, dist: Distributed,
                   device: torch.device) -> ShardedFinetune | None:
    """The sharded fine-tune of this run (after `check_launch`), or None (no sharding: LoRA, one process,
    fsdp_sharding = "off").  Collective."""
    if not wants_sharding(cfg, dist.world_size):
        return None
    return ShardedFinetune.start(cfg, dit, network, dist, device)


def preview_roles(dist: Distributed, sharding: ShardedFinetune | None,
                  stop: Any) -> tuple[bool, bool, Callable[[], bool] | None]:
    """(renders, writes, cancel) of this process's previews.  Unsharded: the main process renders and writes
    them, cancelled by its own stop signal (`stop.requested`; `stop` None: never).  Sharded: every process
    renders (every DiT forward is a collective), only the main one decodes and writes; the cancel, asked
    before every sampler step in every process, is `dist.any_true` over the processes' stop signals, so they
    stop at the same step together — a process cancelling alone would leave the others waiting in a
    collective."""
    requested = None if stop is None else (lambda: stop.requested is not None)
    if sharding is None:
        return dist.is_main, True, requested
    return True, dist.is_main, None if requested is None else (lambda: dist.any_true(requested()))
