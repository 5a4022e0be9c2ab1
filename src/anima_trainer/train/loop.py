"""The training loop: batch → latents + context → noise and σ → DiT with injected LoRA → loss → step → save.

Read it like minRF: `run_training()` sets up (data, models, network, optimizer, schedule, resume, logging) and
`_loop()` runs `training_step` until `max_train_steps`.  Inputs and caches: train/inputs.py; saves, states and
resume checks: train/checkpoints.py and train/resume.py; metrics and alerts: train/monitor.py; the validation
loss: train/validation.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.console import progress_disabled
from anima_trainer.data.loader import run_batches
from anima_trainer.tools.download.startup import ensure_tokenizers, with_tokenizer_dirs
from anima_trainer.models.compile import image_tokens
from anima_trainer.networks.merge import merge_base_weights
from anima_trainer.sample.generate import render_previews
from anima_trainer.sample.prompts import load_sample_prompts
from anima_trainer.sample.sampler import SamplingCancelled
from anima_trainer.train.flow import (
    NoiseOptions,
    draw_noise_and_sigma,
    flow_loss,
    noisy_input,
    objective_notices,
)
from anima_trainer.train.inputs import Caches as Caches
from anima_trainer.train.inputs import StepInput as StepInput
from anima_trainer.train.inputs import TextConditioner as TextConditioner
from anima_trainer.train.inputs import check_masked_loss
from anima_trainer.train.inputs import epoch_inputs as epoch_inputs
from anima_trainer.train.inputs import prepare_caches as prepare_caches
from anima_trainer.train.inputs import report_long_captions as report_long_captions
from anima_trainer.train.inputs import to_device
from anima_trainer.train.budget import MAX_TEXT_TOKENS, check_before_models, check_text_tokens
from anima_trainer.train.checkpoints import (
    Checkpointer,
    apply_optimizer_args,
    check_resume,
    rebuild_schedule,
    resolve_resume,
    schedule_fields,
    snapshot_fields,
)
from anima_trainer.train.distributed import (
    Distributed,
    check_state_world,
    check_supported,
    needs_cpu_backend,
    read_rank_rng,
)
from anima_trainer.train.file_metadata import RunMetadata
from anima_trainer.train.events import EventLog, config_for_log, events_path
from anima_trainer.train.lock import RunLock
from anima_trainer.train.model_setup import WEIGHT_DTYPES as WEIGHT_DTYPES
from anima_trainer.train.model_setup import Models as Models
from anima_trainer.train.model_setup import (
    check_network_options,
    kohya_text_encoder_notice,
    load_models,
    module_counts,
    prepare_dit,
    prepare_text_encoder,
)
from anima_trainer.train.monitor import Monitor, MonitorAlertError
from anima_trainer.train.optim import (
    build_optimizer,
    build_scheduler,
    component_lrs,
    effective_lrs,
    set_optimizer_train_mode,
    use_full_half,
)
from anima_trainer.train.resume import Progress, load_state, remove_stale_temporaries, restore_rng
from anima_trainer.train.schedulers import describe_schedule, schedule_options
from anima_trainer.train.tracking import log_images, resolve_tracking, start_tensorboard, start_trackers
from anima_trainer.train.validation import build_validator, check_validation
from anima_trainer.train.vram_plan import adapter_trained, apply_plan

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after the current step; `state` is where it can be resumed from (None:
    the weights were not finite, so no state was saved; `last_good` is the newest earlier state, if any)."""

    def __init__(self, step: int, state: Path | None, last_good: Path | None = None) -> None:
        if state is not None:
            text = (f"training interrupted at step {step}; a state was saved to {state}. Resume with "
                    f"--resume latest (or --resume {state}) and the same settings")
        elif last_good is not None:
            text = (f"training interrupted at step {step}; NO state was saved: the weights hold NaN/Inf. The last "
                    f"good state is {last_good}: resume from it (--resume {last_good}) with a lower learning rate")
        else:
            text = (f"training interrupted at step {step}; NO state was saved: the weights hold NaN/Inf and no "
                    "earlier state exists; start again with a lower learning rate")
        super().__init__(text)
        self.step, self.state, self.last_good = step, state, last_good


