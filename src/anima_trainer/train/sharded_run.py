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
  through `DiTFinetune.save`.

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
from anima_trainer.train.distributed import Distributed, check_supported, launched_by_accelerate_fsdp
from anima_trainer.train.fsdp import (full_state_dict, load_sharded, micro_batch, mixed_precision_policy,
                                      save_sharded, shard_dit, shard_units, upcast_trained)
from anima_trainer.train.monitor import NonFiniteStateError, nonfinite_tensors
from anima_trainer.train.validation import check_validation

log = logging.getLogger(__name__)

ACCELERATE_FSDP_NOTICE = ("accelerate launch --use_fsdp (distributed_type FSDP): the trainer shards the fine-tune "
                          "itself, one FSDP2 unit per DiT block (train/fsdp.py); accelerate's FSDP plugin settings "
                          "(fsdp_* of the launch or its config file) are not used")


def wants_sharding(cfg: TrainConfig, world_size: int) -> bool:
    """Whether this run shards the DiT with FSDP2 (see the module doc)."""
    return cfg.finetunes and world_size > 1 and cfg.fsdp_sharding == "auto"


SHARDING_REFUSALS = {  # option → why a sharded fine-tune cannot honour it
    "sample_prompts": "previews run on the main process alone, and every forward of a sharded DiT needs all "
                      "processes",
    "validation_split": "the validation loss runs on the main process alone, and every forward of a sharded DiT "
                        "needs all processes",
    "full_bf16": "it holds the trained weights in bf16; a sharded fine-tune keeps fp32 master shards and "
                 "mixed_precision = \"bf16\" already computes in bf16 over them",
    "full_fp16": "it re-casts the trained weights after sharding and needs the fp16 gradient scaler",
    "fused_backward_pass": "its per-parameter step would run before FSDP reduce-scatters the gradient",
    "ema_decay": "the EMA of sharded weights is not available",
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
    need the whole weights in one process (previews, the validation loss: they run on the main process only,
    and every forward of a sharded DiT is a collective), or that change the weights' storage under FSDP.  An
    option set in the TOML is named with its file and line."""
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
        computes in bf16 with fp32 gradient reduction (frozen ones stay bf16).  Collective."""
        bf16 = cfg.mixed_precision == "bf16"
        if bf16:
            upcast_trained(dit)
        try:
            shard_dit(dit, device=device, mp_policy=mixed_precision_policy(device, torch.bfloat16) if bf16 else None)
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

    def _check_finite(self, optimizer: torch.optim.Optimizer) -> None:
        """NonFiniteStateError in every process when any process's shards (weights, optimizer moments) hold
        NaN/Inf: a state is only written from finite values (as `Saver._state` checks unsharded)."""
        local = {n: _local(p) for n, p in self.network.state_dict().items()}
        local.update({f"optimizer.{i}.{k}": _local(v) for i, s in enumerate(optimizer.state.values())
                      for k, v in s.items() if isinstance(v, torch.Tensor) and v.is_floating_point()})
        bad = nonfinite_tensors(local)
        if self.dist.any_true(bool(bad)):
            shown = ", ".join(bad[:5]) if bad else "in another process's shards"
            raise NonFiniteStateError(f"the sharded state: not saved, tensors hold NaN/Inf ({shown})")

    def stage_state(self, optimizer: torch.optim.Optimizer) -> Path:
        """Every process writes its shards of the model and optimizer into the staging folder (DCP); returns
        the DCP folder for `save_state(sharded=...)`.  Collective."""
        self._check_finite(optimizer)
        if self.dist.is_main and self.staging.exists():
            shutil.rmtree(self.staging)
        self.dist.barrier()
        target = save_sharded(self.staging, self.dit, optimizer)
        self.dist.barrier()  # every shard is on disk before the main process moves the folder
        return target

    def staged_done(self) -> None:
        """After the main process moved the shards into the state: the empty staging folder goes."""
        if self.dist.is_main:
            shutil.rmtree(self.staging, ignore_errors=True)

    def gather(self) -> dict[str, torch.Tensor]:
        """The whole DiT on the main process (CPU; empty elsewhere) for a network file.  Collective."""
        return full_state_dict(self.dit)

    def loader(self, optimizer: torch.optim.Optimizer) -> Callable[[Path, bool], None]:
        """`load_state(sharded=...)`: the state's shards into the sharded DiT and `optimizer` (only the model
        when the optimizer starts fresh).  Collective."""
        def load(folder: Path, fresh_optimizer: bool) -> None:
            try:
                load_sharded(folder, self.dit, optimizer, model_only=fresh_optimizer)
            except Exception as e:  # noqa: BLE001 - DCP reports a misfit as one of several error types
                raise ConfigError(f"resume: the sharded state in {folder} does not fit this fine-tune "
                                  f"({type(e).__name__}: {str(e)[:300]}); the selection, the optimizer or its groups "
                                  "changed since it was saved (resume_ignore_optimizer_mismatch = true starts a fresh "
                                  "optimizer)") from None
        return load


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


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
    return cfg.model_copy(update={"compile_blocks": False}) if cfg.compile_blocks == "auto" else cfg


def start_sharding(cfg: TrainConfig, dataset: Any, dit: nn.Module, network: Any, dist: Distributed,
                   device: torch.device) -> ShardedFinetune | None:
    """The sharded fine-tune of this run (after `check_launch`), or None (no sharding: LoRA, one process,
    fsdp_sharding = "off").  Collective."""
    if not wants_sharding(cfg, dist.world_size):
        return None
    if check_validation(cfg, dataset):  # held out in dataset_config: known once the dataset is built
        raise ConfigError("validation_split (dataset_config): " + SHARDING_REFUSALS["validation_split"] + SHARDING_FIX)
    return ShardedFinetune.start(cfg, dit, network, dist, device)
