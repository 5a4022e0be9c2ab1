"""The training monitor: metric names and values, alerts firing exactly when they should, the policies, no
device sync on steps that are not logged, and the monitoring options (with sd-scripts-anima's names)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from anima_trainer.config import ConfigError, TrainConfig, parse_train_args
from anima_trainer.train.events import EventLog, read_events
from anima_trainer.train.monitor import (
    MemoryStats,
    Monitor,
    MonitorAlertError,
    NonFiniteLossError,
    NonFiniteStateError,
    check_finite_state,
    is_finite_state,
    nonfinite_tensors,
)

NAN, INF = float("nan"), float("inf")
GIB = 2**30
REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors",
            "--vae", "vae.safetensors", "--output_dir", "out", "--dataset_config", "dataset.toml"]


class Clock:
    """A hand-driven clock: tests say how long each step and each data wait took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Optim:
    """Just the param groups the monitor reads."""

    def __init__(self, *groups: tuple[str, float]) -> None:
        self.param_groups = [{"name": name, "lr": lr} for name, lr in groups]


class Logged(list):
    def __call__(self, logs: dict, step: int) -> None:
        self.append((step, dict(logs)))


def make(**kw) -> tuple[Monitor, Clock, Logged]:
    clock, logged = Clock(), Logged()
    kw.setdefault("nonfinite_policy", "warn")
    return Monitor(clock=clock, log_fn=logged, **kw), clock, logged


def run_step(mon: Monitor, clock: Clock, step: int, loss: float | torch.Tensor, *, epoch: int = 1,
             seconds: float = 1.0, wait: float = 0.0, batch: int = 2, optimizer=None, grad_norm=None):
    """One optimizer step of `seconds`, `wait` of it spent waiting for data; returns end_step's result."""
    mon.add_data_wait(wait)
    mon.add_micro_batch(loss if isinstance(loss, torch.Tensor) else torch.tensor(loss), batch)
    clock.now += seconds
    return mon.end_step(step, epoch, optimizer=optimizer, grad_norm=grad_norm)


def test_metrics_names_and_values():
    reader = lambda: MemoryStats(allocated=512 * 2**20, reserved=1024 * 2**20, peak_allocated=768 * 2**20,  # noqa: E731
                                 total=4 * GIB)
    mon, clock, logged = make(memory_reader=reader, average_window=2)
    opt = Optim(("base", 1e-4), ("reg_lr=0.001", 1e-3), ("base/plus", 1.6e-3))
    # gradient accumulation: the step's loss is the mean of its micro-batch losses
    mon.add_micro_batch(torch.tensor(0.2), 2)
    mon.add_micro_batch(torch.tensor(0.4), 2)
    clock.now += 2.0
    logs = mon.end_step(1, 1, optimizer=opt, grad_norm=torch.tensor(0.5), extra_lrs={"d*lr": 2e-4})
    assert logs == logged[-1][1] and logged[-1][0] == 1
    assert logs["loss/current"] == pytest.approx(0.3)
    assert logs["loss/average"] == pytest.approx(0.3)
    assert (logs["lr/base"], logs["lr/reg_lr=0.001"], logs["lr/base/plus"], logs["lr/d*lr"]) == (1e-4, 1e-3, 1.6e-3,
                                                                                                  2e-4)
    assert logs["grad_norm"] == 0.5
    assert (logs["speed/it_per_s"], logs["speed/samples_per_s"], logs["speed/data_wait_ratio"]) == (0.5, 2.0, 0.0)
    assert (logs["gpu/mem_allocated_mb"], logs["gpu/mem_reserved_mb"], logs["gpu/mem_peak_allocated_mb"]) == \
        (512.0, 1024.0, 768.0)
    assert logs["gpu/mem_usage_ratio"] == 0.25
    assert (logs["train/epoch"], logs["train/skipped_steps"]) == (1.0, 0.0)
    assert {k: v for k, v in logs.items() if k.startswith("alert/")} == {
        "alert/nonfinite_loss": 0.0, "alert/nonfinite_grad": 0.0, "alert/loss_spike": 0.0,
        "alert/memory_near_limit": 0.0, "alert/data_starvation": 0.0, "alert/any": 0.0}
    run_step(mon, clock, 2, 0.5, optimizer=opt)
    logs = run_step(mon, clock, 3, 0.7, optimizer=opt)
    assert logs["loss/average"] == pytest.approx(0.6)  # the window (steps per epoch) holds the last 2 steps
    assert "grad_norm" not in logs  # no clipping → no norm
    assert mon.losses == pytest.approx([0.3, 0.5, 0.7])
    assert mon.postfix() == {"loss": "0.7000", "avg": "0.6000", "lr": "1.00e-04", "it/s": "1.00", "mem": "1.0G"}


