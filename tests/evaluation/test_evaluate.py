"""`anima-trainer eval` end to end on a tiny run (evaluation/evaluate.py, eval_command.py): every saved network in
training order with EMA flagged, the held-out loss equal to the run's logged `val/loss` and every light metric
equal to the run's logged `evaluation` event, drift/response equal to a direct measurement, the grids and the
report written, the printed command repeating the numbers, file inputs, and the documented errors."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from anima_trainer.cli import main
from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml, write_demo_models, write_shapes_dataset
from anima_trainer.evaluation.eval_results import EvalResults
from anima_trainer.evaluation.evaluate import at_zero_strength
from anima_trainer.evaluation.probe import ProbeSet, measure_at_strength
from anima_trainer.models import load_dit, load_text_encoder
from anima_trainer.networks import create_network_from_weights
from anima_trainer.sample.generate import encode_prompts
from anima_trainer.train.loop import run_training
from tests.support.cli_output import one_error_line

PROMPTS = ["a red circle on a white background", "1girl, smile"]
# small but complete: one seed, strengths 0 and 1, 64 px probes, two 64 px grid prompts of 2 steps
FAST = ["--seeds", "0", "--strengths", "0", "1", "--probe_resolution", "64", "--grid_prompts", "2", "--grid_size",
        "64", "--grid_steps", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 4-step run: saves at steps 2 and 4 (fp32), each with its EMA file, validation and the light metrics at
    both (probe prompts = the sample prompts), trigger 'sks'."""
    root = tmp_path_factory.mktemp("evalrun")
    models = write_demo_models(root / "models", seed=3)
    images = write_shapes_dataset(root / "images", count=6, seed=3)
    toml = write_demo_configs(root, models, images, 4, seed=5)
    write_demo_dataset_toml(root / "dataset.toml", images, batch_size=2, extra="validation_split = 0.34\n")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    cfg = parse_train_args(["--config_file", str(toml), "--save_every_n_steps", "2", "--ema_decay", "0.9",
                            "--save_precision", "float", "--validate_every_n_steps", "2",
                            "--metadata_trigger_phrase", "sks", "--sample_prompts", str(prompts),
                            "--eval_every_n_steps", "2", "--eval_prompts", str(prompts)])
    run_training(cfg)
    out = Path(cfg.output_dir)
    (out / "stray.safetensors").write_bytes(b"not a network")  # skipped with a note
    return {"root": root, "models": models, "images": images, "out": out, "prompts": prompts,
            "events": [json.loads(line) for line in (out / "demo_lora.events.jsonl").read_text().splitlines()]}


