"""Evidence on the tiny model (issue 17 item 3): a LoRA trained on one coloured-shape concept with a trigger word,
measured during the run (eval_every_n_steps, train/measurements.py).

  * the trigger response rises across checkpoints, and preservation drift stays below it;
  * with the preservation loss on (same seed, same steps) the final leak score is lower than without;
  * the EMA weights differ from the raw ones, and the -ema file holds exactly the EMA;
  * the logged metrics are deterministic, and measuring more often does not change the training;
  * the logged numbers are the file's numbers: `light_metrics` recomputed from the network file saved at a step
    equals what the run logged at that step (and its held-out loss is the validation loss of that step).

Each configuration trains once (module fixtures).  The probe runs at an 8 × 8 latent (the dataset's size) instead
of the 64 × 64 default, which only makes it cheaper.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.measurements as measurements
from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml, write_demo_models
from anima_trainer.evaluation.probe import ProbeSet, light_metrics
from anima_trainer.evaluation.prompt_bank import bank_from_file
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.models import load_dit, load_text_encoder
from anima_trainer.networks import create_network
from anima_trainer.train.events import read_events
from anima_trainer.train.inputs import TextConditioner
from anima_trainer.train.loop import TrainRun, run_training
from tests.support.concept import write_concept_dataset

TRIGGER = "zqx"
STEPS, EVERY = 12, 4
PROBE_LATENT = (8, 8)
PROBE_PROMPTS = ("a blue square on a white background", "a green triangle on a white background",
                 "a yellow circle on a black background", "1girl, solo, smile", "scenery, mountains, sunset", "")
# lr 1e-2, dim 8, 12 steps of 3 images (one of the 4 held out): the response grows ~10× over the run, and the
# preservation loss (weight 1) lowers the final leak score by ~0.2 (margins: docs in the report of issue 17)
ARGS = ("--learning_rate", "1e-2", "--network_dim", "8", "--network_alpha", "8", "--save_precision", "float",
        "--eval_trigger", TRIGGER, "--save_every_n_steps", str(EVERY), "--validation_split", "0.25",
        "--ema_decay", "0.9")


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evidence")
    prompts = root / "probe.txt"
    prompts.write_text("\n".join(PROBE_PROMPTS) + "\n", encoding="utf-8")
    return {"root": root, "models": write_demo_models(root / "models", seed=3), "prompts": prompts,
            "images": write_concept_dataset(root / "images", TRIGGER, count=4)}


def _train(concept: dict, name: str, *extra: str) -> tuple[TrainRun, list[dict]]:
    out = concept["root"] / name
    toml = write_demo_configs(out, concept["models"], concept["images"], STEPS, seed=1)
    write_demo_dataset_toml(out / "dataset.toml", concept["images"], batch_size=4)
    cfg = parse_train_args(["--config_file", str(toml), "--eval_prompts", str(concept["prompts"]), *ARGS, *extra])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measurements, "PROBE_LATENT_SIZE", PROBE_LATENT)
        run = run_training(cfg)
    return run, read_events(out / "output" / "demo_lora.events.jsonl")


@pytest.fixture(scope="module")
def plain(concept):
    return _train(concept, "plain", "--eval_every_n_steps", str(EVERY), "--log_with", "tensorboard",
                  "--logging_dir", str(concept["root"] / "plain" / "logs"))


@pytest.fixture(scope="module")
def often(concept):
    """The plain run measured twice as often: the same training, the same numbers where both measure."""
    return _train(concept, "often", "--eval_every_n_steps", str(EVERY // 2))


@pytest.fixture(scope="module")
def preserved(concept):
    return _train(concept, "preserved", "--eval_every_n_steps", str(EVERY), "--preservation_loss_weight", "1")


def _evaluations(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "evaluation"]


def _overall(event: dict, name: str) -> float:
    return event["metrics"][name]["overall"]


def test_the_trigger_response_rises_and_the_drift_stays_below_it(plain):
    evaluations = _evaluations(plain[1])
    assert [e["step"] for e in evaluations] == [4, 8, 12]
    response = [_overall(e, "trigger_response") for e in evaluations]
    drift = [_overall(e, "preservation_drift") for e in evaluations]
    assert response == sorted(response) and response[-1] > 5 * response[0]
    assert all(d < r for d, r in zip(drift, response, strict=True))
    assert all(0 < _overall(e, "leak_score") < 1 for e in evaluations)


def test_the_preservation_loss_lowers_the_leak_score(plain, preserved):
    without, with_ = _evaluations(plain[1])[-1], _evaluations(preserved[1])[-1]
    assert with_["step"] == without["step"] == STEPS
    assert _overall(with_, "leak_score") < _overall(without, "leak_score") - 0.1
    assert _overall(with_, "preservation_drift") < _overall(without, "preservation_drift")


def test_the_ema_differs_from_the_raw_weights_and_is_what_its_file_holds(plain):
    run = plain[0]
    raw = {k: v.clone() for k, v in run.network.state_tensors().items()}
    with run.ema.swapped():
        ema = {k: v.clone() for k, v in run.network.state_tensors().items()}
    saved = load_file(run.final_path.with_name("demo_lora-ema.safetensors"))
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if not k.endswith(".alpha"))
    assert all(torch.equal(load_file(run.final_path)[k], v) for k, v in raw.items())


def test_the_metrics_are_deterministic_and_measuring_does_not_change_the_training(plain, often):
    twice = _evaluations(often[1])
    assert [e["step"] for e in twice] == [2, 4, 6, 8, 10, 12]
    assert [e["path"] is None for e in twice] == [True, False] * 3  # saved every 4 steps only
    shared = {e["step"]: e for e in twice if e["step"] % EVERY == 0}
    for event in _evaluations(plain[1]):
        again = shared[event["step"]]
        assert again["metrics"] == event["metrics"] and again["epoch"] == event["epoch"]
        assert Path(again["path"]).name == Path(event["path"]).name
    assert plain[0].losses == often[0].losses
    assert load_file(plain[0].final_path).keys() == load_file(often[0].final_path).keys()
    assert all(torch.equal(a, load_file(often[0].final_path)[k]) for k, a in load_file(plain[0].final_path).items())


def test_each_evaluation_follows_its_save_names_its_file_and_is_logged(plain, concept):
    events = plain[1]
    for event in _evaluations(events):
        index = events.index(event)
        saves = [i for i, e in enumerate(events) if e["type"] == "save" and e["path"] == event["path"]]
        assert saves and saves[0] < index, event["step"]
        assert events[saves[0]]["step"] == event["step"]
    assert [Path(e["path"]).name for e in _evaluations(events)] == [
        "demo_lora-step00000004.safetensors", "demo_lora-step00000008.safetensors", "demo_lora.safetensors"]
    # the held-out loss of an evaluation is the validation loss of the same step (one definition)
    validation = {e["step"]: e for e in events if e["type"] == "validation"}
    for event in _evaluations(events):
        assert _overall(event, "heldout_loss") == validation[event["step"]]["val/loss"]
    assert set(_evaluations(events)[0]["metrics"]) == {"heldout_loss", "preservation_drift", "trigger_response",
                                                       "leak_score"}
    json.dumps(events)  # plain JSON
    from tests.train.test_operations import _scalars

    scalars = _scalars(concept["root"] / "plain" / "logs")
    assert [s for s, _ in scalars["eval/leak_score"]] == [4, 8, 12]
    assert [v for _, v in scalars["eval/trigger_response_sigma_0.4"]] == pytest.approx(
        [e["metrics"]["trigger_response"]["per_sigma"]["0.4"] for e in _evaluations(events)], rel=1e-6)


def test_the_logged_numbers_are_the_files_numbers(plain, concept):
    """light_metrics recomputed from the step-8 file on a fresh base equals what the run logged at step 8."""
    event = _evaluations(plain[1])[1]
    models = concept["models"]
    dit = load_dit(models["dit"], dtype=torch.float32)
    te = load_text_encoder(models["qwen3"], qwen3_tokenizer_path=models["tokenizers"], dtype=torch.float32)
    texts = [entry.text for entry in bank_from_file(concept["prompts"])]
    probe = ProbeSet.encode(texts, TextConditioner(dit, te).context, trigger=TRIGGER, latent_size=PROBE_LATENT)
    network = create_network(dit, algo="lora", dim=8, alpha=8)
    network.load_weights(event["path"])
    metrics = light_metrics(dit, network, probe, device="cpu")
    logged = {name: SigmaMetric.from_dict(m) for name, m in event["metrics"].items() if name != "heldout_loss"}
    assert metrics == logged