def test_epoch_average_and_summary():
    mon, clock, logged = make()
    for step, loss in enumerate([1.0, 3.0], start=1):
        run_step(mon, clock, step, loss, epoch=1)
    assert mon.end_epoch(1, step=2) == {"loss/epoch_average": 2.0}
    assert logged[-1] == (2, {"loss/epoch_average": 2.0})
    run_step(mon, clock, 3, NAN, epoch=2)
    run_step(mon, clock, 4, 0.5, epoch=2)
    assert mon.end_epoch(2, step=4) == {"loss/epoch_average": 0.5}  # non-finite losses are left out
    summary = mon.summary()
    assert summary["steps"] == 4 and summary["final_loss"] == 0.5 and summary["alerts"] == {"nonfinite_loss": 1}


class SyncCounter(torch.Tensor):
    """A tensor that counts every call that copies its value to the host."""

    syncs: list[str] = []
    SYNCING = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__format__", "__repr__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls.SYNCING:
            cls.syncs.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_no_device_read_on_steps_that_are_not_logged():
    SyncCounter.syncs = []
    mon, clock, logged = make(log_every_n_steps=4)
    for step in (1, 2, 3):
        assert run_step(mon, clock, step, torch.tensor(0.1 * step).as_subclass(SyncCounter),
                        grad_norm=torch.tensor(1.0).as_subclass(SyncCounter)) is None
    assert SyncCounter.syncs == [] and logged == [] and mon.losses == []
    logs = run_step(mon, clock, 4, torch.tensor(0.4).as_subclass(SyncCounter),
                    grad_norm=torch.tensor(2.0).as_subclass(SyncCounter))
    assert SyncCounter.syncs == ["tolist"]  # all 4 steps' losses and norms in one transfer
    assert mon.losses == pytest.approx([0.1, 0.2, 0.3, 0.4]) and logs["grad_norm"] == 2.0
    assert logs["speed/it_per_s"] == 1.0 and [s for s, _ in logged] == [4]


def test_last_step_is_always_logged():
    mon, clock, logged = make(log_every_n_steps=10, max_steps=3)
    assert [run_step(mon, clock, s, 1.0) is None for s in (1, 2, 3)] == [True, True, False]
    assert [s for s, _ in logged] == [3]


def test_nonfinite_loss_under_warn_is_reported_with_its_step(caplog, tmp_path):
    events = EventLog(tmp_path / "run.events.jsonl")
    mon, clock, logged = make(log_every_n_steps=4, events=events)
    with caplog.at_level(logging.WARNING):
        for step, loss in enumerate([1.0, NAN, 1.0, 1.0], start=1):
            logs = run_step(mon, clock, step, loss)
    assert logs["alert/nonfinite_loss"] == 1.0 and logs["alert/any"] == 1.0  # step 4's log covers step 2
    assert "step 2: non-finite loss (nan); the update was applied" in caplog.text
    alerts = [e for e in read_events(events.path) if e["type"] == "alert"]
    assert [(e["step"], e["alert"]) for e in alerts] == [(2, "nonfinite_loss")]
    logs = run_step(mon, clock, 8, 1.0)
    assert logs["alert/nonfinite_loss"] == 0.0  # only the log that covers the firing step