class StopSignals:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step (a state is saved); the second one
    stops at once with KeyboardInterrupt — every file is written atomically, so nothing is corrupted either way.
    Handlers are installed only in the main thread and restored afterwards."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {name}: stopping immediately")
        self.requested = name
        log.warning("%s: finishing the current step, saving a state and stopping (send it again to stop now)", name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def training_step(dit, latents: torch.Tensor, context: torch.Tensor, cfg: TrainConfig,
                  generator: torch.Generator, mask: torch.Tensor | None = None,
                  sample_weights: torch.Tensor | None = None, sample_seeds: list[int] | None = None) -> torch.Tensor:
    """One rectified-flow loss: σ (fp32) → x_σ → v̂ = DiT(x_σ, σ, c) → loss against ε − x0.

    With `sample_seeds` each sample's noise and σ come from its own seed (the loop derives it from the seed,
    the epoch and the item), so they do not depend on how samples are batched or sharded across processes;
    otherwise they are drawn from `generator`.  kohya's noise options (noise offset, multires, input
    perturbation, timestep range: flow.draw_noise_and_sigma) draw from the same generator."""
    device = latents.device
    patches = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    options = NoiseOptions.from_config(cfg)  # noise offset, multires, input perturbation, timestep range

    def draw(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw_noise_and_sigma(
            x0.shape[0], tuple(latents.shape[1:]), gen, options, x0=x0, method=cfg.timestep_sampling,
            sigmoid_scale=cfg.sigmoid_scale, shift=cfg.discrete_flow_shift, weighting_scheme=cfg.weighting_scheme,
            logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, patches=patches)

    if sample_seeds is None:
        noise, sigma, noise_in = draw(latents, generator)
    else:
        drawn = [draw(latents[i:i + 1], torch.Generator().manual_seed(s)) for i, s in enumerate(sample_seeds)]
        noise, sigma, noise_in = (torch.cat(parts) for parts in zip(*drawn, strict=True))
    noise, sigma, noise_in = to_device(noise, device), to_device(sigma, device), to_device(noise_in, device)
    x_t = noisy_input(latents, noise_in, sigma)  # ip_noise_gamma perturbs the input only, not the target
    pred = dit(x_t, sigma, context)
    return flow_loss(pred, noise - latents, sigma, loss_type=cfg.loss_type, huber_c=cfg.huber_c,
                     weighting_scheme=cfg.weighting_scheme, mask=mask, sample_weights=sample_weights)


def sample_seed(seed: int, epoch: int, index: int, occurrence: int) -> int:
    """The noise/σ seed of one sample: a hash of (seed, epoch, dataset item, occurrence in the epoch)."""
    digest = hashlib.blake2b(f"anima-trainer/noise/{seed}/{epoch}/{index}/{occurrence}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def total_steps(cfg: TrainConfig, batches_per_epoch: int, num_processes: int = 1) -> tuple[int, int]:
    """(optimizer steps, epochs); `max_train_epochs` overrides `max_train_steps` as in kohya.

    An epoch's batches are shared by the processes, and each process steps every `gradient_accumulation_steps`
    micro-batches and at the epoch's end: ceil(ceil(batches / processes) / accumulation) steps per epoch."""
    per_process = math.ceil(batches_per_epoch / num_processes)
    updates_per_epoch = math.ceil(per_process / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * updates_per_epoch, cfg.max_train_epochs
    return cfg.max_train_steps, math.ceil(cfg.max_train_steps / updates_per_epoch)


def initial_progress(cfg: TrainConfig, *, batches_per_epoch: int, max_steps: int,
                     resumed: bool = False) -> Progress:
    """Where a run with kohya's initial_step / initial_epoch starts (train_network.py's semantics, arithmetic in
    optimizer steps): initial_step wins, initial_epoch N means step (N − 1) × steps per epoch.  The epoch
    counter starts at the epoch holding that step; with skip_until_initial_step the data batches before it are
    skipped (whole epochs, then micro-batches of the epoch) and the step counter continues from it, otherwise
    the step counter starts at 0.  The LR schedule is not moved (kohya).  A state's own step count is ignored
    when they are given, as in kohya."""
    per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)  # optimizer steps per epoch
    key = "initial_step" if cfg.initial_step is not None else "initial_epoch"
    step = cfg.initial_step if cfg.initial_step is not None else (cfg.initial_epoch - 1) * per_epoch
    if step and step >= max_steps:
        raise ConfigError(f"{key}: starts at step {step}, but the run has {max_steps} steps (max_train_steps must "
                          f"be greater than the initial step, as in kohya); lower {key} or raise max_train_steps")
    epoch, rest = divmod(step, per_epoch)  # step < max_steps <= epochs × per_epoch: inside the run
    if resumed:
        log.warning("%s is set: the state's step count is ignored (kohya)", key)
    if not cfg.skip_until_initial_step:
        if step:
            log.info("%s: counting starts in epoch %d at step 0 (no data is skipped without "
                     "skip_until_initial_step)", key, epoch + 1)
        return Progress(0, epoch + 1, 0)
    if step:
        log.info("%s: skipping the data of %d step(s): training starts in epoch %d at step %d (the LR schedule "
                 "starts from its beginning)", key, step, epoch + 1, step)
    return Progress(step, epoch + 1, rest * cfg.gradient_accumulation_steps)


@dataclass
class TrainRun:
    """What a finished run leaves: the final file, the live (still injected) network and DiT, the loss log."""

    final_path: Path
    dit: torch.nn.Module
    network: torch.nn.Module
    losses: list[float]
    steps: int
    optimizer: torch.optim.Optimizer | None = None


def train(cfg: TrainConfig) -> Path:
    """Run a whole LoRA training from a validated config; returns the final network file."""
    return run_training(cfg).final_path


def run_training(cfg: TrainConfig) -> TrainRun:
    """The loop behind `train`, returning the live model too (tests, notebooks).  The run holds the lock of
    its output_dir/output_name (train/lock.py) from before it writes anything until it ends, however it ends."""
    with contextlib.ExitStack() as cleanup:
        return _run_training(cfg, cleanup)


def _run_training(cfg: TrainConfig, cleanup: contextlib.ExitStack) -> TrainRun:
    from accelerate import Accelerator

    from anima_trainer.data import build_dataset, load_dataset_config
    from anima_trainer.data.scan import write_dataset_report

    # issue 14: options accepted with another or no effect, said once each at start-up (the loader's own notices,
    # cfg.notices, are printed by the CLI); all of them are written to the run's events below
    run_notices = [*cfg.sd_scripts_anima_notices(), *cfg.text_encoder_notices(), *cfg.vae_compile_notices(),
                   *objective_notices(cfg)]
    seed = cfg.seed if cfg.seed is not None else 42
    torch.manual_seed(seed)
    tracking = resolve_tracking(cfg)
    accelerator = Accelerator(mixed_precision="no", cpu=needs_cpu_backend(), **tracking.accelerator_kwargs())
    check_supported(accelerator)
    dist = Distributed.from_accelerator(accelerator)
    # Start-up, before any model file is opened (issue 14 item 4): the options were checked by TrainConfig;
    # tokenizers (unset folders: the per-user cache) → the output-exists check (final file, states) → the dataset
    # scan, all problems at once → the run lock and the output-exists check of every file the run will write →
    # the dataset report file.
    with dist.main_first():  # missing tokenizer files are fetched once, before anyone loads them
        if dist.is_main:
            ensure_tokenizers(cfg)
    cfg = with_tokenizer_dirs(cfg)
    if not cfg.resume:  # the final file and earlier states, before a scan that may take minutes (all files: below)
        _check_outputs(cfg, resuming=False, max_steps=0, epochs=0)
    check_network_options(cfg)
    # Without a latent cache, decode every image once at start-up: a file damaged inside its compressed data
    # is then skipped with a report instead of stopping the run hours later (caching decodes them anyway).
    cached = cfg.cache_latents or cfg.cache_latents_to_disk
    report_path = Path(cfg.output_dir) / f"{cfg.output_name}.dataset_report.txt"
    dataset = build_dataset(load_dataset_config(cfg.dataset_config), default_batch_size=cfg.train_batch_size,
                            seed=seed, verify_images=not cached, default_validation_split=cfg.validation_split,
                            default_validation_seed=cfg.validation_seed, strict_captions=cfg.strict_captions,
                            report_name=str(report_path))
    check_validation(cfg, dataset)
    masked_note = check_masked_loss(cfg, dataset)  # issue 14: masked_loss / conditioning_data_dir
    run_notices += [masked_note] if masked_note else []
    if dist.is_main:
        for line in run_notices:
            log.warning("notice: %s", line)
    with dist.main_first():  # one run per output_name: locked before any file of it is written or cleaned up
        if dist.is_main:
            cleanup.enter_context(RunLock(cfg.output_dir, cfg.output_name))
            remove_stale_temporaries(cfg.output_dir, cfg.output_name)  # may put back a state being replaced
    resume_from = resolve_resume(cfg)
    max_steps, epochs = total_steps(cfg, len(dataset), accelerator.num_processes)
    if cfg.save_n_epoch_ratio:  # kohya: floor(epochs / ratio) or 1, replacing save_every_n_epochs
        cfg = cfg.model_copy(update={"save_every_n_epochs": max(1, epochs // cfg.save_n_epoch_ratio)})
        log.info("save_n_epoch_ratio = %d: an epoch file every %d epoch(s) of %d", cfg.save_n_epoch_ratio,
                 cfg.save_every_n_epochs, epochs)
    if resume_from is None:  # a resumed run is checked after its state (a finished run's final file is fine)
        _check_outputs(cfg, resuming=False, max_steps=max_steps, epochs=epochs)
    if dist.is_main:
        write_dataset_report(dataset, report_path)
    device = accelerator.device
    dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    cfg = apply_plan(cfg, dataset, device, adapter_trained=adapter_trained(cfg))  # vram_budget_gb
    prompts = check_before_models(cfg, dataset, device)  # sizes, memory, prompt file: before any model loads
    models = load_models(cfg, device, dtype)
    dit = models.dit
    if cfg.base_weights:  # kohya: merged into the base before the network exists (issue 14)
        merge_base_weights(dit, cfg.base_weights, cfg.base_weights_multiplier, text_encoder=models.text_encoder.model)
    tokens = {image_tokens(w, h) for w, h, *_ in dataset.bucket_table()}
    batch = max((len(b) for b in dataset.batch_plan(0)), default=1)
    previews_and_validation = 2 * len(prompts)
    network, kernel = prepare_dit(cfg, dit, device, dtype, tokens=tokens, batch=batch,
                                  extra_shapes=previews_and_validation + 4, text_encoder=models.text_encoder.model)
    prepare_text_encoder(cfg, models.text_encoder, network)  # issue 15: train mode, HF checkpointing
    dist.broadcast_parameters(network.trainable_parameters())  # every process starts from the same weights
    if dist.enabled:
        torch.manual_seed(dist.seed(seed))  # dropout differs per process
    lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    # kohya: the DiT at unet_lr (else learning_rate), the text encoder at text_encoder_lr (else learning_rate)
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    optimizer = build_optimizer(network.param_groups(lr, component_lrs(cfg), text_encoder_lr=te_lr), lr,
                                cfg.optimizer_args, device, optimizer_type=cfg.optimizer_type)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, max_steps, **schedule_options(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if cfg.full_bf16 or cfg.full_fp16:  # before the first step creates the optimizer state (issue 14)
        use_full_half(network, dtype, scaler)
    if cfg.scale_weight_norms and (note := network.max_norm_notice()):
        log.warning("%s", note)
    generator = torch.Generator(device="cpu").manual_seed(dist.seed(seed))
    shard = dist.shard(len(dataset))  # this process's batches of every epoch
    snapshot = snapshot_fields(cfg, network, dataset)
    snapshot["lr_schedule"] = schedule_fields(cfg, optimizer, max_steps)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    resume_check = None
    if resume_from is not None:  # fail fast: before caching, and before any file is touched
        resume_check = check_resume(resume_from, cfg, snapshot, max_steps)
        check_state_world(resume_from, dist.world_size)
        if resume_check.finished is not None:  # already complete (killed after its last write): nothing to write
            progress = load_state(resume_from, network=network, optimizer=optimizer, scheduler=scheduler,
                                  scaler=scaler, generator=generator, strict_optimizer=False)
            dist.shutdown()
            return TrainRun(resume_check.finished, dit, network, [], progress.step, optimizer)
    started = time.time()
    events = EventLog(events_path(cfg.output_dir, cfg.output_name) if accelerator.is_main_process else None,
                      run=tracking.run_name)
    checkpoints = Checkpointer(
        cfg, network, optimizer=optimizer, scheduler=scheduler, scaler=scaler, generator=generator,
        snapshot=snapshot, events=events, dist=dist, metadata=RunMetadata(
            cfg, dataset, max_steps=max_steps, epochs=epochs, started=started, num_processes=dist.world_size),
        before_save=lambda: set_optimizer_train_mode(optimizer, False),
        after_save=lambda: set_optimizer_train_mode(optimizer, True))
    if resume_from is not None:
        checkpoints.check_start(resuming=True, max_steps=max_steps, epochs=epochs)
    events.write("config", config=config_for_log(cfg))
    # issue 14: one start-up notice per option accepted without effect (config/kohya_options.py), and the schedule
    sched_line, sched_notice = describe_schedule(scheduler, cfg.lr_scheduler_type or cfg.lr_scheduler, max_steps, lr,
                                                 min_lr_ratio=cfg.lr_scheduler_min_lr_ratio)
    log.info(sched_line)
    if sched_notice:
        log.warning("notice: %s", sched_notice)
    if (save_note := kohya_text_encoder_notice(cfg, network)) is not None:  # issue 15
        if dist.is_main:
            log.warning("notice: %s", save_note)
        run_notices.append(save_note)
    for line in [*cfg.notices, *run_notices, *([sched_notice] if sched_notice else [])]:
        events.write("notice", message=line)
    start_trackers(accelerator, tracking, cfg, {"max_train_steps": max_steps})
    dataset.max_train_steps, dataset.gradient_accumulation_steps = max_steps, cfg.gradient_accumulation_steps
    report_long_captions(dataset, models.text_encoder, max_tokens=MAX_TEXT_TOKENS)
    check_text_tokens(prompts, models.text_encoder)
    if cfg.cache_llm_adapter_outputs and network.trains_llm_adapter:
        raise ConfigError("cache_llm_adapter_outputs: the LLM adapter is trained (train_llm_adapter or train_norm), "
                          "so its output changes every step and cannot be cached; turn one of them off")
    # captions that change every step are not memoised (the memo would grow without bound)
    conditioner = TextConditioner(dit, models.text_encoder,
                                  max_cached=100_000 if dataset.captions_are_static else 0,
                                  cache_contexts=cfg.cache_llm_adapter_outputs,
                                  train_adapter=network.trains_llm_adapter,
                                  train_text_encoder=network.trains_text_encoder)
    caches = prepare_caches(cfg, dataset, models, conditioner, dist=dist)
    if caches.variants is not None:
        conditioner.max_cached = 100_000  # a finite set of captions now: memoise them
    validator = build_validator(cfg, dataset, models.vae.encode, device, seed) if dist.is_main else None
    progress = Progress()
    if resume_from is not None and resume_check is not None:
        progress = load_state(resume_from, network=network, optimizer=optimizer, scheduler=scheduler,
                              scaler=scaler, generator=generator, restore_scheduler=not resume_check.rebuild_schedule,
                              strict_optimizer=not cfg.optimizer_mismatch_ignored(),
                              fresh_optimizer=resume_check.fresh_optimizer)
        apply_optimizer_args(optimizer, fresh_groups, resume_check.optimizer_args)
        if resume_check.rebuild_schedule:  # a changed lr or schedule: the current settings from the resume point on
            scheduler = checkpoints.scheduler = rebuild_schedule(
                optimizer, [g["lr"] for g in fresh_groups],
                lambda: build_scheduler(optimizer, cfg.lr_scheduler, max_steps, **schedule_options(cfg)), progress.step)
        rng = read_rank_rng(resume_from, dist.rank, dist.world_size)
        if rng is not None:
            restore_rng(rng, generator)
        at_epoch_end = progress.batch_in_epoch >= len(shard)
        checkpoints.resumed(resume_from, progress, at_epoch_end=at_epoch_end, max_steps=max_steps)
        if at_epoch_end:  # saved at an epoch's end: start the next one
            progress = Progress(progress.step, progress.epoch + 1, 0)
        log.info("resuming from %s at step %d (epoch %d, batch %d)", resume_from, progress.step, progress.epoch,
                 progress.batch_in_epoch)
        events.write("resume", step=progress.step, epoch=progress.epoch, state=str(resume_from))
    if cfg.initial_step is not None or cfg.initial_epoch is not None:
        progress = initial_progress(cfg, batches_per_epoch=len(shard), max_steps=max_steps,
                                    resumed=resume_from is not None)
    images = None
    if caches.latents is None:  # decode images in worker processes, ahead of the GPU
        images = run_batches(dataset, epochs, cfg.max_data_loader_n_workers,
                             caches.variants.pick if caches.variants is not None else None,
                             start=(progress.epoch - 1) * len(shard) + progress.batch_in_epoch, shard=shard)
    monitor = Monitor.from_config(cfg, device, max_steps=max_steps,
                                  steps_per_epoch=math.ceil(len(shard) / cfg.gradient_accumulation_steps),
                                  events=events, log_fn=accelerator.log if tracking.log_with else None)
    log.info("training %s %s modules (+%d norm gains), %d images, %d batches/epoch, %d steps, %d epochs",
             module_counts(network), cfg.network_module, len(network.norms_by_name), dataset.num_images,
             len(dataset), max_steps, epochs)
    run = _Run(cfg, accelerator, models, network, dataset, conditioner, caches, images, optimizer, scheduler,
               scaler, generator, checkpoints, monitor, events, validator, progress, max_steps, epochs, seed, dist,
               shard)
    with start_tensorboard(cfg, tracking, is_main_process=accelerator.is_main_process), events, \
            StopSignals() as stop:
        events.write("start", step=progress.step, epoch=progress.epoch, max_train_steps=max_steps)
        try:
            # a resume from the final state (killed before the final file was written) only writes that file
            if progress.step < max_steps and not _loop(run, stop):
                state = checkpoints.interrupted(progress)
                raise TrainingInterrupted(progress.step, state, None if state else _last_good_state(cfg))
            final = checkpoints.final(progress)
        except BaseException as e:
            events.write("error", step=progress.step, epoch=progress.epoch, error=type(e).__name__, message=str(e))
            if isinstance(e, MonitorAlertError):
                e.last_good_state = _last_good_state(cfg)
            raise
        events.write("end", step=progress.step, epoch=progress.epoch, **monitor.summary())
    accelerator.end_training()
    dist.shutdown()
    log.info("saved %s", final)
    return TrainRun(final, dit, network, monitor.losses, progress.step, optimizer)


@dataclass
class _Run:
    """Everything the loop uses, built by `run_training`."""

    cfg: TrainConfig
    accelerator: object
    models: Models
    network: torch.nn.Module
    dataset: object
    conditioner: TextConditioner
    caches: Caches
    images: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    checkpoints: Checkpointer
    monitor: Monitor
    events: EventLog
    validator: object
    progress: Progress
    max_steps: int
    epochs: int
    seed: int
    dist: Distributed
    shard: list[int]


def _loop(r: _Run, stop: StopSignals | None = None) -> bool:
    """The epochs: micro-batches → loss → backward; every `gradient_accumulation_steps` micro-batches and at
    each epoch's end an optimizer step, then logging, validation, previews and saves as they fall due.
    Returns False when a stop signal ended it early (after a whole optimizer step)."""
    cfg, progress, monitor, network, optimizer = r.cfg, r.progress, r.monitor, r.network, r.optimizer
    dit = r.models.dit
    params = network.trainable_parameters()
    previews = load_sample_prompts(cfg.sample_prompts) if cfg.sample_prompts else []

    te_model = r.models.text_encoder.model if network.trains_text_encoder else None

    def pause_training(fn):  # previews/validation: eval mode (also for schedule-free optimizers), not step time
        with monitor.paused():
            network.eval()
            if te_model is not None:  # a trained text encoder runs in training mode between them
                te_model.eval()
            set_optimizer_train_mode(optimizer, False)
            try:
                return fn()
            finally:
                set_optimizer_train_mode(optimizer, True)
                network.train()
                if te_model is not None:
                    te_model.train()

    def preview(tag: str) -> None:
        """Previews run after the step's save and never stop training: a failure is logged and recorded as a
        `sample` event with status "failed"; a stop signal cancels them between sampler steps."""
        cancel = None if stop is None else (lambda: stop.requested is not None)
        try:
            paths = pause_training(lambda: render_previews(dit, r.models.text_encoder, r.models.vae, previews,
                                                           Path(cfg.output_dir) / "sample", tag, cfg.output_name,
                                                           cancel=cancel))
        except SamplingCancelled:
            log.warning("step %d: preview %s cancelled (%s)", progress.step, tag, stop.requested if stop else "")
            r.events.write("sample", step=progress.step, epoch=progress.epoch, tag=tag, status="cancelled")
            return
        except Exception as e:  # noqa: BLE001 - a preview is optional; the run and its saves are not
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory preview leaves its blocks cached
            log.error("step %d: preview %s failed, training goes on: %s: %s", progress.step, tag,
                      type(e).__name__, e)
            r.events.write("sample", step=progress.step, epoch=progress.epoch, tag=tag, status="failed",
                           error=type(e).__name__, message=str(e))
            return
        r.events.write("sample", step=progress.step, epoch=progress.epoch, tag=tag, status="written",
                       files=[p.name for p in paths])
        log_images(r.accelerator, "sample", paths, progress.step)

    def validate() -> None:
        logs = pause_training(lambda: r.validator.run(dit, r.conditioner.context, r.accelerator.device))
        log.info("step %d: %s", progress.step, ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
        r.events.write("validation", step=progress.step, epoch=progress.epoch, **logs)
        if r.accelerator.trackers:
            r.accelerator.log(logs, step=progress.step)

    previews = previews if r.dist.is_main else []  # one process renders the previews
    if previews and cfg.sample_at_first and progress.step == 0:
        preview("000000")
    accum, per_epoch, fp16 = cfg.gradient_accumulation_steps, len(r.shard), r.scaler.is_enabled()
    validated_at: int | None = None
    bar = tqdm(total=r.max_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
               disable=progress_disabled(not r.dist.is_main))  # TQDM_DISABLE=1 too (console.py)
    monitor.start()
    for epoch in range(progress.epoch, r.epochs + 1):
        skip = progress.batch_in_epoch if epoch == progress.epoch else 0
        progress.epoch, progress.batch_in_epoch = epoch, skip
        pending = 0  # micro-batches accumulated since the last optimizer step
        batches = epoch_inputs(r.dataset, epoch - 1, r.models.vae, r.caches, r.accelerator.device, r.images, skip=skip,
                               shard=r.shard)
        for batch in monitor.timed(batches):
            context = r.conditioner.context(batch.captions)
            weights = None
            if any(batch.is_reg) and cfg.prior_loss_weight != 1.0:
                weights = torch.tensor([cfg.prior_loss_weight if reg else 1.0 for reg in batch.is_reg])
            seeds = [sample_seed(r.seed, epoch, i, o) for i, o in batch.samples]
            loss = training_step(dit, batch.latents, context, cfg, r.generator, batch.mask, weights, seeds)
            r.scaler.scale(loss / accum).backward()
            monitor.add_micro_batch(r.dist.reduce_mean(loss.detach()), len(batch.captions) * r.dist.world_size)
            progress.batch_in_epoch += 1
            pending += 1
            # kohya/accelerate: step every `accum` micro-batches and at the end of each epoch
            if pending < accum and progress.batch_in_epoch < per_epoch:
                continue
            pending = 0
            r.dist.average_gradients(params)  # data parallel: every process steps with the global mean
            r.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            apply = True
            if monitor.checks_before_update:  # a NaN/Inf loss never reaches the weights (nonfinite_loss_policy)
                apply = monitor.check_update(progress.step + 1, None if fp16 else grad_norm)
            if apply:
                r.scaler.step(optimizer)
            r.scaler.update()
            r.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            norm_logs = None
            if cfg.scale_weight_norms:  # kohya's max-norm after every optimizer step, logged under its names
                keys, mean, top = network.apply_max_norm_regularization(cfg.scale_weight_norms)
                norm_logs = {"max_norm/keys_scaled": keys, "max_norm/max_key_norm": top, "norm/avg_key_norm": mean}
            progress.step += 1
            logs = monitor.end_step(progress.step, epoch, optimizer=optimizer, grad_norm=grad_norm,
                                    extra_lrs=_extra_lrs(optimizer), extra_logs=norm_logs)
            bar.update(1)
            if logs:
                bar.set_postfix(monitor.postfix(), refresh=False)
            if r.validator is not None and r.validator.due_at_step(progress.step):
                validate()
                validated_at = progress.step
            with monitor.paused():  # the save first: a failing preview must never cost the step's files
                r.checkpoints.at_step(progress, last=progress.step >= r.max_steps)
            if previews and cfg.sample_every_n_steps and progress.step % cfg.sample_every_n_steps == 0:
                preview(f"{progress.step:06d}")
            if progress.step >= r.max_steps:
                break
            if stop is not None and r.dist.any_true(stop.requested is not None):
                monitor.flush()
                bar.close()
                return False
        monitor.end_epoch(epoch, progress.step)
        if r.validator is not None and r.validator.due_at_epoch(epoch) and validated_at != progress.step:
            validate()
        with monitor.paused():
            r.checkpoints.at_epoch_end(progress, last=epoch >= r.epochs or progress.step >= r.max_steps)
        if previews and cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            preview(f"e{epoch:06d}")
        if progress.step >= r.max_steps:
            break
        if stop is not None and r.dist.any_true(stop.requested is not None):  # e.g. during the epoch's preview
            monitor.flush()
            bar.close()
            return False
    monitor.flush()
    bar.close()
    return True


def _check_outputs(cfg: TrainConfig, *, resuming: bool, max_steps: int, epochs: int) -> None:
    """The output-exists check (Checkpointer.check_start), before any model is loaded: it needs only the
    output names the run will write."""
    Checkpointer(cfg, None, optimizer=None, scheduler=None, scaler=None, generator=None, snapshot={},
                 metadata=lambda step, epoch: {}).check_start(resuming=resuming, max_steps=max_steps, epochs=epochs)


def _last_good_state(cfg: TrainConfig) -> Path | None:
    """The newest state of this run (states are only written from finite weights), for the stop message."""
    from anima_trainer.train.resume import find_latest_state

    try:
        return find_latest_state(cfg.output_dir, cfg.output_name)
    except ConfigError:
        return None


def _extra_lrs(optimizer) -> dict[str, float]:
    """Adaptive optimizers' effective lr (Prodigy/D-Adaptation d·lr, schedule-free warm-up, Adafactor's relative
    step) as `lr/d*lr/<group>` (kohya's name); nothing for optimizers that step with the scheduled lr."""
    scheduled = {str(g.get("name", f"group{i}")): g.get("lr") for i, g in enumerate(optimizer.param_groups)}
    return {f"d*lr/{name}": v for name, v in effective_lrs(optimizer).items() if v != scheduled.get(name)}
