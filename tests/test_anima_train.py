"""anima_train.py, the drop-in for kohya's full fine-tune script: a kohya command line (as a subprocess) trains
the DiT itself in the fine-tune mode and writes a whole DiT checkpoint in the base file's layout; adapter
options get their notice; --help names the script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from anima_trainer.demo import write_demo_models, write_shapes_dataset
from tests.support.kohya_cli import kohya_models_and_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "anima_train.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dropin_ft")
    models = write_demo_models(root / "models", seed=6)
    write_shapes_dataset(root / "img" / "2_shapes", count=2, seed=1)  # kohya train_data_dir layout
    return {"root": root, "models": models}


def test_kohya_finetune_command_line_trains_the_dit_as_a_script(setup, tmp_path):
    m, root, out = setup["models"], setup["root"], tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), *kohya_models_and_data(m, root / "img"),
            "--output_dir", str(out), "--output_name", "cli_ft",
            "--save_model_as", "safetensors", "--save_precision", "bf16", "--network_dim", "8",
            "--mixed_precision", "no", "--optimizer_type", "AdamW", "--learning_rate", "1e-5",
            "--self_attn_lr", "2e-5", "--mod_lr", "0", "--cache_latents", "--max_train_steps", "2",
            "--max_data_loader_n_workers", "0", "--seed", "42", "--log_with", "none"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("notice: network_dim: an adapter-network option") == 1
    assert "(fine-tune)" in proc.stderr  # the start-up line names what trains
    with safe_open(str(m["dit"]), "pt") as base, safe_open(str(out / "cli_ft.safetensors"), "pt") as tuned:
        keys = set(tuned.keys())
        assert keys == set(base.keys())
        assert tuned.metadata()["format"] == "pt"
        assert {str(tuned.get_tensor(k).dtype) for k in keys} == {"torch.bfloat16"}


def test_help_names_the_finetune_script():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: anima_train.py") and "full fine-tune" in proc.stdout
    assert "--trainable_patterns" in proc.stdout
