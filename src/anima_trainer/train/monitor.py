"""Per-step training metrics and alerts, without a host-device sync on the steps that are not logged.

Why: `loss.item()` stalls the CPU until the GPU has finished the step, so the next step's kernels cannot be
queued meanwhile.  The Monitor keeps each step's loss and grad norm as device tensors and reads all pending ones
with one transfer on logging steps (every `log_every_n_steps`), at epoch ends and at the last step; the
non-finite, spike and average bookkeeping then runs over them in step order, so no step is missed.

The exception is `nonfinite_loss_policy` = skip_step (the default) or raise: whether the optimizer may apply an
update must be known before `optimizer.step()`, so `check_update` reads the loss then, one scalar per step.
That is the price of never applying a NaN update (it would turn every LoRA weight into NaN for good); `warn`
avoids the sync but can only report the damage afterwards.

Alerts (`alert/<name>` scalars, 1.0 on the logged step that covers the firing step, else 0.0): `nonfinite_loss`,
`nonfinite_grad`, `loss_spike` (loss > ratio × median of the last finite losses; never fatal: single-sample
flow-matching losses swing several-fold with σ), `memory_near_limit` (peak *allocated* / card memory ≥ ratio;
reserved memory is routinely near the card size because of the caching allocator, so it would cry wolf) and
`data_starvation` (the steps waited for data a large share of their time; never fatal).  Each alert warns on the
console and in the event log at most once per `warn_every_n_steps` per name, with a count of repeats.  The first
firing of an alert is always shown, and so is every new non-finite episode (a NaN/Inf after a finite step):
only repeats are rate-limited (a NaN that keeps coming back every step, a memory level that stays high).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from anima_trainer.tensor_files import NonFiniteError, nonfinite_tensors

log = logging.getLogger(__name__)
ALERTS = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "memory_near_limit", "data_starvation")
NONFINITE_ALERTS = ("nonfinite_loss", "nonfinite_grad")
MB = 1024 * 1024


class MonitorAlertError(RuntimeError):
    """The run was stopped by a monitor alert (policy `raise`, or too many non-finite steps in a row)."""

    def __init__(self, step: int, reasons: list[str]) -> None:
        self.step, self.reasons = step, list(reasons)
        super().__init__(f"monitor stopped training at step {step}: " + "; ".join(reasons))


class NonFiniteLossError(MonitorAlertError):
    """A non-finite loss or gradient under nonfinite_loss_policy `raise`, or `max_consecutive_nonfinite` skips."""


class NonFiniteStateError(NonFiniteError):
    """A training state about to be saved holds NaN/Inf (weights or optimizer moments); nothing is written.
    One family with fileio's NonFiniteError, which the write path raises for files."""


