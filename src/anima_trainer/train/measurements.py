"""Measurements during the run: the validation loss (validate_every_n_*, train/validation.py) and the light
evaluation metrics (eval_every_n_*, evaluation/probe.py), when each falls due, in eval mode, outside step time.

Both run with the network in eval mode (`paused_training`: no LoRA dropout, schedule-free optimizers at their
evaluation point, a trained text encoder in eval mode) and their time is not step time.  Neither touches the
training RNG: validation seeds a forked RNG (evaluation/heldout.py), the evaluation runs inside a forked RNG
too and draws its noise from its own generators, so a run with them on trains bit for bit as one without them
and an exact resume stays exact.  Under data parallelism only the main process measures; in a fine-tune sharded
with FSDP2 every process runs the validation together (each DiT forward is a collective) on the same held-out
batches, and the same loss is logged by the main process alone.

When:
  * validation as before (kohya's rules): after every `validate_every_n_steps`-th optimizer step, before that
    step's save; at an epoch's end (every `validate_every_n_epochs`-th, every epoch when unset), before the
    epoch's save, unless it already ran at that step;
  * evaluation after optimizer step n when `eval_every_n_steps` divides it, and at the end of every
    `eval_every_n_epochs`-th epoch — at most once per step, and always after every save of that step (the step
    file, the epoch file when the step ends an epoch, the final file at the last step), so its "evaluation" event
    follows the "save" event and names the network file holding exactly the measured weights (`path`; null
    when nothing was saved at that step).  A stop signal (SIGINT) between a step and its epoch's end skips an
    evaluation that was waiting for the epoch's save.

The evaluation's probe (`ProbeSet`) is built once after the models: the prompts of `eval_prompts` (default:
the built-in bank), the trigger `eval_trigger` (default: metadata_trigger_phrase), encoded by the run's
`TextConditioner` with the network at multiplier 0 — the base model's encoding, whatever the network's
starting weights.  The held-out loss is measured on the validator's fixed batches (same seed, loss_type,
huber_c) when the run validates.  Logged: `metric_scalars` (`eval/<metric>` and `eval/<metric>_sigma_<σ>`) to
the trackers, and an event `{"type": "evaluation", "step", "epoch", "path", "metrics": {name: SigmaMetric
dict}}`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anima_trainer.evaluation.drift import PROBE_LATENT_SIZE
from anima_trainer.evaluation.heldout import HeldoutBatch
from anima_trainer.evaluation.probe import ProbeSet, light_metrics, metric_scalars
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.evaluation.strength import at_strength
from anima_trainer.train.optim import set_optimizer_train_mode
from anima_trainer.train.training_state import Progress
from anima_trainer.train.validation import Validator

log = logging.getLogger(__name__)

EVENT_TYPE = "evaluation"


@contextlib.contextmanager
def paused_training(monitor, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    text_encoder: torch.nn.Module | None = None) -> Iterator[None]:
    """Previews and measurements: the network (and a trained text encoder) in eval mode, the optimizer at its
    evaluation point (schedule-free), the time not counted as step time; training mode is restored after."""
    with monitor.paused():
        network.eval()
        if text_encoder is not None:  # a trained text encoder runs in training mode between them
            text_encoder.eval()
        set_optimizer_train_mode(optimizer, False)
        try:
            yield
        finally:
            set_optimizer_train_mode(optimizer, True)
            network.train()
            if text_encoder is not None:
                text_encoder.train()


def evaluation_texts(cfg: Any) -> list[str] | None:
    """The probe prompts (None when the run does not evaluate): eval_prompts (kohya prompt syntax, read and
    checked by the sample-prompt loader, whose error names the file and place) or the built-in bank.  Read at
    start-up before any model loads, so a bad file costs no model load."""
    if not cfg.evaluates:
        return None
    from anima_trainer.evaluation.prompt_bank import probe_bank

    return [entry.text for entry in probe_bank(cfg.eval_prompts)]


@dataclass
class Evaluation:
    """The run's light metrics: the fixed probe, the held-out batches (none when the run does not validate) and
    the loss settings, and when they are due."""

    probe: ProbeSet
    heldout: list[HeldoutBatch]
    seed: int = 0
    loss_type: str = "l2"
    huber_c: float = 0.1
    every_n_steps: int | None = None
    every_n_epochs: int | None = None

    def due_at_step(self, step: int) -> bool:
        """True after optimizer step `step` (1-based) when eval_every_n_steps divides it."""
        return bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0

    def due_at_epoch(self, epoch: int) -> bool:
        """True at the end of epoch `epoch` (1-based) when eval_every_n_epochs divides it."""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    def run(self, dit: torch.nn.Module, network: torch.nn.Module, context_fn: Callable[[list[str]], torch.Tensor],
            device: torch.device | str) -> dict[str, SigmaMetric]:
        """`light_metrics` at strength 1 inside a forked RNG (CPU and the device's): the caller's RNG state is
        the same afterwards, whatever the metrics draw."""
        device = torch.device(device)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            return light_metrics(dit, network, self.probe, heldout=self.heldout, context_fn=context_fn,
                                 device=device, seed=self.seed, loss_type=self.loss_type, huber_c=self.huber_c)


@torch.no_grad()
def build_evaluation(cfg: Any, texts: list[str] | None, network: torch.nn.Module,
                     context_fn: Callable[[list[str]], torch.Tensor], validator: Validator | None, *,
                     text_encoder: torch.nn.Module | None = None) -> Evaluation | None:
    """The run's `Evaluation` (None without `texts`, i.e. when the run does not evaluate): the probe encoded
    once by `context_fn` (the loop's `TextConditioner.context`) with the network at multiplier 0 and a trained
    `text_encoder` in eval mode; the validator's batches and loss settings when there is one."""
    if not texts:
        return None
    was_training = text_encoder.training if text_encoder is not None else False
    if text_encoder is not None:
        text_encoder.eval()
    try:
        with at_strength(network, 0.0):
            probe = ProbeSet.encode(texts, context_fn, trigger=cfg.resolved_eval_trigger(),
                                    latent_size=PROBE_LATENT_SIZE)
    finally:
        if text_encoder is not None:
            text_encoder.train(was_training)
    heldout = list(validator.batches) if validator is not None else []
    evaluation = Evaluation(probe, heldout, every_n_steps=cfg.eval_every_n_steps,
                            every_n_epochs=cfg.eval_every_n_epochs,
                            **({"seed": validator.seed, "loss_type": validator.loss_type,
                                "huber_c": validator.huber_c} if validator is not None else {}))
    log.info("evaluation: %d probe prompt(s)%s × %d seed(s), σ = %s%s", len(probe.texts_without),
             f" with and without the trigger {probe.trigger!r}" if probe.has_trigger else "", len(probe.seeds),
             ", ".join(f"{s:g}" for s in probe.sigmas),
             f", held-out loss on {sum(len(b.captions) for b in heldout)} image(s)" if heldout else "")
    return evaluation


class Measurements:
    """When the validation loss and the light metrics run, and where they are logged (see the module doc).
    `pause()` gives the loop's `paused_training`; `saved(step)` the network file the run saved at optimizer
    step `step`, or None."""

    def __init__(self, *, validator: Validator | None, evaluation: Evaluation | None, dit: torch.nn.Module,
                 network: torch.nn.Module, context_fn: Callable[[list[str]], torch.Tensor],
                 device: torch.device | str, events, accelerator, pause: Callable[[], Any],
                 saved: Callable[[int], Path | None]) -> None:
        self.validator, self.evaluation = validator, evaluation
        self.dit, self.network, self.context_fn, self.device = dit, network, context_fn, device
        self.events, self.accelerator, self.pause, self.saved = events, accelerator, pause, saved
        self.validated_at: int | None = None
        self.evaluated_at: int | None = None
        self._eval_due = False  # the evaluation of this step waits for the step's saves

    # --- the loop's hooks, in the order it calls them ----------------------------------------------------------
    def after_step(self, progress: Progress) -> None:
        """After an optimizer step, before its save: validation when due; the evaluation is noted when due."""
        if self.validator is not None and self.validator.due_at_step(progress.step):
            self._validate(progress)
            self.validated_at = progress.step
        if self.evaluation is not None and self.evaluation.due_at_step(progress.step):
            self._eval_due = True

    def after_step_save(self, progress: Progress, *, epoch_ends: bool, last: bool) -> None:
        """After the step's save: the evaluation, unless the epoch's save (`epoch_ends`) or the final one
        (`last`) is still to come at this step."""
        if not (epoch_ends or last):
            self._evaluate_if_due(progress)

    def at_epoch_end(self, progress: Progress, epoch: int) -> None:
        """At an epoch's end, before its save: validation when due (unless it ran at this step); the evaluation
        is noted when due."""
        if self.validator is not None and self.validator.due_at_epoch(epoch) and self.validated_at != progress.step:
            self._validate(progress)
            self.validated_at = progress.step
        if self.evaluation is not None and self.evaluation.due_at_epoch(epoch):
            self._eval_due = True

    def after_epoch_save(self, progress: Progress, *, last: bool) -> None:
        """After the epoch's save: the evaluation noted at this step (the final save is still to come at the
        last step)."""
        if not last:
            self._evaluate_if_due(progress)

    def after_final_save(self, progress: Progress) -> None:
        """After the final file: the evaluation noted at the last step."""
        self._evaluate_if_due(progress)

    # --- the measurements ------------------------------------------------------------------------------------
    def _validate(self, progress: Progress) -> None:
        with self.pause():
            logs = self.validator.run(self.dit, self.context_fn, self.device)
        log.info("step %d: %s", progress.step, ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
        self.events.write("validation", step=progress.step, epoch=progress.epoch, **logs)
        if self.accelerator.trackers:
            self.accelerator.log(logs, step=progress.step)

    def _evaluate_if_due(self, progress: Progress) -> None:
        if not self._eval_due:
            return
        self._eval_due = False
        if self.evaluated_at == progress.step:  # never twice at one step
            return
        self.evaluated_at = progress.step
        with self.pause():
            metrics = self.evaluation.run(self.dit, self.network, self.context_fn, self.device)
        scalars = metric_scalars(metrics)
        log.info("step %d: %s", progress.step, ", ".join(f"eval/{name} {m.overall:.4g}"
                                                         for name, m in metrics.items()))
        path = self.saved(progress.step)
        self.events.write(EVENT_TYPE, step=progress.step, epoch=progress.epoch,
                          path=None if path is None else str(path),
                          metrics={name: m.as_dict() for name, m in metrics.items()})
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=progress.step)
