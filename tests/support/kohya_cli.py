"""The model files and kohya `--train_data_dir` dataset part of a kohya command line, shared by the drop-in script
tests (anima_train.py, anima_train_network.py): what every such run needs before its own options."""

from __future__ import annotations

from pathlib import Path


def kohya_models_and_data(models: dict[str, Path], train_data_dir: Path) -> list[str]:
    """kohya's model options for the demo's tiny models and its dataset options for a 64 px bucketed
    `train_data_dir` with `.txt` captions."""
    return ["--pretrained_model_name_or_path", str(models["dit"]), "--qwen3", str(models["qwen3"]),
            "--qwen3_tokenizer_path", str(models["tokenizers"] / "qwen"),
            "--t5_tokenizer_path", str(models["tokenizers"] / "t5"),
            "--vae", str(models["vae"]), "--train_data_dir", str(train_data_dir), "--resolution", "64,64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
            "--caption_extension", ".txt"]