def _eval(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _model_flags(run: dict) -> list[str]:
    m = run["models"]
    return ["--dit", str(m["dit"]), "--qwen3", str(m["qwen3"]), "--vae", str(m["vae"]),
            "--qwen3_tokenizer_path", str(m["tokenizers"] / "qwen"), "--t5_tokenizer_path", str(m["tokenizers"] / "t5")]


def _numbers(results: EvalResults) -> list[dict]:
    return [{k: v for k, v in c.as_dict().items() if k != "path"} for c in results.checkpoints]


def test_eval_of_a_run_folder_measures_every_save_as_the_run_did(run, capsys, tmp_path):
    out = run["out"]
    # the run's defaults: its probe (eval_prompts, seeds 0 1, 512 px) and trigger, as its evaluation events
    code, stdout, err = _eval(capsys, str(out), "--strengths", "0", "1", "--grid_prompts", "3", "--grid_size", "64",
                              "--grid_steps", "2")
    assert code == 0, err
    lines = stdout.splitlines()
    command = shlex.split(lines[0])
    assert command[:3] == ["anima-trainer", "eval", str(out)]
    for flag, value in (("--out", str(out / "eval")), ("--dit", str(run["models"]["dit"])),
                        ("--run_config", str(out / "demo_lora.events.jsonl")),
                        ("--sample_prompts", str(run["prompts"])), ("--prompts", str(run["prompts"])),
                        ("--trigger", "sks"), ("--seeds", "0"), ("--probe_resolution", "512"), ("--device", "cpu"),
                        ("--dtype", "fp32"), ("--grid_prompts", "3"), ("--drift_threshold", "0.01")):
        assert command[command.index(flag) + 1] == value, flag
    assert command[command.index("--strengths") + 1:command.index("--strengths") + 3] == ["0", "1"]
    assert "stray.safetensors (not a network file)" in err
    assert lines[-1] == str(out / "eval" / "report.html")
    assert str(out / "eval" / "results.json") in lines
    assert lines[lines.index("recommendation:") + 1].startswith("  Recommended: ")
    table = [line.split() for line in lines if line.startswith("  demo_lora")]
    assert [row[0] for row in table] == ["demo_lora-step00000002", "demo_lora-step00000002-ema", "demo_lora",
                                         "demo_lora-ema"]

    results = EvalResults.load(out / "eval")
    assert results.command == lines[0]
    assert [(c.label, c.step, c.epoch, c.ema) for c in results.checkpoints] == [
        ("demo_lora-step00000002", 2, 1, False), ("demo_lora-step00000002-ema", 2, 1, True),
        ("demo_lora", 4, 2, False), ("demo_lora-ema", 4, 2, True)]
    # the held-out loss is the run's val/loss at the same step, to the bit (fp32 saves, same device and dtype)
    logged = {e["step"]: e for e in run["events"] if e["type"] == "validation"}
    for c in results.checkpoints:
        if not c.ema:
            assert c.heldout_loss.overall == logged[c.step]["val/loss"]
            sigma_keys = [f"val/loss_sigma_{s:g}" for s in c.heldout_loss.sigmas]
            assert c.heldout_loss.per_sigma == tuple(logged[c.step][key] for key in sigma_keys)
    assert results.base_heldout is not None and results.base_heldout.strength is None
    assert all(c.heldout_loss.overall != results.base_heldout.overall for c in results.checkpoints)
    assert results.settings["heldout"]["source"] == "run" and results.settings["heldout"]["images"] == 2
    assert results.settings["probe"]["prompts_without_trigger"] == PROMPTS
    assert results.checkpoints[0].analysis["modules"]  # the weight analysis of each network
    assert results.settings["run_speed_settings"]["fuse_qkv"] is True  # the run's levers (its default: fused q/k/v)
    # every light metric at strength 1 is the run's logged evaluation at that step, to the bit
    evaluated = {e["step"]: e for e in run["events"] if e["type"] == "evaluation"}
    for c in results.checkpoints:
        if not c.ema:
            metrics = c.at_strength(1.0).metrics() | {"heldout_loss": c.heldout_loss}
            assert {name: m.as_dict() for name, m in metrics.items()} == evaluated[c.step]["metrics"]
    # the grids: the sample prompts, then the probe's first prompt with the trigger put in
    assert [g.kind for g in results.grids] == ["strengths"] * 3 + ["prompts"]
    assert all((out / "eval" / g.path).is_file() for g in results.grids)
    assert [p["text"] for p in results.settings["grid_prompts"]] == [*PROMPTS, f"sks, {PROMPTS[0]}"]
    # the report's data island (which every number on the page points into) is results.json
    page = (out / "eval" / "report.html").read_text(encoding="utf-8")
    island = re.search(r'<script type="application/json" id="results">(.*?)</script>', page, re.S).group(1)
    assert json.loads(island) == json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    assert all(g.path in page for g in results.grids)

    # drift and response equal a direct measurement of the same file with the same probe
    dit = load_dit(run["models"]["dit"], dtype=torch.float32)
    te = load_text_encoder(run["models"]["qwen3"], qwen3_tokenizer_path=run["models"]["tokenizers"] / "qwen",
                           t5_tokenizer_path=run["models"]["tokenizers"] / "t5", dtype=torch.float32)
    probe = ProbeSet.encode(PROMPTS, lambda texts: encode_prompts(dit, te, texts), trigger="sks")
    last = results.checkpoints[2]
    network = create_network_from_weights(dit, out / "demo_lora.safetensors")
    direct = measure_at_strength(dit, network, probe, 1.0)
    assert last.at_strength(1.0).as_dict() == direct.as_dict()
    assert direct.trigger_response.overall > 0 and direct.preservation_drift.overall > 0
    # strength 0 is recorded without forwards: exactly what the measurement gives
    zero = measure_at_strength(dit, network, probe, 0.0)
    assert at_zero_strength(probe).as_dict() == zero.as_dict() == last.at_strength(0.0).as_dict()
    network.remove()

    # the printed command repeats the numbers (into another folder)
    again = command[:]
    again[again.index("--out") + 1] = str(tmp_path / "again")
    code, stdout, err = _eval(capsys, *again[2:])
    assert code == 0, err
    assert stdout.splitlines()[0] == shlex.join(again)
    assert _numbers(EvalResults.load(tmp_path / "again")) == _numbers(results)

    # an existing results folder is never replaced unasked
    code, _, err = _eval(capsys, str(out), *FAST)
    assert code == 2
    assert one_error_line(err) == (f"error: {out / 'eval' / 'results.json'} already exists; pass --overwrite (or "
                                   "choose another name) to replace it")


def test_eval_of_files_with_a_heldout_folder(run, capsys, tmp_path):
    ema = run["out"] / "demo_lora-step00000002-ema.safetensors"
    code, stdout, err = _eval(capsys, str(ema), *_model_flags(run), *FAST, "--prompts", str(run["prompts"]),
                              "--no_trigger", "--heldout_images", str(run["images"]), "--heldout_resolution", "64",
                              "--heldout_batch_size", "3", "--out", str(tmp_path / "files"), "--no_analysis")
    assert code == 0, err
    assert "--no_trigger" in shlex.split(stdout.splitlines()[0]) and "--run_config" not in stdout.splitlines()[0]
    results = EvalResults.load(tmp_path / "files")
    (only,) = results.checkpoints
    assert (only.label, only.step, only.epoch, only.ema) == ("demo_lora-step00000002-ema", 2, 1, True)  # metadata
    assert only.heldout_loss.samples == 6 and results.settings["heldout"]["source"] == "folder"
    assert results.settings["run_speed_settings"] is None  # no run: the models as loaded
    assert only.at_strength(1.0).trigger_response is None and only.analysis is None  # drift only
    assert only.at_strength(1.0).preservation_drift.overall > 0


def test_a_run_folder_without_its_event_log_reads_the_metadata(run, tmp_path):
    from anima_trainer.evaluation.checkpoints import find_checkpoints

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in run["out"].glob("*.safetensors"):
        shutil.copy(path, copy / path.name)
    search = find_checkpoints([copy])
    assert [(c.label, c.step, c.epoch, c.ema) for c in search.checkpoints] == [
        ("demo_lora-step00000002", 2, 1, False), ("demo_lora-step00000002-ema", 2, 1, True),
        ("demo_lora", 4, 2, False), ("demo_lora-ema", 4, 2, True)]
    assert search.event_logs == [] and "stray.safetensors (not a network file)" in search.notes[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["{missing}"], "error: {missing}: no such file or folder"),
    (["{empty}"], "error: {empty}: no network file to evaluate"),
    (["{net}", "--trigger", "sks", "--no_trigger"], "error: --trigger and --no_trigger: give one of them"),
    (["{net}", "--no_heldout"], "error: eval needs the base model files: --dit, --qwen3, --vae"),
])
def test_bad_inputs_are_one_error_line(run, capsys, tmp_path, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    names = {"missing": str(tmp_path / "missing.safetensors"), "empty": str(empty),
             "net": str(run["out"] / "demo_lora.safetensors")}
    code, _, err = _eval(capsys, *[a.format(**names) for a in argv])
    assert code == 2
    assert one_error_line(err).startswith(message.format(**names))