def test_skip_step_skips_counts_and_stops_after_n_in_a_row():
    mon, clock, logged = make(nonfinite_policy="skip_step", max_consecutive_nonfinite=3)
    assert mon.checks_before_update
    step = 0
    for loss in [1.0, NAN, NAN, 1.0, INF, NAN]:  # a finite step resets the count: never 3 in a row
        step += 1
        mon.add_micro_batch(torch.tensor(loss), 1)
        applied = mon.check_update(step)
        assert applied == math.isfinite(loss)
        clock.now += 1
        logs = mon.end_step(step, 1)
        assert logs["alert/nonfinite_loss"] == (0.0 if applied else 1.0)
    assert mon.skipped_steps == 4 and logs["train/skipped_steps"] == 4.0
    mon.add_micro_batch(torch.tensor(NAN), 1)
    with pytest.raises(NonFiniteLossError) as e:
        mon.check_update(7)
    assert e.value.step == 7
    assert "monitor stopped training at step 7: non-finite loss (nan) in 3 consecutive steps, all skipped" in \
        str(e.value)
    assert "max_consecutive_nonfinite = 3" in str(e.value)


def test_skip_step_also_skips_a_nonfinite_gradient_norm(caplog):
    mon, clock, logged = make(nonfinite_policy="skip_step")
    mon.add_micro_batch(torch.tensor(0.25), 1)
    with caplog.at_level(logging.WARNING):
        assert mon.check_update(1, torch.tensor(INF)) is False
    assert "step 1: non-finite gradient norm (inf) with loss 0.25; the update was skipped" in caplog.text
    clock.now += 1
    logs = mon.end_step(1, 1)
    assert (logs["alert/nonfinite_grad"], logs["alert/nonfinite_loss"], logs["loss/current"]) == (1.0, 0.0, 0.25)
    assert mon.skipped_steps == 1


def test_raise_policy_stops_before_the_update():
    mon, clock, logged = make(nonfinite_policy="raise")
    mon.add_micro_batch(torch.tensor(1.0), 1)
    assert mon.check_update(1)
    mon.end_step(1, 1)
    mon.add_micro_batch(torch.tensor(NAN), 1)
    with pytest.raises(NonFiniteLossError) as e:
        mon.check_update(2)
    assert str(e.value) == ("monitor stopped training at step 2: nonfinite_loss: non-finite loss (nan) "
                            "(nonfinite_loss_policy = raise)")
    assert e.value.reasons == ["nonfinite_loss: non-finite loss (nan) (nonfinite_loss_policy = raise)"]


def test_check_update_is_required_when_the_policy_needs_it():
    mon, clock, _ = make(nonfinite_policy="skip_step")
    mon.add_micro_batch(torch.tensor(1.0), 1)
    with pytest.raises(RuntimeError, match=r"check_update\(1\) must run before optimizer.step\(\)"):
        mon.end_step(1, 1)


def test_loss_spike_against_the_running_median(caplog):
    mon, clock, _ = make()
    spikes = []
    with caplog.at_level(logging.WARNING):
        # the first 5 losses only fill the history; 0.1 would make a "previous loss" rule fire on 0.5, the median
        # of [1, 1, 1, 1, 1, 0.1] (= 1) does not; 3.5 > 3 × 1 fires; 2.9 does not
        for step, loss in enumerate([1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.5, 3.5, 2.9, 1.0], start=1):
            logs = run_step(mon, clock, step, loss)
            spikes.append(logs["alert/loss_spike"])
    assert spikes == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert "step 8: loss spike 3.5 > 3 × median 1 of the last 7 losses" in caplog.text
    mon, clock, _ = make()
    # fewer than 5 earlier losses: no verdict yet
    assert [run_step(mon, clock, s, x)["alert/loss_spike"] for s, x in enumerate([1.0, 10.0, 100.0], 1)] == [0, 0, 0]


def test_loss_spike_never_stops_the_run_even_under_raise():
    mon, clock, _ = make(alert_policy="raise", nonfinite_policy="warn")
    for step, loss in enumerate([1.0] * 5 + [50.0], start=1):
        logs = run_step(mon, clock, step, loss)
    assert logs["alert/loss_spike"] == 1.0


