"""A fine-tune with the evaluation and the preservation loss on (training_mode = "finetune"): the light metrics
compare the fine-tune (strength 1) with the base (strength 0: W0 + 0·ΔW), the run trains bit for bit as one
without the evaluation, a resumed run measures against the base file's W0 (not the resumed weights), and
`anima-trainer evaluate` names a whole-DiT checkpoint and the way to a LoRA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
import anima_trainer.train.measurements as measurements
from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.evaluation.checkpoints import CheckpointError, find_checkpoints
from anima_trainer.train.events import read_events
from tests.support.killed_run import killed_after
from anima_trainer.train.loop import run_training

PATTERNS = ("--trainable_patterns", r"^blocks\.1\.", r"\.cross_attn\.")


def _config(setup: dict, out: Path, *extra: str, steps: int):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5,
                              training_extra='training_mode = "finetune"\n')
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=2, num_repeats=1)
    return parse_train_args(["--config_file", str(toml), "--learning_rate", "1e-3", *PATTERNS, *extra])


def _evaluations(out: Path) -> dict[int, dict]:
    return {e["step"]: e for e in read_events(out / "output" / "demo_lora.events.jsonl") if e["type"] == "evaluation"}


def _same_file(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def probe(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(measurements, "PROBE_LATENT_SIZE", (8, 8))
    prompts = tmp_path / "probe.txt"
    prompts.write_text("a red circle\n\nscenery\n", encoding="utf-8")
    return prompts


def test_a_finetune_evaluates_against_its_base_and_trains_as_without_it(setup, tmp_path, probe):
    evaluated = ("--eval_every_n_steps", "2", "--eval_prompts", str(probe), "--eval_trigger", "sks",
                 "--save_every_n_steps", "2")
    plain = run_training(_config(setup, tmp_path / "plain", "--save_every_n_steps", "2", steps=4))
    run = run_training(_config(setup, tmp_path / "eval", *evaluated, steps=4))
    assert _same_file(plain.final_path, run.final_path)  # the evaluation changed nothing in training
    assert run.network.multiplier == 1.0
    events = _evaluations(tmp_path / "eval")
    assert sorted(events) == [2, 4]
    assert events[2]["path"].endswith("demo_lora-step00000002.safetensors")
    assert events[4]["path"] == str(run.final_path)
    for event in events.values():
        metrics = event["metrics"]
        assert list(metrics) == ["preservation_drift", "trigger_response", "leak_score"]
        # the fine-tune moved away from its base: a drift > 0 at strength 1
        assert metrics["preservation_drift"]["strength"] == 1.0 and metrics["preservation_drift"]["overall"] > 0
        assert all(math.isfinite(v) and v > 0 for v in metrics["trigger_response"]["per_sigma"].values())
    assert events[4]["metrics"]["preservation_drift"]["overall"] > events[2]["metrics"]["preservation_drift"]["overall"]
    # evaluate takes adapters: a fine-tune's checkpoint (or its folder) is named with the way to a LoRA
    with pytest.raises(CheckpointError, match=r"a whole DiT checkpoint \(a fine-tune's output\), not a network "
                                              r"file; .*anima-trainer extract --base <base DiT> --tuned "):
        find_checkpoints([run.final_path])
    with pytest.raises(CheckpointError, match=r"no network file to evaluate .*whole DiT checkpoint\(s\) "
                                              r"\(a fine-tune's\): .*anima-trainer extract"):
        find_checkpoints([run.final_path.parent])


def test_a_resumed_finetune_measures_against_the_base_file(setup, tmp_path, probe, monkeypatch):
    """The base copy W0 of a resumed run comes from the base file (the network is built on it before the state
    restores the trained values): the resumed run's evaluation at step 4 equals the straight run's."""
    args = ("--save_every_n_steps", "2", "--save_state", "--eval_every_n_steps", "2", "--eval_prompts", str(probe),
            "--eval_trigger", "sks")
    reference = run_training(_config(setup, tmp_path / "ref", *args, steps=5))
    with killed_after(monkeypatch, 3, RuntimeError):
        run_training(_config(setup, tmp_path / "cut", *args, steps=5))
    resumed = run_training(_config(setup, tmp_path / "cut", *args, "--resume", "latest", steps=5))
    assert resumed.steps == reference.steps == 5 and _same_file(reference.final_path, resumed.final_path)
    metrics = {name: {s: e["metrics"] for s, e in _evaluations(tmp_path / name).items()} for name in ("ref", "cut")}
    assert sorted(metrics["ref"]) == [2, 4] and metrics["cut"] == metrics["ref"]  # step 4 after the resume


def test_preservation_in_a_finetune_is_zero_at_the_first_step_and_trains(setup, tmp_path, monkeypatch):
    """At step 1 the weights are the base's, so the term is exactly 0; afterwards it is the squared difference
    to the base model (its definition against a hand computation: tests/networks/test_finetune_strength.py)."""
    terms: list[float] = []
    real = loop.training_step

    def step(*args, extra_loss=None, **kwargs):
        def recording(x_t, sigma):
            weighted = extra_loss(x_t, sigma)
            terms.append(weighted.item())
            return weighted
        return real(*args, extra_loss=None if extra_loss is None else recording, **kwargs)

    monkeypatch.setattr(loop, "training_step", step)
    run = run_training(_config(setup, tmp_path / "pres", "--preservation_loss_weight", "1.0", steps=3))
    assert run.steps == 3 and len(terms) == 3
    assert terms[0] == 0.0 and terms[1] > 0 and terms[2] > 0
    assert run.network.multiplier == 1.0
