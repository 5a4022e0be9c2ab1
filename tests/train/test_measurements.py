"""Measurements during the run (train/measurements.py): the eval_* options and their checks, when an evaluation
runs and which file its event names, that it touches no training RNG, and exact resume with it on.  The
evidence that the numbers mean something: tests/evaluation/test_evidence.py."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
import anima_trainer.train.measurements as measurements
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.evaluation.probe import ProbeSet
from anima_trainer.sample.prompts import PromptFileError
from anima_trainer.train.events import EVENT_TYPES, read_events
from anima_trainer.train.loop import run_training
from anima_trainer.train.measurements import Evaluation, Measurements
from anima_trainer.train.training_state import Progress
from tests.support.small_dit import SMALL, lora, small_dit
from tests.support.killed_run import killed_after


def _config(setup: dict, out: Path, *extra: str, steps: int = 3):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=2, num_repeats=1)
    return parse_train_args(["--config_file", str(toml), "--learning_rate", "1e-2", *extra])


# --- options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["eval_every_n_steps", "eval_every_n_epochs"])
def test_a_schedule_below_1_is_a_config_error_with_file_and_line(setup, tmp_path, key):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=5)
    toml.write_text(toml.read_text(encoding="utf-8") + f"{key} = 0\n", encoding="utf-8")
    lineno = len(toml.read_text(encoding="utf-8").splitlines())
    with pytest.raises(ConfigError) as info:
        parse_train_args(["--config_file", str(toml)])
    assert f"{key}: " in str(info.value) and f"(in {toml.name} line {lineno})" in str(info.value)


def test_defaults_trigger_and_notices(setup, tmp_path):
    cfg = _config(setup, tmp_path)
    assert (cfg.eval_every_n_steps, cfg.eval_every_n_epochs, cfg.eval_prompts, cfg.eval_trigger) == (None,) * 4
    assert not cfg.evaluates and not any("eval" in n for n in cfg.notices)
    no_trigger = _config(setup, tmp_path, "--eval_every_n_steps", "2")
    assert no_trigger.evaluates and no_trigger.resolved_eval_trigger() is None
    assert [n for n in no_trigger.notices if n.startswith("eval_every_n_*")] == [
        "eval_every_n_*: no eval_trigger and no metadata_trigger_phrase, so only preservation drift over every probe "
        "prompt is logged (no trigger response, no leak score); set eval_trigger to the word the captions use for "
        "the concept"]
    phrase = _config(setup, tmp_path, "--eval_every_n_epochs", "1", "--metadata_trigger_phrase", " sks ")
    assert phrase.resolved_eval_trigger() == "sks" and not any(n.startswith("eval_") for n in phrase.notices)
    both = _config(setup, tmp_path, "--eval_every_n_epochs", "1", "--metadata_trigger_phrase", "sks",
                   "--eval_trigger", "zqx")
    assert both.resolved_eval_trigger() == "zqx"
    idle = _config(setup, tmp_path, "--eval_trigger", "zqx", "--eval_prompts", "p.txt")
    assert "eval_trigger = zqx: no effect without eval_every_n_steps or eval_every_n_epochs" in idle.notices
    assert any(n.startswith("eval_prompts = p.txt: no effect") for n in idle.notices)
    assert "evaluation" in EVENT_TYPES


def test_a_trained_text_encoder_is_measured_with_a_notice(setup, tmp_path):
    """Not refused (unlike the preservation loss, the measurement does not change the training): the probe is
    encoded by the base encoder, and the notice says what that measures."""
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=5)
    text = toml.read_text(encoding="utf-8").replace("network_train_unet_only = true", "network_train_unet_only = false")
    toml.write_text(text + "eval_every_n_steps = 1\neval_trigger = \"sks\"\n", encoding="utf-8")
    cfg = parse_train_args(["--config_file", str(toml)])
    assert any("trains the text encoder" in n and "measure the DiT part" in n for n in cfg.notices)


def test_a_bad_eval_prompt_file_is_refused_before_any_model_loads(setup, tmp_path, monkeypatch):
    prompts = tmp_path / "probe.txt"
    prompts.write_text("1girl, solo --x 3\n", encoding="utf-8")
    monkeypatch.setattr(loop, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(PromptFileError, match=r"probe\.txt.*line 1: option --x is not known"):
        run_training(_config(setup, tmp_path / "bad", "--eval_every_n_steps", "1", "--eval_prompts", str(prompts),
                             steps=1))


# --- scheduling -------------------------------------------------------------------------------------------------
class _Events:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def write(self, type_: str, **fields) -> None:
        self.lines.append({"type": type_, **fields})


def _measurements(every_n_steps=None, every_n_epochs=None, saves: dict[int, str] | None = None):
    ran: list[int] = []
    evaluation = Evaluation(probe=None, heldout=[], every_n_steps=every_n_steps, every_n_epochs=every_n_epochs)
    events = _Events()
    m = Measurements(validator=None, evaluation=evaluation, dit=None, network=None, context_fn=None, device="cpu",
                     events=events, accelerator=SimpleNamespace(trackers=[]), pause=contextlib.nullcontext,
                     saved=lambda step: None if step not in (saves or {}) else Path(saves[step]))
    evaluation.run = lambda *a: ran.append(m_progress[0].step) or {}  # type: ignore[method-assign]
    m_progress: list[Progress] = []
    return m, events, ran, m_progress


def _step(m: Measurements, progress_box: list, step: int, epoch: int, *, epoch_ends: bool, last: bool) -> None:
    progress_box[:] = [Progress(step, epoch, 0)]
    m.after_step(progress_box[0])
    m.after_step_save(progress_box[0], epoch_ends=epoch_ends, last=last)


def test_an_evaluation_runs_after_every_save_of_its_step_and_only_once():
    # 3 steps per epoch, 2 epochs + 1 step (7 steps); every 2 steps and every epoch
    m, events, ran, box = _measurements(every_n_steps=2, every_n_epochs=1,
                                        saves={2: "s2", 3: "e1", 6: "e2", 7: "final"})
    step = 0
    for epoch, steps in ((1, 3), (2, 3), (3, 1)):
        for i in range(steps):
            step += 1
            last = step == 7
            _step(m, box, step, epoch, epoch_ends=i == steps - 1, last=last)
            if last:
                break
        m.at_epoch_end(box[0], epoch)
        m.after_epoch_save(box[0], last=step == 7)
    m.after_final_save(box[0])
    assert ran == [2, 3, 4, 6, 7]  # step 6: due by both rules, measured once, after the epoch's file
    assert [(e["step"], e["path"]) for e in events.lines] == [(2, "s2"), (3, "e1"), (4, None), (6, "e2"),
                                                              (7, "final")]
    assert all(e["type"] == "evaluation" and e["metrics"] == {} for e in events.lines)


def test_evaluation_runs_in_eval_mode_and_leaves_the_rng_as_it_was():
    dit = small_dit()
    network = lora(dit)
    network.train()
    probe = ProbeSet.encode(["a cat", ""], lambda texts: torch.randn(len(texts), 8, SMALL.crossattn_dim,
                                                                      generator=torch.Generator().manual_seed(1)),
                            trigger="sks", seeds=(0,), latent_size=(4, 4))
    evaluation = Evaluation(probe, [])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    metrics = evaluation.run(dit, network, None, "cpu")
    assert torch.equal(torch.get_rng_state(), before) and network.training
    assert list(metrics) == ["preservation_drift", "trigger_response", "leak_score"]
    assert metrics["trigger_response"].strength == 1.0


# --- in a run ---------------------------------------------------------------------------------------------------
def test_resume_with_evaluation_on_is_bit_identical(setup, tmp_path, monkeypatch):
    """rank_dropout draws from the training RNG every step: an evaluation that drew from it after a state was
    saved would make the resumed run differ.  The resumed run's evaluation equals the straight run's."""
    prompts = tmp_path / "probe.txt"
    prompts.write_text("a red circle\n\nscenery\n", encoding="utf-8")
    args = ("--save_every_n_steps", "2", "--save_state", "--network_args", "rank_dropout=0.2",
            "--eval_every_n_steps", "2", "--eval_prompts", str(prompts), "--eval_trigger", "sks")
    monkeypatch.setattr(measurements, "PROBE_LATENT_SIZE", (8, 8))
    reference = run_training(_config(setup, tmp_path / "ref", *args, steps=5))
    with killed_after(monkeypatch, 3, RuntimeError):
        run_training(_config(setup, tmp_path / "cut", *args, steps=5))
    resumed = run_training(_config(setup, tmp_path / "cut", *args, "--resume", "latest", steps=5))
    assert resumed.steps == reference.steps == 5
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    def evaluations(name: str) -> dict[int, dict]:
        return {e["step"]: e["metrics"] for e in read_events(tmp_path / name / "output" / "demo_lora.events.jsonl")
                if e["type"] == "evaluation"}
    assert sorted(evaluations("ref")) == [2, 4]
    assert evaluations("cut") == evaluations("ref")  # step 2 before the cut, step 4 after the resume
