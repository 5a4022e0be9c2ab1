"""A killed run: the training loop's step raises after a number of micro-batches, like a power cut mid-run.

    with killed_after(monkeypatch, 5):  # micro-batches 1-5 train, micro-batch 6 is killed
        run_training(cfg)
    resumed = run_training(resume_cfg)  # the real training_step again

Every write of the trainer is atomic, so an exception from inside the loop leaves the output folder as a kill at
that point would.  The block must end with the kill (it fails otherwise, like `pytest.raises`); afterwards only
`loop.training_step` is put back: the test's other patches stay."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

import anima_trainer.train.loop as loop

MESSAGE = "simulated power cut"


class Crash(RuntimeError):
    """The simulated kill (a subclass of RuntimeError): the one exception type of every killed-run test."""


@contextlib.contextmanager
def killed_after(monkeypatch: pytest.MonkeyPatch, micro_batches: int,
                 error: type[Exception] = Crash) -> Iterator[pytest.ExceptionInfo]:
    """Patch `loop.training_step` to run the real step `micro_batches` times and raise `error("simulated power
    cut")` at the next call; expect that error out of the block (the ExceptionInfo is yielded, filled in when the
    block ends); then restore `loop.training_step` alone (other patches of `monkeypatch` are kept)."""
    real, count = loop.training_step, {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if count["n"] > micro_batches:
            raise error(MESSAGE)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", step)
    try:
        with pytest.raises(error, match=MESSAGE) as info:
            yield info
    finally:
        monkeypatch.setattr(loop, "training_step", real)
