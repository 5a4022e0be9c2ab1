"""A whole training run with 2 data-parallel processes (gloo, CPU) equals a single-process run with the same
global batch: 2 processes × batch 1 vs 1 process × batch 1 × gradient accumulation 2 (same samples per step,
per-sample noise seeds, no dropout)."""

from __future__ import annotations

import subprocess

import torch
from safetensors.torch import load_file

from anima_trainer.config import parse_train_args
from anima_trainer.config.tomlw import toml_value
from anima_trainer.demo import write_demo_configs
from anima_trainer.train.loop import run_training
from tests.train.test_distributed import launch_command


def _write(setup: dict, out, steps: int = 4):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    (out / "dataset.toml").write_text(f"""[general]
caption_extension = ".txt"
resolution = 64
batch_size = 1
flip_aug = true

[[datasets]]
  [[datasets.subsets]]
  image_dir = {toml_value(setup["images"])}
""", encoding="utf-8")
    return toml


def test_two_processes_equal_one_process_with_the_same_global_batch(setup, tmp_path):
    common = ["--learning_rate", "1e-2", "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
              "--save_every_n_steps", "2", "--save_state", "--log_with", "none"]
    single = run_training(parse_train_args(["--config_file", str(_write(setup, tmp_path / "one")),
                                            "--gradient_accumulation_steps", "2", *common]))
    toml = _write(setup, tmp_path / "two")
    argv, env = launch_command(2, ["-m", "anima_trainer", "train", "--config_file", str(toml), *common])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "two" / "output"
    a, b = load_file(single.final_path), load_file(out / "demo_lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_up" in k)  # it trained
    # one writer: one event log, one final file, states with each process's RNG
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["demo_lora-step00000002.safetensors",
                                                                 "demo_lora.safetensors"]
    state = out / "demo_lora-state"
    assert (state / "rng_rank0.json").is_file() and (state / "rng_rank1.json").is_file()