def _memory(peak: float, reserved: float, total: int = 10 * GIB):
    return lambda: MemoryStats(allocated=int(0.1 * total), reserved=int(reserved * total),
                               peak_allocated=int(peak * total), total=total)


def test_memory_alert_uses_peak_allocated_not_reserved(caplog):
    mon, clock, _ = make(memory_reader=_memory(peak=0.5, reserved=0.99), memory_warn_ratio=0.95)
    logs = run_step(mon, clock, 1, 1.0)
    assert logs["gpu/mem_usage_ratio"] == pytest.approx(0.99) and logs["alert/memory_near_limit"] == 0.0
    mon, clock, _ = make(memory_reader=_memory(peak=0.96, reserved=0.97), memory_warn_ratio=0.95)
    with caplog.at_level(logging.WARNING):
        logs = run_step(mon, clock, 1, 1.0)
    assert logs["alert/memory_near_limit"] == 1.0 and logs["alert/any"] == 1.0
    assert "peak allocated GPU memory 9.60 GiB is 96% of the card's 10.00 GiB" in caplog.text


def test_memory_alert_under_raise_logs_first_then_stops():
    mon, clock, logged = make(memory_reader=_memory(peak=0.97, reserved=0.97), alert_policy="raise")
    with pytest.raises(MonitorAlertError) as e:
        run_step(mon, clock, 3, 1.0)
    assert type(e.value) is MonitorAlertError and e.value.step == 3
    assert str(e.value).startswith("monitor stopped training at step 3: memory_near_limit: peak allocated GPU "
                                   "memory")
    assert logged[-1][0] == 3 and logged[-1][1]["alert/memory_near_limit"] == 1.0


def test_memory_read_failure_warns_once(caplog):
    def broken() -> MemoryStats:
        raise RuntimeError("driver went away")

    mon, clock, _ = make(memory_reader=broken)
    with caplog.at_level(logging.WARNING):
        logs = [run_step(mon, clock, s, 1.0) for s in (1, 2, 3)]
    assert caplog.text.count("could not read GPU memory statistics (driver went away)") == 1
    assert not any(k.startswith("gpu/") for lg in logs for k in lg)


def test_no_memory_metrics_off_cuda():
    cfg = TrainConfig(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir="o", dataset_config="ds")
    assert Monitor.from_config(cfg, torch.device("cpu")).memory_reader is None


def test_data_starvation_over_a_window(caplog):
    mon, clock, _ = make(starvation_window=10, warmup_steps=3, starvation_ratio=0.3,
                         starvation_hint="raise max_data_loader_n_workers (now 2)")
    fired = []
    with caplog.at_level(logging.WARNING):
        for step in range(1, 20):
            # warm-up steps wait long (worker start-up) and are ignored; then 0.2 s of 1 s, then 0.5 s of 1 s
            wait = 0.9 if step <= 3 else (0.2 if step <= 13 else 0.5)
            fired.append(run_step(mon, clock, step, 1.0, wait=wait)["alert/data_starvation"])
    # window full at step 13 (steps 4–13: 20%); from step 14 each step waits 0.5 s: step 17's window (8–17)
    # holds 6 × 0.2 s + 4 × 0.5 s = 32% ≥ 30%, step 16's 29%
    assert fired.index(1.0) == 16 and fired[16:] == [1.0, 1.0, 1.0]
    assert ("step 17: the last 10 steps spent 32% of their time waiting for data; raise "
            "max_data_loader_n_workers (now 2)") in caplog.text


def test_timed_and_paused_measure_waits_and_exclude_pauses():
    mon, clock, _ = make()

    def batches():
        for _ in range(2):
            clock.now += 0.25  # the loader takes 0.25 s per batch
            yield torch.tensor(1.0)

    for step, loss in enumerate(mon.timed(batches()), start=1):
        mon.add_micro_batch(loss, 4)
        clock.now += 0.75
        if step == 1:
            with mon.paused():  # a save/preview: not step time
                clock.now += 100.0
        logs = mon.end_step(step, 1)
        assert logs["speed/data_wait_ratio"] == 0.25 and logs["speed/it_per_s"] == 1.0
        assert logs["speed/samples_per_s"] == 4.0


