"""A diffusers-layout Anima folder built from the tiny single-file models, with diffusers' and transformers' own
`save_pretrained` (so the folder is what those libraries write, not what our loader expects).

Layout as diffusers' Anima pipeline names its components: transformer/ (CosmosTransformer3DModel, sharded with an
index json), text_conditioner/ (AnimaTextConditioner), text_encoder/ (Qwen3Model), tokenizer/, t5_tokenizer/,
vae/ (AutoencoderKLQwenImage), and model_index.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.support.diffusers_oracle import load_diffusers_oracle

MODEL_INDEX = {
    "_class_name": "AnimaModularPipeline", "_diffusers_version": "0.42.1",
    "transformer": ["diffusers", "CosmosTransformer3DModel"], "text_conditioner": ["diffusers", "AnimaTextConditioner"],
    "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "t5_tokenizer": ["transformers", "T5TokenizerFast"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def write_diffusers_anima(root: Path, models: dict[str, Path], *, shard_kb: int | None = 200,
                          index_name: str = "model_index.json") -> Path:
    """Write the tiny `models` (write_demo_models' dict: dit, qwen3, vae, tokenizers) as a diffusers folder."""
    from diffusers import AutoencoderKLQwenImage

    from anima_trainer.models.text import load_qwen3
    from anima_trainer.models.vae import VAE_CONFIG

    root.mkdir(parents=True, exist_ok=True)
    oracle = load_diffusers_oracle(models["dit"])
    shard = f"{shard_kb}KB" if shard_kb else "10GB"
    oracle.transformer.save_pretrained(root / "transformer", max_shard_size=shard)
    oracle.conditioner.save_pretrained(root / "text_conditioner")
    load_qwen3(models["qwen3"], dtype=torch.float32).save_pretrained(root / "text_encoder")
    vae_state = load_file(models["vae"])
    vae = AutoencoderKLQwenImage(**{**VAE_CONFIG, "base_dim": vae_state["encoder.conv_in.weight"].shape[0]})
    vae.load_state_dict(vae_state)
    vae.save_pretrained(root / "vae")
    shutil.copytree(models["tokenizers"] / "qwen", root / "tokenizer")
    shutil.copytree(models["tokenizers"] / "t5", root / "t5_tokenizer")
    (root / index_name).write_text(json.dumps(MODEL_INDEX, indent=2))
    return root
