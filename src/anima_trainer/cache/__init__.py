"""Caches of the frozen encoders' outputs (VAE latents, Qwen3 states): in RAM or as safetensors on disk.

    build.py     build (or reuse) the latent and text caches of a dataset
    store.py     content-addressed safetensors entries that cannot go stale
    variants.py  K pre-encoded caption variants when captions are random
"""

from anima_trainer.cache.build import CacheSummary, cache_latents, cache_text
from anima_trainer.cache.store import CACHE_FORMAT_VERSION, CacheStore, model_fingerprint

__all__ = ["CACHE_FORMAT_VERSION", "CacheStore", "CacheSummary", "cache_latents", "cache_text",
           "model_fingerprint"]
