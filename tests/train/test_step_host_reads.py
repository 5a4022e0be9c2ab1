"""Issue 18: an unlogged training step reads nothing back from the device (`.item()`, `.tolist()`, `float()`,
`int()`, `bool()` of a tensor), so the next step's kernels are queued while the GPU works.  Counted over the whole
loop: the reads of two runs that differ only by two unlogged steps are compared site by site.

Reads of host tensors are no sync and are allowed by name: torch's optimizers keep their `step` counters on the CPU
(torch/optim/optimizer.py `_get_value`), and the text path builds its padding masks on the CPU
(train/inputs.py → models/llm_adapter.py `_all_true`).  nonfinite_loss_policy = skip_step (the default) reads one
scalar per step by design: whether the optimizer may apply the update must be known before `optimizer.step()`
(train/monitor.py `check_update`); `warn` reads nothing."""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch

from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.train.loop import run_training

READS = ("item", "tolist", "__float__", "__int__", "__bool__")
HOST_TENSORS = {("optimizer.py", "_get_value"), ("llm_adapter.py", "_all_true")}


def _counting(original, reads: Counter):
    def counted(self, *a, **k):
        frame = traceback.extract_stack(limit=2)[0]
        reads[(frame.filename.replace("\\", "/").rsplit("/", 1)[-1], frame.name)] += 1
        return original(self, *a, **k)

    return counted


def _reads_of_a_run(setup, out, steps: int, policy: str, monkeypatch) -> Counter:
    """(file, function) → count of tensor reads during `run_training`, at the function that read."""
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1)  # 4 steps per epoch
    cfg = parse_train_args(["--config_file", str(toml), "--nonfinite_loss_policy", policy,
                            "--log_every_n_steps", "1000"])
    reads: Counter = Counter()
    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, _counting(getattr(torch.Tensor, name), reads))
        run = run_training(cfg)
    assert run.steps == steps
    return reads


@pytest.mark.parametrize(("policy", "per_step"), [("warn", {}), ("skip_step", {("monitor.py", "_read_scalars"): 1})])
def test_unlogged_steps_read_nothing_back(setup, tmp_path, monkeypatch, policy, per_step) -> None:
    # steps 6 and 7 of the longer run are unlogged and inside epoch 2 (every caption already encoded); the last
    # step of each run is logged in both
    short = _reads_of_a_run(setup, tmp_path / "a", 5, policy, monkeypatch)
    long = _reads_of_a_run(setup, tmp_path / "b", 7, policy, monkeypatch)
    extra = {site: long[site] - short[site] for site in long if long[site] != short[site]}
    device_reads = {site: n for site, n in extra.items() if site not in HOST_TENSORS}
    assert device_reads == {site: 2 * n for site, n in per_step.items()}, extra
    assert extra[("optimizer.py", "_get_value")] > 0  # the counting sees reads (of host tensors here)
