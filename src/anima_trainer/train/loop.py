"""The training loop: batch → latents + context → noise and σ → DiT with injected LoRA → loss → step → save.

Read it like nanoGPT's train.py: `run_training()` sets up (train/setup.py: seed, tokenizers, dataset, run plan,
optimizer; then models, network, resume, logging) and `_loop()` runs the objective (train/flow.py
`training_step`) until the plan's `max_steps`.  Inputs and caches: train/inputs.py; saves: train/saving.py;
resume checks: train/resume.py (state folders: train/training_state.py); metrics and alerts: train/monitor.py;
the validation loss and the light evaluation metrics, and when they run: train/measurements.py; the EMA of the
weights (ema_decay): train/ema.py.  Nothing here writes onto the config or the dataset: derived values live in
the RunPlan.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.console import progress_disabled
from anima_trainer.data.dataset import AnimaDataset, Batch
from anima_trainer.data.loader import run_batches
from anima_trainer.data.scan import write_dataset_report
from anima_trainer.models.base_models import BaseModels
from anima_trainer.models.compile import image_tokens
from anima_trainer.networks.base import AdapterNetwork
from anima_trainer.networks.merge import merge_base_weights
from anima_trainer.sample.generate import render_previews
from anima_trainer.sample.prompts import load_sample_prompts
from anima_trainer.sample.sampler import SamplingCancelled
from anima_trainer.train.budget import MAX_TEXT_TOKENS, check_before_models, check_text_tokens
from anima_trainer.train.distributed import Distributed, check_state_world, needs_cpu_backend, read_rank_rng
from anima_trainer.train.ema import NetworkEMA, build_ema, resume_ema
from anima_trainer.train.events import EventLog, config_for_log, events_path
from anima_trainer.train.file_metadata import RunMetadata
from anima_trainer.train.flow import (
    Preservation,
    build_preservation,
    preservation_texts,
    sample_seed,
    training_step,
)
from anima_trainer.train.grad_sync import GradientSync
from anima_trainer.train.inputs import Caches, TextConditioner, epoch_inputs, prepare_caches, report_long_captions
from anima_trainer.train.lock import RunLock
from anima_trainer.train.measurements import Measurements, build_evaluation, evaluation_texts, paused_training
from anima_trainer.train.model_setup import (
    WEIGHT_DTYPES,
    first_step_notice,
    kohya_text_encoder_notice,
    load_models,
    prepare_dit,
    prepare_text_encoder,
    training_summary,
)
from anima_trainer.train.monitor import Monitor, MonitorAlertError
from anima_trainer.train.optim import effective_lrs, set_optimizer_train_mode
from anima_trainer.train.resume import (
    apply_optimizer_args,
    check_resume,
    rebuild_schedule,
    resolve_resume,
    schedule_fields,
    snapshot_fields,
)
from anima_trainer.train.saving import Saver
from anima_trainer.train.schedulers import build_scheduler, describe_schedule, schedule_options
from anima_trainer.train.sharded_run import (ShardedFinetune, ShardedGradientSync, check_launch, preview_roles,
                                             start_sharding)
from anima_trainer.train.setup import (
    Optimization,
    RunPlan,
    check_trained_llm_adapter_not_cached,
    run_seed,
    setup_optimization,
    setup_run,
)
from anima_trainer.train.setup import total_steps as total_steps  # tests/config, test_distributed use it here
from anima_trainer.train.tracking import log_images, resolve_tracking, start_tensorboard, start_trackers
from anima_trainer.train.training_state import (
    Progress,
    find_latest_state,
    load_state,
    remove_stale_temporaries,
    restore_rng,
)
from anima_trainer.train.validation import build_validator
from anima_trainer.train.vram_plan import llm_adapter_trained, apply_plan

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    ema: NetworkEMA | None = None


@dataclass
class RunModels:
    """What the step runs: the frozen base (DiT, text encoder, VAE), the trained network, captions → context,
    the EMA of the network's weights (None unless ema_decay) and the preservation loss (None unless
    preservation_loss_weight)."""

    base: BaseModels
    network: AdapterNetwork
    conditioner: TextConditioner
    ema: NetworkEMA | None = None
    preservation: Preservation | None = None


@dataclass
class RunData:
    """Where the batches come from: the dataset, its caches, the image stream (None with a latent cache) and
    this process's share of every epoch's batches."""

    dataset: AnimaDataset
    caches: Caches
    images: Iterator[Batch] | None
    shard: list[int]


@dataclass
class RunIO:
    """What the run writes and reports through: processes, saves and states, metrics, events, and the
    measurements during the run (validation, evaluation: train/measurements.py)."""

    accelerator: Accelerator
    dist: Distributed
    grad_sync: GradientSync | ShardedGradientSync  # the step's gradient average, overlapped with its last backward
    saver: Saver
    monitor: Monitor
    events: EventLog
    measurements: Measurements
    sharding: ShardedFinetune | None = None  # a fine-tune sharded by FSDP2 (train/sharded_run.py)


@dataclass
class _Run:
    """Everything the loop uses, built by `run_training`, in named groups."""

    cfg: TrainConfig
    plan: RunPlan
    models: RunModels
    data: RunData
    optim: Optimization
    io: RunIO
    progress: Progress


def train(cfg: TrainConfig) -> Path:
    """Run a whole LoRA training from a validated config; returns the final network file."""
    return run_training(cfg).final_path


def run_training(cfg: TrainConfig) -> TrainRun:
    """The loop behind `train`, returning the live model too (tests, notebooks).  The run holds the lock of
    its output_dir/output_name (train/lock.py) from before it writes anything until it ends, however it ends."""
    with contextlib.ExitStack() as cleanup:
        return _run_training(cfg, cleanup)


def _run_training(cfg: TrainConfig, cleanup: contextlib.ExitStack) -> TrainRun:
    from accelerate import Accelerator  # heavy: imported when a run starts

    seed = run_seed(cfg)
    torch.manual_seed(seed)
    tracking = resolve_tracking(cfg)
    accelerator = Accelerator(mixed_precision="no", cpu=needs_cpu_backend(), **tracking.accelerator_kwargs())
    cfg = check_launch(cfg, accelerator)  # FSDP only for a fine-tune, sharded by the trainer (train/sharded_run.py)
    dist = Distributed.from_accelerator(accelerator, finetune=cfg.finetunes)
    # Start-up, before any model file is opened (issue 14 item 4): the options were checked by TrainConfig;
    # the optimizer and schedule against their classes (check_optimization) → tokenizers → the output-exists
    # check (final file, states) → the dataset scan, all problems at once (train/setup.py, shared with the
    # `cache` command) → the run lock and the output-exists check of every file the run will write → the
    # dataset report file.
    setup = setup_run(cfg, dist=dist, before_scan=None if cfg.resume else lambda c: _check_outputs(c, None))
    cfg, dataset, plan, run_notices = setup.cfg, setup.dataset, setup.plan, setup.notices
    max_steps, epochs = plan.max_steps, plan.epochs
    if dist.is_main:
        for line in run_notices:
            log.warning("notice: %s", line)
    with dist.main_first():  # one run per output_name: locked before any file of it is written or cleaned up
        if dist.is_main:
            cleanup.enter_context(RunLock(cfg.output_dir, cfg.output_name))
            remove_stale_temporaries(cfg.output_dir, cfg.output_name)  # may put back a state being replaced
    resume_from = resolve_resume(cfg)
    if resume_from is None:  # a resumed run is checked after its state (a finished run's final file is fine)
        _check_outputs(cfg, plan)
    if dist.is_main:
        write_dataset_report(dataset, setup.report_path)
    device = accelerator.device
    dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    cfg = apply_plan(cfg, dataset, device, llm_adapter_trained=llm_adapter_trained(cfg))  # vram_budget_gb
    prompts = check_before_models(cfg, dataset, device)  # sizes, memory, prompt file: before any model loads
    preservation_prompts = preservation_texts(cfg)  # read (and checked) before the models load, too
    probe_prompts = evaluation_texts(cfg) if dist.is_main else None  # likewise (eval_prompts)
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
    sharding = start_sharding(cfg, dit, network, dist, device)  # None unless a fine-tune sharded by FSDP2
    network = sharding.network if sharding else network  # the selection again, over the sharded parameters
    if dist.enabled:
        torch.manual_seed(dist.seed(seed))  # dropout differs per process
    optim = setup_optimization(cfg, network, device, dtype, max_steps)
    optimizer = optim.optimizer
    ema = build_ema(cfg, network)  # after full_bf16's cast; fp32 shadows of the trained tensors only
    if cfg.scale_weight_norms and (note := network.max_norm_notice()):
        log.warning("%s", note)
    shard = dist.shard(len(dataset))  # this process's batches of every epoch
    snapshot = snapshot_fields(cfg, network, dataset)
    snapshot["lr_schedule"] = schedule_fields(cfg, optimizer, max_steps)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    resume_check = None
    if resume_from is not None:  # fail fast: before caching, and before any file is touched
        resume_check = check_resume(resume_from, cfg, snapshot, max_steps)
        check_state_world(resume_from, dist.world_size)
        if resume_check.finished is not None:  # already complete (killed after its last write): nothing to write
            progress = load_state(resume_from, network=network, optimizer=optimizer, scheduler=optim.scheduler,
                                  scaler=optim.scaler, strict_optimizer=False,
                                  sharded=sharding.loader(optimizer, ema) if sharding else None)
            dist.shutdown()
            return TrainRun(resume_check.finished, dit, network, [], progress.step, optimizer)
    started = time.time()
    events = EventLog(events_path(cfg.output_dir, cfg.output_name) if accelerator.is_main_process else None,
                      run=tracking.run_name)
    saver = Saver(
        cfg, network, optimizer=optimizer, scheduler=optim.scheduler, scaler=optim.scaler,
        save_every_n_epochs=plan.save_every_n_epochs, snapshot=snapshot, events=events, dist=dist,
        metadata=RunMetadata(cfg, dataset, max_steps=max_steps, epochs=epochs, started=started,
                             num_processes=dist.world_size),
        before_save=lambda: set_optimizer_train_mode(optimizer, False),
        after_save=lambda: set_optimizer_train_mode(optimizer, True), ema=ema, sharding=sharding)
    if resume_from is not None:
        saver.check_start(resuming=True, max_steps=max_steps, epochs=epochs)
    events.write("config", config=config_for_log(cfg))
    # issue 14: one start-up notice per option accepted without effect (config/kohya_options.py), and the schedule
    sched_line, sched_notice = describe_schedule(optim.scheduler, cfg.lr_scheduler_type or cfg.lr_scheduler,
                                                 max_steps, optim.lr, min_lr_ratio=cfg.lr_scheduler_min_lr_ratio)
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
    report_long_captions(dataset, models.text_encoder, max_tokens=MAX_TEXT_TOKENS)
    check_text_tokens(prompts, models.text_encoder)
    check_trained_llm_adapter_not_cached(cfg, network.trains_llm_adapter)
    # captions that change every step are not memoised (the memo would grow without bound)
    conditioner = TextConditioner(dit, models.text_encoder,
                                  max_cached=100_000 if dataset.captions_are_static else 0,
                                  cache_contexts=cfg.cache_llm_adapter_outputs,
                                  train_llm_adapter=network.trains_llm_adapter,
                                  train_text_encoder=network.trains_text_encoder)
    caches = prepare_caches(cfg, dataset, models, conditioner, dist=dist)
    if caches.variants is not None:
        conditioner.max_cached = 100_000  # a finite set of captions now: memoise them
    validator = build_validator(cfg, dataset, models.vae.encode, device, seed) if dist.is_main or sharding else None
    preservation = build_preservation(cfg, preservation_prompts, dit, network, conditioner.context,
                                      seed)  # encoded once
    evaluation = build_evaluation(cfg, probe_prompts, network, conditioner.context, validator,  # encoded once
                                  text_encoder=models.text_encoder.model if network.trains_text_encoder else None)
    progress = Progress()
    if resume_from is not None and resume_check is not None:
        progress = load_state(resume_from, network=network, optimizer=optimizer, scheduler=optim.scheduler,
                              scaler=optim.scaler, restore_scheduler=not resume_check.rebuild_schedule,
                              strict_optimizer=not cfg.optimizer_mismatch_ignored(),
                              fresh_optimizer=resume_check.fresh_optimizer,
                              sharded=sharding.loader(optimizer, ema) if sharding else None)
        apply_optimizer_args(optimizer, fresh_groups, resume_check.optimizer_args)
        resume_ema(ema, resume_from)  # before `saver.resumed`, which may write the state's (EMA) files
        if resume_check.rebuild_schedule:  # a changed lr or schedule: the current settings from the resume point on
            optim.scheduler = saver.scheduler = rebuild_schedule(
                optimizer, [g["lr"] for g in fresh_groups],
                lambda: build_scheduler(optimizer, cfg.lr_scheduler, max_steps, **schedule_options(cfg)), progress.step)
        rng = read_rank_rng(resume_from, dist.rank, dist.world_size)
        if rng is not None:
            restore_rng(rng)
        at_epoch_end = progress.batch_in_epoch >= len(shard)
        saver.resumed(resume_from, progress, at_epoch_end=at_epoch_end, max_steps=max_steps)
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
                                  steps_per_epoch=math.ceil(len(shard) / plan.accumulation),
                                  events=events, log_fn=accelerator.log if tracking.log_with else None,
                                  first_step_notice=first_step_notice(cfg, dit))  # compiled: the wait, the way out
    log.info("training %s, %d images, %d batches/epoch, %d steps, %d epochs", training_summary(cfg, network),
             dataset.num_images, len(dataset), max_steps, epochs)
    te_model = models.text_encoder.model if network.trains_text_encoder else None
    measurements = Measurements(validator=validator, evaluation=evaluation, dit=dit, network=network,
                                context_fn=conditioner.context, device=device, events=events, accelerator=accelerator,
                                pause=lambda: paused_training(monitor, network, optimizer, te_model),
                                saved=saver.network_saved_at)
    run = _Run(cfg=cfg, plan=plan, progress=progress, optim=optim,
               models=RunModels(base=models, network=network, conditioner=conditioner, ema=ema,
                                 preservation=preservation),
               data=RunData(dataset=dataset, caches=caches, images=images, shard=shard),
               io=RunIO(sharding=sharding, accelerator=accelerator, dist=dist, saver=saver, monitor=monitor,
                        events=events, measurements=measurements,
                        grad_sync=cleanup.enter_context(sharding.gradient_sync() if sharding
                            else dist.gradient_sync(network.trainable_parameters(), cfg.ddp_bucket_cap_mb))))
    with start_tensorboard(cfg, tracking, is_main_process=accelerator.is_main_process), events, \
            StopSignals() as stop:
        events.write("start", step=progress.step, epoch=progress.epoch, max_train_steps=max_steps)
        try:
            # a resume from the final state (killed before the final file was written) only writes that file
            if progress.step < max_steps and not _loop(run, stop):
                state = saver.interrupted(progress)
                raise TrainingInterrupted(progress.step, state, None if state else _last_good_state(cfg))
            final = saver.final(progress)
            measurements.after_final_save(progress)  # an evaluation due at the last step names the final file
        except BaseException as e:
            events.write("error", step=progress.step, epoch=progress.epoch, error=type(e).__name__, message=str(e))
            if isinstance(e, MonitorAlertError):
                e.last_good_state = _last_good_state(cfg)
            raise
        events.write("end", step=progress.step, epoch=progress.epoch, **monitor.summary())
    accelerator.end_training()
    dist.shutdown()
    log.info("saved %s", final)
    return TrainRun(final, dit, network, monitor.losses, progress.step, optimizer, ema)


def _loop(r: _Run, stop: StopSignals | None = None) -> bool:
    """The epochs: micro-batches → loss → backward; every `gradient_accumulation_steps` micro-batches and at
    each epoch's end an optimizer step, then logging, measurements (validation, evaluation), saves and previews
    as they fall due.
    Returns False when a stop signal ended it early (after a whole optimizer step)."""
    cfg, plan, progress = r.cfg, r.plan, r.progress
    base, network, conditioner, ema = r.models.base, r.models.network, r.models.conditioner, r.models.ema
    optimizer, scaler = r.optim.optimizer, r.optim.scaler
    dist, monitor, events, measure = r.io.dist, r.io.monitor, r.io.events, r.io.measurements
    dit = base.dit
    params = network.trainable_parameters()
    previews = load_sample_prompts(cfg.sample_prompts) if cfg.sample_prompts else []

    def preview(tag: str) -> None:
        """Previews run after the step's save and never stop training: a failure is logged and recorded as a
        `sample` event with status "failed"; a stop signal cancels them between sampler steps."""
        def render() -> list[Path]:  # sample_use_ema: the EMA weights swapped in, the training ones put back
            with measure.pause(), ema.swapped() if ema is not None and cfg.sample_use_ema else contextlib.nullcontext():
                return render_previews(dit, base.text_encoder, base.vae, previews, Path(cfg.output_dir) / "sample",
                                       tag, cfg.output_name, cancel=cancel, writes=writes)
        try:
            paths = render()
        except SamplingCancelled:
            log.warning("step %d: preview %s cancelled (%s)", progress.step, tag, stop.requested if stop else "")
            events.write("sample", step=progress.step, epoch=progress.epoch, tag=tag, status="cancelled")
            return
        except Exception as e:  # noqa: BLE001 - a preview is optional; the run and its saves are not
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory preview leaves its blocks cached
            log.error("step %d: preview %s failed, training goes on: %s: %s", progress.step, tag,
                      type(e).__name__, e)
            events.write("sample", step=progress.step, epoch=progress.epoch, tag=tag, status="failed",
                         error=type(e).__name__, message=str(e))
            return
        events.write("sample", step=progress.step, epoch=progress.epoch, tag=tag, status="written",
                     files=[p.name for p in paths])
        log_images(r.io.accelerator, "sample", paths, progress.step)

    renders, writes, cancel = preview_roles(dist, r.io.sharding, stop)  # sharded: all render, the main one writes
    previews = previews if renders else []
    if previews and cfg.sample_at_first and progress.step == 0:
        preview("000000")
    accum, per_epoch, fp16 = plan.accumulation, len(r.data.shard), scaler.is_enabled()
    fused = getattr(optimizer, "fused", False)  # fused_backward_pass: each parameter steps inside backward
    bar = tqdm(total=plan.max_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
               disable=progress_disabled(not dist.is_main))  # TQDM_DISABLE=1 too (console.py)
    monitor.start()
    for epoch in range(progress.epoch, plan.epochs + 1):
        skip = progress.batch_in_epoch if epoch == progress.epoch else 0
        progress.epoch, progress.batch_in_epoch = epoch, skip
        pending = 0  # micro-batches accumulated since the last optimizer step
        batches = epoch_inputs(r.data.dataset, epoch - 1, base.vae, r.data.caches, r.io.accelerator.device,
                               r.data.images, skip=skip, shard=r.data.shard)
        for batch in monitor.timed(batches):
            context = conditioner.context(batch.captions)
            weights = None
            if any(batch.is_reg) and cfg.prior_loss_weight != 1.0:
                weights = torch.tensor([cfg.prior_loss_weight if reg else 1.0 for reg in batch.is_reg])
            seeds = [sample_seed(plan.seed, epoch, i, o) for i, o in batch.samples]
            extra = None if r.models.preservation is None else r.models.preservation.for_step(
                progress.step + 1, pending, monitor.add_preservation)  # the step's x_σ, σ (train/flow.py)
            loss = training_step(dit, batch.latents, context, cfg, seeds, mask=batch.mask, sample_weights=weights,
                                 **({"extra_loss": extra} if extra is not None else {}))  # off: the call as before
            # kohya/accelerate: step every `accum` micro-batches and at the end of each epoch
            steps = pending + 1 >= accum or progress.batch_in_epoch + 1 >= per_epoch
            monitor.add_micro_batch(dist.reduce_mean(loss.detach()), len(batch.captions) * dist.world_size)
            # fused: the update happens during backward, so a NaN/Inf loss skips the backward (train/fused_backward.py)
            apply = not (fused and monitor.checks_before_update) or monitor.check_update(progress.step + 1)
            with r.io.grad_sync.backward(last=steps):  # data parallel: the step's last backward all-reduces
                if apply:
                    scaler.scale(loss / accum).backward()
            progress.batch_in_epoch += 1
            pending += 1
            if not steps:
                continue
            pending = 0
            r.io.grad_sync.finish()  # every process steps with the global mean (before unscaling and clipping)
            scaler.unscale_(optimizer)
            clip = cfg.max_grad_norm and not fused  # fused: each gradient was clipped on its own (grad_norm None)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if clip else None
            if monitor.checks_before_update and not fused:  # a NaN/Inf loss never reaches the weights
                apply = monitor.check_update(progress.step + 1, None if fp16 else grad_norm)
            if apply:
                scaler.step(optimizer)
            scaler.update()
            r.optim.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            norm_logs = None
            if cfg.scale_weight_norms:  # kohya's max-norm after every optimizer step, logged under its names
                keys, mean, top = network.apply_max_norm_regularization(cfg.scale_weight_norms)
                norm_logs = {"max_norm/keys_scaled": keys, "max_norm/max_key_norm": top, "norm/avg_key_norm": mean}
            if ema is not None and apply:  # the weights as the step leaves them (after max-norm)
                ema.update()
            progress.step += 1
            logs = monitor.end_step(progress.step, epoch, optimizer=optimizer, grad_norm=grad_norm,
                                    extra_lrs=_extra_lrs(optimizer), extra_logs=norm_logs)
            bar.update(1)
            if logs:
                bar.set_postfix(monitor.postfix(), refresh=False)
            measure.after_step(progress)  # validation before the save (as kohya); the evaluation after it
            with monitor.paused():  # the save first: a failing preview must never cost the step's files
                r.io.saver.at_step(progress, last=progress.step >= plan.max_steps)
            measure.after_step_save(progress, epoch_ends=progress.batch_in_epoch >= per_epoch,
                                    last=progress.step >= plan.max_steps)
            if previews and cfg.sample_every_n_steps and progress.step % cfg.sample_every_n_steps == 0:
                preview(f"{progress.step:06d}")
            if progress.step >= plan.max_steps:
                break
            if stop is not None and dist.any_true(stop.requested is not None):
                monitor.flush()
                bar.close()
                return False
        monitor.end_epoch(epoch, progress.step)
        measure.at_epoch_end(progress, epoch)
        last = epoch >= plan.epochs or progress.step >= plan.max_steps
        with monitor.paused():
            r.io.saver.at_epoch_end(progress, last=last)
        measure.after_epoch_save(progress, last=last)
        if previews and cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            preview(f"e{epoch:06d}")
        if progress.step >= plan.max_steps:
            break
        if stop is not None and dist.any_true(stop.requested is not None):  # e.g. during the epoch's preview
            monitor.flush()
            bar.close()
            return False
    monitor.flush()
    bar.close()
    return True


def _check_outputs(cfg: TrainConfig, plan: RunPlan | None) -> None:
    """The output-exists check (Saver.check_start), before any model is loaded: it needs only the
    output names the run will write (`plan` None: before the scan, the run's length is unknown)."""
    Saver(cfg, None, optimizer=None, scheduler=None, scaler=None, snapshot={}, metadata=lambda step, epoch: {},
                 save_every_n_epochs=plan.save_every_n_epochs if plan else cfg.save_every_n_epochs,
                 ).check_start(resuming=False, max_steps=plan.max_steps if plan else 0,
                               epochs=plan.epochs if plan else 0)


def _last_good_state(cfg: TrainConfig) -> Path | None:
    """The newest state of this run (states are only written from finite weights), for the stop message."""
    try:
        return find_latest_state(cfg.output_dir, cfg.output_name)
    except ConfigError:
        return None


def _extra_lrs(optimizer) -> dict[str, float]:
    """Adaptive optimizers' effective lr (Prodigy/D-Adaptation d·lr, schedule-free warm-up, Adafactor's relative
    step) as `lr/d*lr/<group>` (kohya's name); nothing for optimizers that step with the scheduled lr."""
    scheduled = {str(g.get("name", f"group{i}")): g.get("lr") for i, g in enumerate(optimizer.param_groups)}
    return {f"d*lr/{name}": v for name, v in effective_lrs(optimizer).items() if v != scheduled.get(name)}
