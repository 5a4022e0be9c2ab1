"""What Anima is: the DiT with its LLM adapter, the Qwen3 text encoder with both tokenizers, and the VAE.

Loaders are imported lazily so that `import anima_trainer.models` stays cheap (no transformers/diffusers
import until a text encoder or VAE is actually loaded).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_dit", "load_text_encoder", "load_vae", "inspect_file", "DitConfig"]

_LAZY = {
    "load_dit": ("anima_trainer.models.dit", "load_dit"),
    "load_text_encoder": ("anima_trainer.models.text", "load_text_encoder"),
    "load_vae": ("anima_trainer.models.vae", "load_vae"),
    "inspect_file": ("anima_trainer.models.checkpoint", "inspect_file"),
    "DitConfig": ("anima_trainer.models.checkpoint", "DitConfig"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'anima_trainer.models' has no attribute {name!r}")