# --- saved-state guard ----------------------------------------------------------------------------------------
def is_finite_state(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> bool:
    """True when every tensor is free of NaN/Inf: call before writing a network file or state."""
    if not isinstance(tensors, Mapping):
        tensors = {str(i): t for i, t in enumerate(tensors)}
    return not nonfinite_tensors(tensors)


def check_finite_state(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteStateError naming `what` and the bad tensors, so a NaN never reaches a saved file."""
    bad = nonfinite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteStateError(f"{what}: not saved, {len(bad)} tensors hold NaN/Inf ({shown})")


# --- memory -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryStats:
    """GPU memory in bytes: allocated now, reserved by the caching allocator, peak allocated, card total."""

    allocated: int
    reserved: int
    peak_allocated: int
    total: int


def cuda_memory_reader(device: torch.device) -> Callable[[], MemoryStats]:
    """Reads the caching allocator's counters (host-side, no sync)."""
    total: list[int] = []

    def read() -> MemoryStats:
        if not total:
            total.append(torch.cuda.get_device_properties(device).total_memory)
        return MemoryStats(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device),
                           torch.cuda.max_memory_allocated(device), total[0])

    return read


def _whole(value: Any) -> Any:
    """A DTensor (the clipped gradient norm of a DiT sharded with FSDP: each process holds a partial norm) as a
    plain tensor, anything else as it is.  A collective for a DTensor: `check_update` and `end_step` run in every
    process at the same point, so they convert it on entry, before anything reads it on one process only."""
    whole = getattr(value, "full_tensor", None)
    return whole() if whole is not None else value


def _read_scalars(tensors: list[torch.Tensor]) -> list[float]:
    """Scalar tensors → floats with one device transfer per device (order kept)."""
    if not tensors:
        return []
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return torch.stack([t.detach().reshape(()).float() for t in tensors]).tolist()
    return [float(t.detach().reshape(()).float().cpu()) for t in tensors]


def lr_logs(optimizer: Any) -> dict[str, Any]:
    """`lr/<group name>` of every param group (groups without a "name" are `group<i>`); values as stored."""
    return {f"lr/{g.get('name', f'group{i}')}": g["lr"] for i, g in enumerate(optimizer.param_groups)}


@dataclass
class _Step:
    step: int
    epoch: int
    loss: Any  # device tensor until read, then float
    grad_norm: Any
    lrs: dict[str, Any]
    skipped: bool = False
    reported: bool = False  # non-finite values already reported by check_update


@dataclass
class _Alert:
    count: int = 0  # times fired this run
    active: bool = False  # fired since the last logged step
    last_warned: int | None = None
    suppressed: int = 0  # firings not warned about since last_warned
    last_fired: int | None = None  # step of the latest firing (a firing at the next step is a repeat)


@dataclass
class _Interval:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    wait: float = 0.0


class Monitor:
    """Collects per-step metrics, fires alerts and logs scalars; the training loop calls it (see docs/training.md,
    "Monitoring and logs").  `log_fn(logs, step=step)` is where scalars go (`accelerator.log`)."""

    def __init__(self, *, log_every_n_steps: int = 1, max_steps: int | None = None,
                 alert_policy: str = "warn", nonfinite_policy: str = "skip_step", max_consecutive_nonfinite: int = 5,
                 spike_ratio: float = 3.0, spike_window: int = 8, spike_min_history: int = 5,
                 memory_warn_ratio: float = 0.95, memory_reader: Callable[[], MemoryStats] | None = None,
                 average_window: int | None = None, starvation_ratio: float = 0.3, starvation_window: int = 20,
                 warmup_steps: int = 5, summary_every_n_steps: int = 100, warn_every_n_steps: int = 100,
                 starvation_hint: str = "raise max_data_loader_n_workers or cache the latents (cache_latents)",
                 events: Any = None, log_fn: Callable[..., None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, first_step_notice: str | None = None) -> None:
        if alert_policy not in ("warn", "raise"):
            raise ValueError(f"alert_policy must be warn or raise, got {alert_policy!r}")
        if nonfinite_policy not in ("warn", "raise", "skip_step"):
            raise ValueError(f"nonfinite_policy must be warn, raise or skip_step, got {nonfinite_policy!r}")
        self.log_every_n_steps, self.max_steps = log_every_n_steps, max_steps
        self.alert_policy, self.nonfinite_policy = alert_policy, nonfinite_policy
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.spike_ratio, self.spike_min_history = spike_ratio, spike_min_history
        self.memory_warn_ratio, self.memory_reader = memory_warn_ratio, memory_reader
        self.starvation_ratio, self.starvation_window = starvation_ratio, starvation_window
        self.warmup_steps, self.summary_every_n_steps = warmup_steps, summary_every_n_steps
        self.warn_every_n_steps, self.starvation_hint = warn_every_n_steps, starvation_hint
        self.events, self.log_fn, self.clock = events, log_fn, clock
        self.first_step_notice = first_step_notice  # "first step N s, <notice>" is logged (compiled blocks)
        self.losses: list[float] = []  # every step's loss, in order (complete after flush())
        self.skipped_steps = 0
        self.alerts = {name: _Alert() for name in ALERTS}
        self.last_logs: dict[str, float] = {}
        self._history: deque[float] = deque(maxlen=spike_window)
        self._window: deque[float] = deque(maxlen=average_window)  # kohya: the last epoch's worth of steps
        self._epochs: dict[int, list[float]] = {}  # epoch → [sum, count] of finite losses
        self._timing: deque[tuple[float, float]] = deque(maxlen=starvation_window)  # (data wait, step time)
        self._pending: list[_Step] = []
        self._acc: torch.Tensor | None = None
        self._micro = self._step_samples = 0
        self._preservation: torch.Tensor | None = None  # the step's summed preservation terms (add_preservation)
        self._preservation_count = 0
        self._step_wait = self._paused = 0.0
        self._checked: tuple[int, float, float | None, bool] | None = None
        self._consecutive = 0
        self._steps_seen = 0
        self._last_summary = 0
        self._interval = _Interval()
        self._memory_failed = False
        self._memory: MemoryStats | None = None
        self._fatal: list[str] = []
        self._mark = clock()

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, *, max_steps: int | None = None,
                    steps_per_epoch: int | None = None, events: Any = None,
                    log_fn: Callable[..., None] | None = None, **overrides: Any) -> Monitor:
        """A Monitor with the TrainConfig's monitoring settings; memory metrics only on CUDA."""
        reader = cuda_memory_reader(device) if cfg.monitor_memory and device.type == "cuda" else None
        kw: dict[str, Any] = dict(
            log_every_n_steps=cfg.log_every_n_steps, max_steps=max_steps, alert_policy=cfg.monitor_alert_policy,
            nonfinite_policy=cfg.nonfinite_loss_policy or "skip_step",
            max_consecutive_nonfinite=cfg.max_consecutive_nonfinite, spike_ratio=cfg.loss_spike_ratio,
            memory_warn_ratio=cfg.memory_warn_ratio, memory_reader=reader, average_window=steps_per_epoch,
            starvation_hint=f"raise max_data_loader_n_workers (now {cfg.max_data_loader_n_workers}) or cache the "
                            "latents (cache_latents / cache_latents_to_disk)",
            events=events, log_fn=log_fn)
        kw.update(overrides)
        return cls(**kw)

    # --- per micro-batch ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Restart the step clock (call right before the first step, after model loading and caching)."""
        self._mark = self.clock()
        self._paused = 0.0

    def add_data_wait(self, seconds: float) -> None:
        """Time the loop waited for the next batch (added to the current optimizer step)."""
        self._step_wait += seconds

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield from `batches`, recording the time each `next()` takes as data wait."""
        it = iter(batches)
        try:
            while True:
                t0 = self.clock()
                try:
                    item = next(it)
                except StopIteration:
                    return
                self.add_data_wait(self.clock() - t0)
                yield item
        finally:  # the loop broke out early (max_train_steps): close the source as a plain `for` would
            close = getattr(it, "close", None)
            if close is not None:
                close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside (saving, previews, validation) does not count as step time."""
        t0 = self.clock()
        try:
            yield
        finally:
            self._paused += self.clock() - t0

    def add_micro_batch(self, loss: torch.Tensor, batch_size: int) -> None:
        """One forward/backward: the loss stays on the device (summed; the step's loss is the micro-batch mean)."""
        v = loss.detach().float()
        self._acc = v if self._acc is None else self._acc + v
        self._micro += 1
        self._step_samples += batch_size

    def add_preservation(self, term: torch.Tensor) -> None:
        """One micro-batch's (unweighted) preservation term: logged as `loss/preservation`, the step's mean."""
        v = term.detach().float()
        self._preservation = v if self._preservation is None else self._preservation + v
        self._preservation_count += 1

    # --- per optimizer step -------------------------------------------------------------------------------------
    @property
    def checks_before_update(self) -> bool:
        """Whether the loop must call `check_update` before `optimizer.step()` (skip_step / raise)."""
        return self.nonfinite_policy in ("skip_step", "raise")

    def _step_loss(self) -> torch.Tensor:
        if self._acc is None:
            raise RuntimeError("Monitor: no micro-batch loss for this step (call add_micro_batch first)")
        return self._acc / self._micro

    def check_update(self, step: int, grad_norm: torch.Tensor | float | None = None) -> bool:
        """Before `optimizer.step()` of optimizer step `step`: read the step's loss (and grad norm: pass it unless a
        fp16 GradScaler handles overflow) and say whether to apply the update.  False = skip it (skip_step);
        NonFiniteLossError under `raise` or after `max_consecutive_nonfinite` skips in a row."""
        grad_norm = _whole(grad_norm)
        vals = [self._step_loss()] + ([grad_norm] if isinstance(grad_norm, torch.Tensor) else [])
        read = _read_scalars(vals)
        loss = read[0]
        gnorm = read[1] if isinstance(grad_norm, torch.Tensor) else (None if grad_norm is None else float(grad_norm))
        if math.isfinite(loss) and (gnorm is None or math.isfinite(gnorm)):
            self._consecutive = 0
            self._checked = (step, loss, gnorm, False)
            return True
        self._consecutive += 1
        name, what = ("nonfinite_loss", f"non-finite loss ({loss})") if not math.isfinite(loss) else \
            ("nonfinite_grad", f"non-finite gradient norm ({gnorm}) with loss {loss:.6g}")
        if self.nonfinite_policy == "raise":
            self._fire(name, step, f"{what} (nonfinite_loss_policy = raise)", fatal=True)
            raise NonFiniteLossError(step, self._take_fatal())
        self.skipped_steps += 1
        self._checked = (step, loss, gnorm, True)
        self._fire(name, step, f"{what}; the update was skipped ({self._consecutive} in a row, "
                               f"stopping at {self.max_consecutive_nonfinite})")
        if self._consecutive >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(step, [
                f"{what} in {self._consecutive} consecutive steps, all skipped (nonfinite_loss_policy = skip_step, "
                f"max_consecutive_nonfinite = {self.max_consecutive_nonfinite}); lower the learning rate, use bf16 "
                "instead of fp16, or check the data"])
        return False

    def end_step(self, step: int, epoch: int, *, optimizer: Any = None, grad_norm: torch.Tensor | float | None = None,
                 extra_lrs: Mapping[str, Any] | None = None,
                 extra_logs: Mapping[str, float] | None = None) -> dict[str, float] | None:
        """After optimizer step `step` (applied or skipped).  On logging steps (every `log_every_n_steps` and the
        last) reads the pending values, logs the scalars through `log_fn` and returns them; else returns None
        without touching the device.  `extra_lrs` adds `lr/<key>` values (e.g. {"d*lr": ...}); `extra_logs` adds
        host values under their own names (e.g. scale_weight_norms' `max_norm/keys_scaled`)."""
        grad_norm = _whole(grad_norm)
        now = self.clock()
        step_time = max(now - self._mark - self._paused, 0.0)
        self._mark, self._paused = now, 0.0
        self._steps_seen += 1
        if self._steps_seen == 1 and self.first_step_notice:
            log.info("first step %.1f s, %s", step_time, self.first_step_notice)
        if self._steps_seen > self.warmup_steps:  # worker start-up and first-step compilation are not starvation
            self._timing.append((self._step_wait, step_time))
        iv = self._interval
        iv.steps, iv.samples, iv.seconds, iv.wait = (iv.steps + 1, iv.samples + self._step_samples,
                                                     iv.seconds + step_time, iv.wait + self._step_wait)
        lrs = lr_logs(optimizer) if optimizer is not None else {}
        lrs.update({f"lr/{k}": v for k, v in (extra_lrs or {}).items()})
        lrs.update(extra_logs or {})
        if self._preservation is not None:  # a device tensor: read only on logging steps (_build_logs)
            lrs["loss/preservation"] = self._preservation / self._preservation_count
            self._preservation, self._preservation_count = None, 0
        if self._checked is not None and self._checked[0] == step:
            _, loss, gnorm, skipped = self._checked
            rec = _Step(step, epoch, loss, gnorm, lrs, skipped=skipped, reported=True)
        elif self.checks_before_update:
            raise RuntimeError(f"Monitor: check_update({step}) must run before optimizer.step() with "
                               f"nonfinite_loss_policy = {self.nonfinite_policy}")
        else:
            rec = _Step(step, epoch, self._step_loss(), grad_norm, lrs)
        self._pending.append(rec)
        self._acc, self._micro, self._step_samples, self._step_wait, self._checked = None, 0, 0, 0.0, None
        last = self.max_steps is not None and step >= self.max_steps
        if step % self.log_every_n_steps and not last:
            return None
        self.flush()
        logs = self._build_logs(rec)
        if self.log_fn is not None:
            self.log_fn(logs, step=step)
        self.last_logs = logs
        if self.events is not None and (last or step // self.summary_every_n_steps > self._last_summary):
            self._last_summary = step // self.summary_every_n_steps
            self.events.write("step", step=step, epoch=epoch, **logs)
        self._raise_fatal(step)
        return logs

    def end_epoch(self, epoch: int, step: int) -> dict[str, float]:
        """At the end of an epoch: `loss/epoch_average` (mean of the epoch's finite step losses), logged at `step`."""
        self.flush()
        total, n = self._epochs.pop(epoch, (0.0, 0))
        logs = {"loss/epoch_average": total / n} if n else {}
        if logs and self.log_fn is not None:
            self.log_fn(logs, step=step)
        self._raise_fatal(step)
        return logs

    def flush(self) -> None:
        """Read every pending step's values (one transfer) and run the loss bookkeeping over them in order."""
        recs, self._pending = self._pending, []
        tensors = [v for r in recs for v in (r.loss, r.grad_norm) if isinstance(v, torch.Tensor)]
        values = iter(_read_scalars(tensors))
        for r in recs:
            if isinstance(r.loss, torch.Tensor):
                r.loss = next(values)
            if isinstance(r.grad_norm, torch.Tensor):
                r.grad_norm = next(values)
            self._account(r)

    def _account(self, r: _Step) -> None:
        self.losses.append(r.loss)
        fatal = self.nonfinite_policy == "raise"
        if not math.isfinite(r.loss):
            if not r.reported:
                self._fire("nonfinite_loss", r.step, f"non-finite loss ({r.loss}); the update was "
                           f"applied (nonfinite_loss_policy = {self.nonfinite_policy})", fatal=fatal)
            return
        if r.grad_norm is not None and not math.isfinite(r.grad_norm) and not r.reported:
            self._fire("nonfinite_grad", r.step, f"non-finite gradient norm ({r.grad_norm}); the update "
                       f"was applied (nonfinite_loss_policy = {self.nonfinite_policy})", fatal=fatal)
        if len(self._history) >= self.spike_min_history:
            median = statistics.median(self._history)
            if median > 0 and r.loss > self.spike_ratio * median:
                self._fire("loss_spike", r.step, f"loss spike {r.loss:.6g} > {self.spike_ratio:g} × "
                                                 f"median {median:.6g} of the last {len(self._history)} losses")
        self._history.append(r.loss)
        self._window.append(r.loss)
        acc = self._epochs.setdefault(r.epoch, [0.0, 0])
        acc[0] += r.loss
        acc[1] += 1

    def _build_logs(self, rec: _Step) -> dict[str, float]:
        logs: dict[str, float] = {"loss/current": float(rec.loss)}
        if self._window:
            logs["loss/average"] = sum(self._window) / len(self._window)
        logs.update({k: float(v) for k, v in rec.lrs.items()})
        if rec.grad_norm is not None:
            logs["grad_norm"] = float(rec.grad_norm)
        iv, self._interval = self._interval, _Interval()
        if iv.seconds > 0:
            logs["speed/it_per_s"] = iv.steps / iv.seconds
            logs["speed/samples_per_s"] = iv.samples / iv.seconds
            logs["speed/data_wait_ratio"] = iv.wait / iv.seconds
        logs.update(self._memory_logs(rec.step))
        self._check_starvation(rec.step)
        logs["train/epoch"] = float(rec.epoch)
        logs["train/skipped_steps"] = float(self.skipped_steps)
        for name, a in self.alerts.items():
            logs[f"alert/{name}"] = 1.0 if a.active else 0.0
            a.active = False
        logs["alert/any"] = max(logs[f"alert/{n}"] for n in ALERTS)
        return logs

    def _memory_logs(self, step: int) -> dict[str, float]:
        if self.memory_reader is None:
            return {}
        try:
            m = self.memory_reader()
        except Exception as e:  # noqa: BLE001 (a monitoring failure must not stop training)
            if not self._memory_failed:
                log.warning("monitor: could not read GPU memory statistics (%s); memory metrics are skipped", e)
                self._memory_failed = True
            return {}
        self._memory = m
        logs = {"gpu/mem_allocated_mb": m.allocated / MB, "gpu/mem_reserved_mb": m.reserved / MB,
                "gpu/mem_peak_allocated_mb": m.peak_allocated / MB, "gpu/mem_usage_ratio": m.reserved / m.total}
        ratio = m.peak_allocated / m.total
        if ratio >= self.memory_warn_ratio:
            self._fire("memory_near_limit", step,
                       f"peak allocated GPU memory {m.peak_allocated / 2**30:.2f} GiB is {ratio:.0%} of "
                       f"the card's {m.total / 2**30:.2f} GiB (memory_warn_ratio = {self.memory_warn_ratio:g}); "
                       "lower train_batch_size, turn on gradient_checkpointing or use mixed_precision = \"bf16\"",
                       fatal=self.alert_policy == "raise")
        return logs

    def _check_starvation(self, step: int) -> None:
        if len(self._timing) < self.starvation_window:
            return
        wait = sum(w for w, _ in self._timing)
        total = sum(t for _, t in self._timing)
        if total > 0 and wait / total >= self.starvation_ratio:
            self._fire("data_starvation", step,
                       f"the last {len(self._timing)} steps spent {wait / total:.0%} of their time "
                       f"waiting for data; {self.starvation_hint}")

    # --- alerts ---------------------------------------------------------------------------------------------------
    def _fire(self, name: str, step: int, message: str, fatal: bool = False) -> None:
        a = self.alerts[name]
        a.count += 1
        a.active = True
        # a non-finite value after finite steps is news (a new episode), not a repeat
        episode = name in NONFINITE_ALERTS and (a.last_fired is None or step - a.last_fired > 1)
        a.last_fired = step
        if fatal or episode or a.last_warned is None or step - a.last_warned >= self.warn_every_n_steps:
            repeats = a.suppressed
            text = message + (f" ({repeats} more since step {a.last_warned})" if repeats else "")
            log.warning("monitor: step %d: %s", step, text)
            if self.events is not None:
                self.events.write("alert", step=step, alert=name, message=message, count=a.count,
                                  repeats=repeats, fatal=fatal)
            a.last_warned, a.suppressed = step, 0
        else:
            a.suppressed += 1
        if fatal:
            self._fatal.append(f"{name}: {message}")

    def _take_fatal(self) -> list[str]:
        reasons, self._fatal = self._fatal, []
        return reasons

    def _raise_fatal(self, step: int) -> None:
        if self._fatal:
            reasons = self._take_fatal()
            cls = NonFiniteLossError if all(r.startswith("nonfinite") for r in reasons) else MonitorAlertError
            raise cls(step, reasons)

    # --- reporting ------------------------------------------------------------------------------------------------
    def postfix(self) -> dict[str, str]:
        """The progress-bar fields of the last logged step: loss, avg, lr, it/s, mem (reserved GiB), skipped."""
        lg, out = self.last_logs, {}
        if "loss/current" in lg:
            out["loss"] = f"{lg['loss/current']:.4f}"
        if "loss/average" in lg:
            out["avg"] = f"{lg['loss/average']:.4f}"
        lr = next((v for k, v in lg.items() if k.startswith("lr/")), None)
        if lr is not None:
            out["lr"] = f"{lr:.2e}"
        if "speed/it_per_s" in lg:
            out["it/s"] = f"{lg['speed/it_per_s']:.2f}"
        if "gpu/mem_reserved_mb" in lg:
            out["mem"] = f"{lg['gpu/mem_reserved_mb'] / 1024:.1f}G"
        if self.skipped_steps:
            out["skipped"] = str(self.skipped_steps)
        return out

    def summary(self) -> dict[str, Any]:
        """Run totals for the `end` event: steps, skipped steps, alert counts, last and average loss, peak memory."""
        self.flush()
        finite = [v for v in self.losses if math.isfinite(v)]
        out: dict[str, Any] = {"steps": len(self.losses), "skipped_steps": self.skipped_steps,
                               "alerts": {n: a.count for n, a in self.alerts.items() if a.count}}
        if finite:
            out["final_loss"], out["loss_average"] = finite[-1], sum(self._window) / max(len(self._window), 1)
        if self._memory is not None:
            out["gpu_peak_allocated_mb"] = self._memory.peak_allocated / MB
        return out
