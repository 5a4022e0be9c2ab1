"""Issue 18: a run with compiled DiT blocks prints how long its first step took, that the time includes the
compile, where the compiled code is kept, and the one-line way back to eager."""

from __future__ import annotations

import logging
import re

import torch

from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs
from anima_trainer.train.loop import run_training
from anima_trainer.train.monitor import Monitor


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_monitor_logs_the_first_step_once(caplog) -> None:
    clock = Clock()
    mon = Monitor(clock=clock, nonfinite_policy="warn", first_step_notice="including the compile")
    mon.start()
    with caplog.at_level(logging.INFO, logger="anima_trainer.train.monitor"):
        for step, seconds in ((1, 42.25), (2, 0.5), (3, 0.5)):
            mon.add_micro_batch(torch.tensor(0.1), 1)
            clock.now += seconds
            mon.end_step(step, 1)
    assert [r.getMessage() for r in caplog.records] == ["first step 42.2 s, including the compile"]
    caplog.clear()
    plain = Monitor(clock=clock, nonfinite_policy="warn")  # eager blocks: nothing to say
    with caplog.at_level(logging.INFO, logger="anima_trainer.train.monitor"):
        plain.add_micro_batch(torch.tensor(0.1), 1)
        plain.end_step(1, 1)
    assert caplog.records == []


def test_a_compiled_run_prints_its_first_step_time(setup, tmp_path, caplog) -> None:
    # compile_backend = "eager": dynamo traces the blocks without generating code (no triton or C++ compiler on CPU)
    toml = write_demo_configs(tmp_path / "run", setup["models"], setup["images"], 2, seed=5,
                              training_extra='compile_blocks = true\ncompile_backend = "eager"\n')
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.INFO):
            run = run_training(parse_train_args(["--config_file", str(toml)]))
    finally:
        torch._dynamo.reset()
    assert run.steps == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("first step ")]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"first step \d+\.\d s, including torch\.compile of the DiT blocks; compile_blocks = false "
                        r"runs eager", lines[0]), lines[0]  # eager backend: nothing is written to a cache


def test_an_eager_run_prints_no_first_step_line(setup, tmp_path, caplog) -> None:
    toml = write_demo_configs(tmp_path / "run", setup["models"], setup["images"], 1, seed=5)  # auto on CPU: eager
    with caplog.at_level(logging.INFO):
        run_training(parse_train_args(["--config_file", str(toml)]))
    assert not [r for r in caplog.records if r.getMessage().startswith("first step ")]
    assert not [r for r in caplog.records if "compile_blocks = auto" in r.getMessage()]  # CPU: nothing to explain
