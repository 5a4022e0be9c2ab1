"""The three frozen parts of Anima loaded together — DiT, text encoder, VAE — the one way training, its `cache`
command and evaluation load them, so where each part lives and in which dtype is decided in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from anima_trainer.models.dit import load_dit
from anima_trainer.models.text import load_text_encoder
from anima_trainer.models.vae import load_vae


@dataclass
class BaseModels:
    """The frozen base: the DiT (networks are injected into it later), the text encoder, the VAE."""

    dit: torch.nn.Module
    text_encoder: object
    vae: object


def load_base_models(dit: str | Path, qwen3: str | Path, vae: str | Path, *, device: torch.device,
                     dtype: torch.dtype, llm_adapter_path: str | Path | None = None,
                     qwen3_tokenizer_path: str | Path | None = None, t5_tokenizer_path: str | Path | None = None,
                     blocks_to_swap: int = 0, vae_2d: bool = True, vae_chunk_rows: int | None = None) -> BaseModels:
    """Load the three parts on `device` in `dtype`, except: with block swap the DiT stays on the CPU until
    `block_runner.setup_memory` places what lives on the device (the swapped blocks never touch it), and the VAE
    runs in fp32 when `dtype` is fp16 (fp16 VAEs overflow; bf16 and fp32 are safe)."""
    dit_model = load_dit(dit, dtype=dtype, device="cpu" if blocks_to_swap else device,
                         llm_adapter_path=llm_adapter_path)
    text_encoder = load_text_encoder(qwen3, qwen3_tokenizer_path=qwen3_tokenizer_path,
                                     t5_tokenizer_path=t5_tokenizer_path, dtype=dtype, device=device)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    vae_model = load_vae(vae, dtype=vae_dtype, device=device, two_d=vae_2d, chunk_rows=vae_chunk_rows)
    return BaseModels(dit_model, text_encoder, vae_model)
