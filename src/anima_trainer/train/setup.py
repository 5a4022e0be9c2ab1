"""The start of a run, shared by `train` (loop.run_training), the `cache` command and the benchmarks.

`setup_run(cfg)` checks the optimizer and LR schedule against their classes (train/optim.py check_optimization;
validating a config does not import them) and resolves the seed (unset: 42), the tokenizer folders and the
dataset exactly once and the same way for every caller, so a cache built by `anima-trainer cache` holds the
very captions `train` asks for.
`RunPlan` holds the values derived from the config and the dataset (steps, epochs, the save interval of
save_n_epoch_ratio): they are passed on explicitly, never written back into the config or onto the dataset.
`setup_optimization` builds optimizer, LR schedule and gradient scaler as the loop steps them (the benchmark
calls it too); a fine-tune's optimizer comes with its memory levers (train/optimizer_levers.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.optim.lr_scheduler import LRScheduler

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.config.run_files import DEFAULT_SEED as DEFAULT_SEED  # moved there; imported from here too
from anima_trainer.config.run_files import run_seed
from anima_trainer.data import build_run_dataset
from anima_trainer.data.dataset import AnimaDataset
from anima_trainer.tools.download.startup import ensure_tokenizers, with_tokenizer_dirs
from anima_trainer.train.distributed import Distributed, launched_world_size
from anima_trainer.train.flow import objective_notices
from anima_trainer.train.inputs import check_masked_loss
from anima_trainer.train.model_setup import check_network_options
from anima_trainer.train.optimizer_levers import build_finetune_optimizer, check_finetune_levers
from anima_trainer.train.optim import (
    build_optimizer,
    build_scheduler,
    check_optimization,
    component_lrs,
    use_full_half,
)
from anima_trainer.train.schedulers import schedule_options
from anima_trainer.train.validation import check_validation

log = logging.getLogger(__name__)


def total_steps(cfg: TrainConfig, batches_per_epoch: int, num_processes: int = 1) -> tuple[int, int]:
    """(optimizer steps, epochs); `max_train_epochs` overrides `max_train_steps` as in kohya.

    An epoch's batches are shared by the processes, and each process steps every `gradient_accumulation_steps`
    micro-batches and at the epoch's end: ceil(ceil(batches / processes) / accumulation) steps per epoch."""
    per_process = math.ceil(batches_per_epoch / num_processes)
    updates_per_epoch = math.ceil(per_process / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * updates_per_epoch, cfg.max_train_epochs
    return cfg.max_train_steps, math.ceil(cfg.max_train_steps / updates_per_epoch)


@dataclass(frozen=True)
class RunPlan:
    """What a run derives once from the config and the dataset; read by the loop, never written back."""

    seed: int
    max_steps: int
    epochs: int
    accumulation: int  # gradient_accumulation_steps
    save_every_n_epochs: int | None  # save_every_n_epochs, or what save_n_epoch_ratio makes of it


def plan_run(cfg: TrainConfig, seed: int, batches_per_epoch: int, num_processes: int = 1) -> RunPlan:
    """The RunPlan of `cfg` over a dataset of `batches_per_epoch` batches shared by `num_processes`."""
    max_steps, epochs = total_steps(cfg, batches_per_epoch, num_processes)
    every = cfg.save_every_n_epochs
    if cfg.save_n_epoch_ratio:  # kohya: floor(epochs / ratio) or 1, replacing save_every_n_epochs
        every = max(1, epochs // cfg.save_n_epoch_ratio)
        log.info("save_n_epoch_ratio = %d: an epoch file every %d epoch(s) of %d", cfg.save_n_epoch_ratio, every,
                 epochs)
    return RunPlan(seed, max_steps, epochs, cfg.gradient_accumulation_steps, every)


@dataclass
class RunSetup:
    """What `setup_run` resolved: the config with its tokenizer folders, the dataset (scheduled for the plan),
    the plan, and the start-up notices not yet printed."""

    cfg: TrainConfig
    dataset: AnimaDataset
    plan: RunPlan
    notices: list[str] = field(default_factory=list)
    report_path: Path | None = None  # the dataset report `train` writes (None for `cache`)


def setup_run(cfg: TrainConfig, *, dist: Distributed | None = None,
              command: Literal["train", "cache"] = "train",
              before_scan: Callable[[TrainConfig], None] | None = None) -> RunSetup:
    """Start-up up to the dataset, before any model file is opened (issue 14's order): the optimizer and schedule
    (check_optimization: the returned `cfg` has their class-based names), the seed, the tokenizers (unset folders:
    the per-user cache), `before_scan(cfg)` (train: the output-exists check), the network options, the dataset
    scan (all problems at once) and the checks that need it, and the RunPlan.

    `train` verifies every image without a latent cache and names a dataset report file; `cache` decodes them
    anyway.  Both build the dataset with the same seed and validation split, so their caption variants match."""
    dist = dist or Distributed()
    cfg = check_optimization(cfg)
    seed = run_seed(cfg)
    notices = [*cfg.sd_scripts_anima_notices(), *cfg.text_encoder_notices(), *cfg.vae_compile_notices(),
               *objective_notices(cfg), *cfg.finetune_notices(), *check_finetune_levers(cfg, dist.world_size)]
    with dist.main_first():  # missing tokenizer files are fetched once, before anyone loads them
        if dist.is_main:
            ensure_tokenizers(cfg)
    cfg = with_tokenizer_dirs(cfg)
    if before_scan is not None:
        before_scan(cfg)
    training = command == "train"
    if training:
        check_network_options(cfg)
    # Without a latent cache, decode every image once at start-up: a file damaged inside its compressed data
    # is then skipped with a report instead of stopping the run hours later (caching decodes them anyway).
    cached = cfg.cache_latents or cfg.cache_latents_to_disk
    report_path = Path(cfg.output_dir) / f"{cfg.output_name}.dataset_report.txt" if training else None
    dataset = build_run_dataset(cfg, seed, verify_images=training and not cached,
                                report_name=str(report_path) if report_path else None)
    if training:
        check_validation(cfg, dataset)
        masked_note = check_masked_loss(cfg, dataset)  # issue 14: masked_loss / conditioning_data_dir
        notices += [masked_note] if masked_note else []
    plan = plan_run(cfg, seed, len(dataset), dist.world_size)
    dataset = dataset.scheduled(plan.max_steps, plan.accumulation)
    return RunSetup(cfg, dataset, plan, notices, report_path)


@dataclass
class Optimization:
    """The optimizer over the network's parameter groups, its LR schedule and the gradient scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    lr: float  # the DiT's base learning rate (unet_lr, else learning_rate)


def setup_optimization(cfg: TrainConfig, network: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                       max_steps: int) -> Optimization:
    """kohya's learning rates (the DiT at unet_lr, else learning_rate; the text encoder at text_encoder_lr, else
    learning_rate; per-component rates), the optimizer, the schedule over `max_steps`, the scaler (fp16 only),
    and full_bf16 / full_fp16 before the first step creates the optimizer state."""
    lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    groups = network.param_groups(lr, component_lrs(cfg), text_encoder_lr=te_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    full_half = cfg.full_bf16 or cfg.full_fp16
    if cfg.finetunes:  # train/optimizer_levers.py: compensated bf16, fused backward, optimizer_offload
        check_finetune_levers(cfg, launched_world_size())  # its notices went out at start-up (setup_run)
        if full_half:  # before optimizer_offload copies the weights to the host
            use_full_half(network, dtype, scaler)
        optimizer = build_finetune_optimizer(cfg, groups, lr, device)
    else:
        optimizer = build_optimizer(groups, lr, cfg.optimizer_args, device, optimizer_type=cfg.optimizer_type)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, max_steps, **schedule_options(cfg))
    if full_half and not cfg.finetunes:  # before the first step creates the optimizer state (issue 14)
        use_full_half(network, dtype, scaler)
    return Optimization(optimizer, scheduler, scaler, lr)



def check_trained_llm_adapter_not_cached(cfg: TrainConfig, trains_llm_adapter: bool) -> None:
    """cache_llm_adapter_outputs with a trained LLM adapter is a ConfigError.  Not a config-only check: whether
    anything inside `llm_adapter` trains is known from the built network (`trains_llm_adapter`), not from
    train_llm_adapter / train_norm alone — target_modules, include/exclude_patterns, network_reg_dims (dim 0
    skips a module), the modules of network_weights and the DiT's own norms decide it too — so it runs once the
    network exists, before the first step."""
    if cfg.cache_llm_adapter_outputs and trains_llm_adapter:
        raise ConfigError("cache_llm_adapter_outputs: the LLM adapter is trained (train_llm_adapter or train_norm), "
                          "so its output changes every step and cannot be cached; turn one of them off")
