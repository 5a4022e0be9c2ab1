"""The fine-tune mode end to end on the tiny model (training_mode = "finetune", kohya's anima_train.py): the loss
falls, the saved DiT checkpoint reloads with load_dit bit-exactly in the base file's layout, a partial fine-tune
leaves every other tensor untouched, and an interrupted run resumes bit-identically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.models import load_dit
from anima_trainer.train import training_state as states
from anima_trainer.train.loop import run_training
from tests.support.killed_run import killed_after
from tests.train.conftest import fixed_sigma_loss


def _config(setup: dict, out: Path, *extra: str, steps: int, defaults: bool = False):
    """The demo's train.toml in fine-tune mode; `defaults`: without the demo's overwrite = true (a user's
    defaults) and with a dataset whose flips and captions change per epoch (as the LoRA resume test)."""
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5,
                              training_extra='training_mode = "finetune"\n')
    if defaults:
        toml.write_text(toml.read_text().replace("overwrite = true\n", ""))
        write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1, num_repeats=2,
                                extra="flip_aug = true\nshuffle_caption = true\ncaption_tag_dropout_rate = 0.2\n")
    return parse_train_args(["--config_file", str(toml), *extra])


def test_finetune_lowers_the_loss_and_its_checkpoint_reloads_exactly(setup, tmp_path):
    cfg = _config(setup, tmp_path, "--learning_rate", "1e-3", steps=30)
    base_path = setup["models"]["dit"]
    before = fixed_sigma_loss(load_dit(base_path, dtype=torch.float32), setup["models"], tmp_path / "dataset.toml")
    run = run_training(cfg)
    after = fixed_sigma_loss(run.dit, setup["models"], tmp_path / "dataset.toml")
    assert after < before / 1.3, (before, after)  # stated factor ≥ 1.3
    assert run.steps == 30 and run.network.algo == "finetune"
    with safe_open(str(base_path), "pt") as base, safe_open(str(run.final_path), "pt") as tuned:
        base_keys, keys, meta = set(base.keys()), set(tuned.keys()), tuned.metadata()
    assert keys == base_keys  # the published layout: every `net.` key of the base file, no other
    assert meta["format"] == "pt" and meta["anima_trainer_training_mode"] == "finetune"
    assert meta["ss_output_name"] == "demo_lora" and meta["modelspec.architecture"] == "anima-preview"
    assert not [k for k in meta if k.startswith("ss_network_")]  # a whole model, not an adapter
    reloaded = load_dit(run.final_path, dtype=torch.float32)
    trained = run.dit.state_dict()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in trained.items())
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert torch.equal(reloaded(x, s, ctx), run.dit(x, s, ctx))
    # the LLM adapter is opt-in: untouched by default
    base = load_dit(base_path, dtype=torch.float32).state_dict()
    assert all(torch.equal(base[k], v) for k, v in trained.items() if k.startswith("llm_adapter."))


def test_partial_finetune_trains_only_the_selection_and_saves_bf16(setup, tmp_path):
    """With gradient checkpointing, the validation loss and previews on: the same machinery as LoRA."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --s 4 --l 1 --d 0\n")
    cfg = _config(setup, tmp_path, "--learning_rate", "1e-3", "--save_precision", "bf16", "--trainable_patterns",
                  r"^blocks\.1\.", r"\.cross_attn\.", "--mlp_lr", "0", "--gradient_checkpointing",
                  "--validation_split", "0.25", "--validate_every_n_steps", "2", "--sample_prompts", str(prompts),
                  "--sample_every_n_steps", "2", steps=4)
    run = run_training(cfg)
    assert len(list((tmp_path / "output" / "sample").glob("*.png"))) == 2  # steps 2 and 4
    lines = (tmp_path / "output" / "demo_lora.events.jsonl").read_text().splitlines()
    validated = {e["step"] for e in map(json.loads, lines) if e["type"] == "validation"}
    losses = [e["val/loss"] for e in map(json.loads, lines) if e["type"] == "validation"]
    assert {2, 4} <= validated and losses and all(math.isfinite(v) for v in losses)
    base = load_dit(setup["models"]["dit"], dtype=torch.float32).state_dict()
    trained = run.dit.state_dict()
    chosen = {k for k in base if (k.startswith("blocks.1.") or ".cross_attn." in k)
              and not k.startswith("llm_adapter.") and ".mlp." not in k}  # mlp_lr = 0 freezes the MLPs
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed == chosen
    saved = load_file(run.final_path)
    assert all(saved["net." + k].dtype == torch.bfloat16 and torch.equal(saved["net." + k], v.bfloat16())
               for k, v in trained.items())


def test_interrupted_finetune_resumes_bit_identically_with_default_options(setup, tmp_path, monkeypatch):
    extra = ("--save_every_n_steps", "2", "--save_state", "--learning_rate", "1e-3", "--lr_scheduler", "linear")
    reference = run_training(_config(setup, tmp_path / "ref", *extra, steps=7, defaults=True))
    with killed_after(monkeypatch, 5):  # killed during micro-batch 6, after the step-4 state
        run_training(_config(setup, tmp_path / "cut", *extra, steps=7, defaults=True))
    out = tmp_path / "cut" / "output"
    assert (out / "demo_lora-step00000004-state").is_dir()
    # the state holds the trained DiT tensors (the selection) and the optimizer state, not the frozen rest
    held = load_file(out / "demo_lora-step00000004-state" / "network.safetensors")
    assert held and not any(k.startswith("llm_adapter.") for k in held)
    resumed = run_training(_config(setup, tmp_path / "cut", "--resume", "latest", *extra, steps=7, defaults=True))
    assert resumed.steps == reference.steps == 7
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert states.read_progress(out / "demo_lora-state").step == 7