def test_alert_warnings_and_events_are_rate_limited(caplog, tmp_path):
    events = EventLog(tmp_path / "e.jsonl")
    mon, clock, _ = make(memory_reader=_memory(peak=0.99, reserved=0.99), warn_every_n_steps=100, events=events)
    with caplog.at_level(logging.WARNING):
        logs = [run_step(mon, clock, s, 1.0) for s in range(1, 251)]
    assert all(lg["alert/memory_near_limit"] == 1.0 for lg in logs)  # the scalar shows every time
    warned = [r.getMessage() for r in caplog.records if "peak allocated" in r.getMessage()]
    assert len(warned) == 3 and warned[1].endswith("(99 more since step 1)")
    alerts = [e for e in read_events(events.path) if e["type"] == "alert"]
    assert [(e["step"], e["count"], e["repeats"]) for e in alerts] == [(1, 1, 0), (101, 101, 99), (201, 201, 99)]
    assert mon.alerts["memory_near_limit"].count == 250


def test_step_summaries_in_the_event_log(tmp_path):
    events = EventLog(tmp_path / "e.jsonl")
    mon, clock, _ = make(events=events, summary_every_n_steps=3, max_steps=7, log_every_n_steps=2)
    for step in range(1, 8):
        run_step(mon, clock, step, 0.5)
    steps = [e for e in read_events(events.path) if e["type"] == "step"]
    # logged steps 2, 4, 6, 7: a summary at the first logged step of each block of 3, and at the last
    assert [e["step"] for e in steps] == [4, 6, 7]
    assert steps[0]["loss/current"] == 0.5 and "alert/any" in steps[0]


def test_finite_state_guard():
    good = {"a.lora_down.weight": torch.ones(2, 2), "a.alpha": torch.tensor(1.0), "n": torch.tensor([1, 2])}
    assert is_finite_state(good) and is_finite_state(list(good.values()))
    bad = dict(good, **{"b.lora_up.weight": torch.tensor([0.0, INF]), "c.lokr_w1": torch.tensor([NAN])})
    assert not is_finite_state(bad)
    assert nonfinite_tensors(bad) == ["b.lora_up.weight", "c.lokr_w1"]
    check_finite_state(good, "last.safetensors")
    with pytest.raises(NonFiniteStateError) as e:
        check_finite_state(bad, "last-step00000010.safetensors")
    assert str(e.value) == ("last-step00000010.safetensors: not saved, 2 tensors hold NaN/Inf "
                            "(b.lora_up.weight, c.lokr_w1)")


# --- options ------------------------------------------------------------------------------------------------------
def test_monitor_option_defaults_and_from_config():
    c = parse_train_args(REQUIRED)
    assert (c.monitor_memory, c.monitor_alert_policy, c.nonfinite_loss_policy) == (True, "warn", "skip_step")
    assert (c.loss_spike_ratio, c.memory_warn_ratio, c.max_consecutive_nonfinite, c.log_every_n_steps) == \
        (3.0, 0.95, 5, 1)
    c = parse_train_args([*REQUIRED, "--log_every_n_steps", "10", "--loss_spike_ratio", "4",
                          "--max_consecutive_nonfinite", "2", "--max_data_loader_n_workers", "3"])
    mon = Monitor.from_config(c, torch.device("cpu"), max_steps=100, steps_per_epoch=7)
    assert (mon.log_every_n_steps, mon.spike_ratio, mon.max_consecutive_nonfinite, mon.max_steps) == (10, 4.0, 2, 100)
    assert mon.nonfinite_policy == "skip_step" and mon._window.maxlen == 7
    assert "max_data_loader_n_workers (now 3)" in mon.starvation_hint


