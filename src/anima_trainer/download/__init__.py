"""Downloading the models and tokenizers (Hugging Face first, ModelScope as fallback), verified and resumable.

* `anima-trainer download` — download/command.py;
* `ensure_tokenizers(cfg)` — training start-up: complete the configured tokenizer folders (download/startup.py);
* where things come from — the one table in download/sources.py; URL rules — download/urls.py.

Imports are lazy: `config/train.py` reads the source table, and the config package must not import the rest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DownloadError", "download_models", "ensure_tokenizers", "parse_source", "validate_t5_tokenizer"]

_LAZY = {
    "DownloadError": ("anima_trainer.download.errors", "DownloadError"),
    "download_models": ("anima_trainer.download.command", "download_models"),
    "ensure_tokenizers": ("anima_trainer.download.startup", "ensure_tokenizers"),
    "parse_source": ("anima_trainer.download.urls", "parse_source"),
    "validate_t5_tokenizer": ("anima_trainer.download.t5", "validate_t5_tokenizer"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'anima_trainer.download' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
