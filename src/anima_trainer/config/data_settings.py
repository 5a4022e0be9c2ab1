"""Data options of `TrainConfig`: the dataset TOML, and the caches of the frozen encoders (content-addressed
safetensors beside the images when *_to_disk; train/inputs.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class DatasetSettings(BaseModel):
    """The dataset TOML (a mixin of TrainConfig; kohya's dataset format, data/config.py)."""

    dataset_config: Path = Field(description="kohya dataset TOML")


class CacheSettings(BaseModel):
    """Fields of the encoder caches (a mixin of TrainConfig).  prior_loss_weight is declared among them only to
    keep the order of `--help` (it belongs to "objective", config/sections.py)."""

    cache_latents: bool = Field(False, description="encode every image once before training and keep the latents in "
        "RAM")
    cache_latents_to_disk: bool = Field(False, description="the latent cache as safetensors files beside the images "
        "(reused across runs)")
    cache_text_encoder_outputs: bool = Field(False, description="encode every caption once and keep the Qwen3 states "
        "in RAM")
    cache_text_encoder_outputs_to_disk: bool = Field(False, description="the text cache on disk")
    vae_batch_size: int = Field(1, ge=1, description="images per VAE call while caching latents")
    text_encoder_batch_size: int | None = Field(None, ge=1, description="captions per Qwen3 call while caching "
        "(default 8)")
    caption_variants: int = Field(8, ge=1, le=1024, description="random captions + text cache: processed variants "
        "encoded per caption")
    prior_loss_weight: float = Field(1.0, ge=0, description="loss weight of regularisation (is_reg) images")
    cache_llm_adapter_outputs: bool = Field(False, description="frozen LLM adapter: its output per caption computed "
        "once (RAM)")