def test_sd_scripts_anima_monitor_names(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("anima_monitor_memory = false\nanima_monitor_alert_policy = \"raise\"\n"
                    "anima_monitor_memory_warn_ratio = 0\nanima_monitor_loss_spike_ratio = 2.5\n", encoding="utf-8")
    c = parse_train_args([*REQUIRED, "--config_file", str(toml)])
    assert (c.monitor_memory, c.monitor_alert_policy, c.memory_warn_ratio, c.loss_spike_ratio) == \
        (False, "raise", 0.95, 2.5)  # 0 = the default, as in sd-scripts-anima
    assert c.nonfinite_loss_policy == "raise"  # its policy=raise aborts on a non-finite loss
    c = parse_train_args([*REQUIRED, "--anima_monitor_loss_spike_ratio", "0", "--anima_monitor_memory_warn_ratio",
                          "0.9", "--anima_monitor_alert_policy", "raise", "--nonfinite_loss_policy", "skip_step"])
    assert (c.loss_spike_ratio, c.memory_warn_ratio, c.nonfinite_loss_policy) == (3.0, 0.9, "skip_step")
    c = parse_train_args([*REQUIRED, "--auto_start_tensorboard", "--tensorboard_port", "7000",
                          "--tensorboard_host", "0.0.0.0", "--tensorboard_logdir", "tb"])
    assert (c.auto_start_tensorboard, c.tensorboard_port, c.tensorboard_host, str(c.tensorboard_logdir)) == \
        (True, 7000, "0.0.0.0", "tb")


def test_monitor_option_errors(tmp_path):
    def error(argv: list[str]) -> str:
        with pytest.raises(ConfigError) as e:
            parse_train_args(argv)
        return str(e.value)

    toml = tmp_path / "t.toml"
    toml.write_text("anima_monitor_loss_spike_ratio = 2.5\nloss_spike_ratio = 4.0\n", encoding="utf-8")
    assert error([*REQUIRED, "--config_file", str(toml)]) == (
        f"'anima_monitor_loss_spike_ratio' (sd-scripts-anima name of 'loss_spike_ratio') and 'loss_spike_ratio' are "
        f"both set in {toml.name} line 1, to different values (2.5 and 4.0)")
    assert error([*REQUIRED, "--loss_spike_ratio", "1"]) == "loss_spike_ratio: must be > 1.0, got '1'"
    assert error([*REQUIRED, "--memory_warn_ratio", "1.5"]) == "memory_warn_ratio: must be <= 1.0, got '1.5'"
    assert error([*REQUIRED, "--anima_monitor_alert_policy", "stop"]).startswith(
        "monitor_alert_policy: expected one of 'warn' or 'raise', got 'stop'")
    assert error([*REQUIRED, "--nonfinite_loss_policy", "skip"]).startswith("nonfinite_loss_policy: expected one of")
    assert error([*REQUIRED, "--max_consecutive_nonfinite", "0"]) == "max_consecutive_nonfinite: must be >= 1, got '0'"
    assert error([*REQUIRED, "--tensorboard_port", "70000"]) == "tensorboard_port: must be <= 65535, got '70000'"


def test_timed_closes_its_source_when_the_loop_breaks_early():
    closed = []

    def batches():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    mon, _, _ = make()
    for item in mon.timed(batches()):
        if item == 2:
            break
    assert closed == [True]


def test_the_documented_loop_protocol_never_applies_a_nan_update():
    """The calls the training loop makes (docs: Monitoring and logs): a NaN batch is skipped before
    optimizer.step(), so the weights after it equal the weights before it and stay finite."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": 1e-2, "name": "base"}])
    mon, clock, logged = make(nonfinite_policy="skip_step", max_steps=4)
    x = torch.randn(8, 4)
    before = None
    for step in range(1, 5):
        loss = model(x).pow(2).mean()
        if step == 3:
            loss = loss * float("nan")
            before = [p.detach().clone() for p in model.parameters()]
        loss.backward()
        mon.add_micro_batch(loss, 8)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if mon.check_update(step, grad_norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        clock.now += 1
        mon.end_step(step, 1, optimizer=opt, grad_norm=grad_norm)
        if step == 3:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert is_finite_state(dict(model.named_parameters())) and mon.skipped_steps == 1
    assert [lg["alert/nonfinite_loss"] for _, lg in logged] == [0.0, 0.0, 1.0, 0.0]
    assert logged[-1][1]["lr/base"] == 1e-2 and math.isnan(mon.losses[2])
