"""Model-file options of `TrainConfig`: the DiT, text encoder and VAE files, the tokenizer folders, and where a
missing tokenizer is downloaded from at start-up (sd-scripts-anima's flags; tools/download/startup.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from anima_trainer.config.source_urls import parse_source


class ModelFileSettings(BaseModel):
    """Fields and the source check of the model files and tokenizers (a mixin of TrainConfig; its paths are
    expanded by TrainConfig's path normalisation)."""

    # models
    pretrained_model_name_or_path: Path = Field(description="Anima DiT .safetensors, or a diffusers-layout Anima "
                                                               "folder (its root or transformer/)")
    qwen3: Path = Field(description="Qwen3-0.6B .safetensors, Hugging Face folder, or a diffusers-layout "
                                     "Anima folder (its root or text_encoder/)")
    vae: Path = Field(description="Qwen-Image VAE .safetensors, or a diffusers-layout Anima folder (its root or "
                                   "vae/)")
    llm_adapter_path: Path | None = Field(None, description="separate LLM-adapter weights: a file or a "
                                                              "text_conditioner/ folder (else taken from the DiT)")
    qwen3_tokenizer_path: Path | None = Field(None, description="Qwen tokenizer folder (when --qwen3 is one file)")
    t5_tokenizer_path: Path | None = Field(None, description="T5 tokenizer folder")
    # tokenizer download at start-up (sd-scripts-anima's flags; tools/download/startup.py)
    auto_download_t5_tokenizer: bool = Field(True, description="download missing T5 (and Qwen) tokenizer files "
                                                               "into their folders at start-up")
    # the defaults are tools/download/sources.py's T5_TOKENIZER entry (tests/config/test_train_config.py compares them)
    t5_tokenizer_repo_id: str = Field("google/t5-v1_1-base", description="T5 tokenizer source: HF repo id, "
                                      "huggingface.co or modelscope.cn URL")
    t5_tokenizer_subfolder: str = Field("tokenizer", description="subfolder tried first (then the repo root)")
    t5_tokenizer_modelscope_fallback: bool = Field(True, description="try ModelScope when Hugging Face fails")
    t5_tokenizer_modelscope_repo_id: str = Field("nv-community/Cosmos-Predict2-2B-Text2Image",
                                                 description="ModelScope fallback repo id or URL")
    t5_tokenizer_modelscope_revision: str = Field("master", description="ModelScope revision")
    t5_tokenizer_modelscope_subfolder: str = Field("tokenizer", description="ModelScope subfolder")
    t5_tokenizer_validate_strict: bool = Field(False, description="check the T5 tokenizer is exactly Anima's "
                                                                  "(special ids, 32100 tokens, a known encoding)")

    @field_validator("t5_tokenizer_repo_id", "t5_tokenizer_subfolder", "t5_tokenizer_modelscope_repo_id",
                     "t5_tokenizer_modelscope_revision", "t5_tokenizer_modelscope_subfolder", mode="before")
    @classmethod
    def _t5_source(cls, v: Any, info: Any) -> Any:
        if isinstance(v, str) and info.field_name.endswith("repo_id"):
            modelscope = "modelscope" in info.field_name
            ref = parse_source(v, default_provider="modelscope" if modelscope else "hf")
            if modelscope and ref.provider != "modelscope":
                raise ValueError(f"'{v}' is not a ModelScope repo id or modelscope.cn URL")
            return v.strip()
        return v.strip().strip("/") if isinstance(v, str) else v
