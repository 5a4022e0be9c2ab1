"""examples/: every train/dataset pair validates as written (only the placeholder paths swapped for the demo's tiny
models and a demo dataset), and the smoke pair really trains its 10 steps."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from safetensors import safe_open

from anima_trainer.config import parse_train_args
from anima_trainer.config.tomlw import dumps
from anima_trainer.data import build_dataset, load_dataset_config
from anima_trainer.demo import write_demo_models, write_shapes_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ("smoke", "character_lora", "style_lokr", "low_vram")
PLACEHOLDERS = {  # what `anima-trainer download --dest models` writes
    "pretrained_model_name_or_path": "models/diffusion_models/anima-base-v1.0.safetensors",
    "qwen3": "models/text_encoders/qwen_3_06b_base.safetensors",
    "qwen3_tokenizer_path": "models/tokenizers/qwen",
    "t5_tokenizer_path": "models/tokenizers/t5",
    "vae": "models/vae/qwen_image_vae.safetensors",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("examples")
    models = write_demo_models(root / "models", seed=4)
    return {"root": root, "models": models, "images": write_shapes_dataset(root / "images", count=4, seed=4)}


def _substitute(name: str, tiny: dict, out: Path) -> Path:
    """The example pair with its placeholders replaced; every other value exactly as in examples/."""
    train = tomllib.loads((EXAMPLES / name / "train.toml").read_text(encoding="utf-8"))
    dataset = tomllib.loads((EXAMPLES / name / "dataset.toml").read_text(encoding="utf-8"))
    models = tiny["models"]
    real = {"pretrained_model_name_or_path": models["dit"], "qwen3": models["qwen3"], "vae": models["vae"],
            "qwen3_tokenizer_path": models["tokenizers"] / "qwen", "t5_tokenizer_path": models["tokenizers"] / "t5"}
    seen = set()
    for table in train.values():
        for key, placeholder in PLACEHOLDERS.items():
            if key in table:
                assert table[key] == placeholder, f"{name}: {key} should be the download layout's {placeholder}"
                table[key] = str(real[key])
                seen.add(key)
        if "dataset_config" in table:
            assert table["dataset_config"] == f"examples/{name}/dataset.toml"
            table["dataset_config"] = str(out / "dataset.toml")
        if "output_dir" in table:
            table["output_dir"] = str(out / "output")
        if "sample_prompts" in table:
            assert (EXAMPLES.parent / table["sample_prompts"]).is_file()
            table["sample_prompts"] = str(EXAMPLES.parent / table["sample_prompts"])
    assert seen == set(PLACEHOLDERS), f"{name}: missing model paths {set(PLACEHOLDERS) - seen}"
    subsets = [s for d in dataset["datasets"] for s in d["subsets"]]
    assert subsets and all(s["image_dir"].startswith("datasets/") for s in subsets)
    for s in subsets:
        s["image_dir"] = str(tiny["images"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.toml").write_text(dumps(dataset), encoding="utf-8")
    (out / "train.toml").write_text(dumps(train), encoding="utf-8")
    return out / "train.toml"


@pytest.mark.parametrize("name", NAMES)
def test_example_validates(name, tiny, tmp_path):
    cfg = parse_train_args(["--config_file", str(_substitute(name, tiny, tmp_path))])
    ds = build_dataset(load_dataset_config(cfg.dataset_config), default_batch_size=cfg.train_batch_size)
    assert ds.num_images == 4 and len(ds) > 0
    if name == "low_vram":
        assert cfg.gradient_checkpointing and cfg.cache_latents_to_disk and cfg.cache_text_encoder_outputs_to_disk
        assert cfg.mixed_precision == "bf16" and cfg.train_batch_size == 1
    if name == "style_lokr":
        assert cfg.network_module == "lokr" and cfg.network_args["factor"] == "8"


def test_smoke_example_trains_ten_steps(tiny, tmp_path):
    from anima_trainer.train.loop import run_training

    cfg = parse_train_args(["--config_file", str(_substitute("smoke", tiny, tmp_path))])
    assert cfg.max_train_steps == 10
    run = run_training(cfg)
    assert run.steps == 10 and len(run.losses) == 10
    assert run.final_path == tmp_path / "output" / "smoke.safetensors"
    with safe_open(run.final_path, "pt") as f:
        keys = list(f.keys())
        assert any(k.endswith(".lora_up.weight") for k in keys)
        assert all(k.startswith("diffusion_model.") for k in keys)
