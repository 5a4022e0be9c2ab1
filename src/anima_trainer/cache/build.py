"""Build (or reuse) the latent and text caches for a dataset.

Latents: one entry per unique image and bucket (`[16, 1, h, w]`, normalised, fp32), keyed by the image's
bytes, its bucket/resize/crop, the VAE file fingerprint and dtype.  Text: one entry per distinct
tokenization (Qwen3 states of the real tokens + T5 ids and weights), keyed by the token ids themselves,
the Qwen3 fingerprint and dtype — so an edited caption or a different tokenizer misses the old entry.
Interrupted runs resume: every finished entry is already on disk and is reused.  Images are decoded in the
data-loader worker processes (max_data_loader_n_workers) while the VAE encodes the batch before.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anima_trainer.cache.store import CacheStore, entry_key, file_sha256, store_for
from anima_trainer.console import progress_disabled
from anima_trainer.data.loader import chunk_batches

log = logging.getLogger(__name__)
TextRow = tuple[torch.Tensor, list[int], list[float]]  # Qwen states [n, 1024], T5 ids, T5 weights


@dataclass
class CacheSummary:
    """What a cache pass did: entries built, reused from disk, and on-disk files that were unusable."""

    built: int = 0
    reused: int = 0
    invalid: int = 0

    def __str__(self) -> str:
        return f"{self.built} built, {self.reused} reused, {self.invalid} invalid (rebuilt)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def latent_key(item, image_sha: str, vae_fingerprint: str, dtype: torch.dtype, interpolation: str | None = None,
               flip: bool = False, alpha_mask: bool = False, mask_sha: str | None = None) -> str:
    fields = {"kind": "latent", "image": image_sha, "bucket": list(item.bucket), "resized": list(item.resized),
              "crop": "center", "flip": flip, "vae": vae_fingerprint, "dtype": _dtype_name(dtype)}
    if interpolation:  # only when set, so entries made with the default filters stay valid
        fields["interpolation"] = interpolation
    if alpha_mask:
        fields["alpha_mask"] = True
    if mask_sha:  # a conditioning_data_dir loss mask: its bytes are part of the entry
        fields["mask"] = mask_sha
    return entry_key(fields)


class LatentCache(dict):
    """(item index, flipped) → {"latent": [16, 1, h, w] fp32, optionally "mask": [1, 1, h, w] at latent size}."""

    def batch(self, indices: list[int], flips: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        flips = flips or [False] * len(indices)
        entries = [self[(i, f)] for i, f in zip(indices, flips, strict=True)]
        latents = torch.stack([e["latent"] for e in entries])
        if not any("mask" in e for e in entries):
            return latents, None
        ones = torch.ones_like(latents[:1, :1])[0]
        return latents, torch.stack([e.get("mask", ones) for e in entries])


def latent_mask(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Image-resolution loss masks [B, 1, H, W] → latent resolution [B, 1, 1, h, w] (area average, as kohya)."""
    return F.interpolate(masks.float(), size=latent_hw, mode="area").unsqueeze(2)


def _device_of(vae) -> torch.device:
    """Where the VAE runs (`AnimaVAE.device`); an encoder without one (a test's stand-in) runs on the host."""
    return torch.device(getattr(vae, "device", "cpu"))


def _start_encode(vae, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start encoding `images` (CPU, [B, 3, H, W]); the returned call gives the latents on the host, fp32.  On CUDA
    the upload, the encode and the copy back are only queued, so the host stores the previous batch and takes the
    next one from the workers while the GPU works (the latents' normalisation, an IEEE subtraction and division,
    then runs there instead of on the host: the same bits); elsewhere the encode runs at once, as it always did."""
    device = _device_of(vae)
    if device.type != "cuda":
        encoded = vae.encode(images).float().cpu()
        return lambda: encoded
    latents = vae.encode(images.pin_memory().to(device, non_blocking=True))
    host = torch.empty(latents.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(latents, non_blocking=True)
    with torch.cuda.device(device):  # the VAE's card, also where it is not the current one
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))

    def result() -> torch.Tensor:
        done.synchronize()
        return host
    return result


@torch.no_grad()
def cache_latents(dataset, vae, *, vae_fingerprint: str, dtype: torch.dtype, to_disk: bool, batch_size: int = 1,
                  progress: bool = True, owned=None, workers: int = 0) -> tuple[LatentCache, CacheSummary]:
    """Latents for every dataset item (both orientations with flip_aug; loss masks with alpha_mask or a
    conditioning_data_dir), encoded with the VAE's 2-D path unless qwen_image_vae_2d = false (models/vae.py), built
    only where missing.  `owned(index)`, when given, limits the pass to the items it accepts (one process's
    share of a cache built by several: train/distributed.py `Distributed.build_cache`).

    `batch_size` images per VAE call (vae_batch_size; the VAE still splits them into its own micro-batches),
    one bucket and orientation per batch.  `workers` processes (max_data_loader_n_workers; 0 = this process)
    decode, resize and crop the next batches while the VAE encodes this one (data/loader.py `chunk_batches`);
    the entries are the same whatever the worker count."""
    summary = CacheSummary()
    cache = LatentCache()
    todo: dict[tuple, list[tuple[int, bool, str]]] = defaultdict(list)
    for index, item in enumerate(dataset.items):
        if owned is not None and not owned(index):
            continue
        sub = dataset.subset_params(index)
        sha = file_sha256(item.path)
        for flip in ((False, True) if sub.flip_aug else (False,)):
            mask_sha = file_sha256(item.mask_path) if item.mask_path is not None else None
            key = latent_key(item, sha, vae_fingerprint, dtype, sub.resize_interpolation, flip, sub.alpha_mask,
                             mask_sha)
            if to_disk:
                found, invalid = store_for(item.path).lookup(key)
                summary.invalid += invalid
                if found is not None:
                    cache[(index, flip)] = found
                    summary.reused += 1
                    continue
            todo[(item.bucket, flip)].append((index, flip, key))
    chunks = [entries[start: start + batch_size] for entries in todo.values()
              for start in range(0, len(entries), batch_size)]
    total = sum(len(chunk) for chunk in chunks)

    def store(chunk: list[tuple[int, bool, str]], masks: torch.Tensor | None, latents: torch.Tensor) -> None:
        masks = None if masks is None else latent_mask(masks, latents.shape[-2:])
        for k, (index, flip, key) in enumerate(chunk):
            entry = {"latent": latents[k].clone()}
            if masks is not None and (dataset.subset_params(index).alpha_mask
                                      or dataset.items[index].mask_path is not None):
                entry["mask"] = masks[k].clone()
            cache[(index, flip)] = entry
            if to_disk:
                store_for(dataset.items[index].path).put(key, entry, source=str(dataset.items[index].path))
            summary.built += 1
        bar.update(len(chunk))

    loads = [([index for index, _, _ in chunk], [flip for _, flip, _ in chunk]) for chunk in chunks]
    with tqdm(total=total, desc="caching latents", unit="img",
              disable=progress_disabled(not progress or not total)) as bar, \
            closing(chunk_batches(dataset, loads, workers)) as batches:
        # on CUDA one batch stays in flight: stored after the next one is queued; elsewhere stored at once
        depth = 1 if _device_of(vae).type == "cuda" else 0
        in_flight: deque = deque()

        def drain(keep: int) -> None:
            while len(in_flight) > keep:
                done, masks, result = in_flight.popleft()
                store(done, masks, result())

        for chunk, batch in zip(chunks, batches, strict=True):
            in_flight.append((chunk, batch.masks, _start_encode(vae, batch.images)))
            drain(depth)
        drain(0)
    return cache, summary


def text_key(tokens, qwen_fingerprint: str, dtype: torch.dtype) -> str:
    return entry_key({"kind": "text", "qwen_ids": tokens.qwen_ids, "t5_ids": tokens.t5_ids,
                      "t5_weights": tokens.t5_weights, "qwen3": qwen_fingerprint, "dtype": _dtype_name(dtype)})


@torch.no_grad()
def cache_text(captions: dict[str, CacheStore | None], text_encoder, *, qwen_fingerprint: str, batch_size: int = 8,
               progress: bool = True) -> tuple[dict[str, TextRow], CacheSummary]:
    """Qwen3 states per distinct caption; `captions` maps caption → where to keep it (None = RAM only)."""
    summary = CacheSummary()
    rows: dict[str, TextRow] = {}
    todo: list[tuple[str, object, str]] = []
    for caption, store in captions.items():
        tokens = text_encoder.tokenize([caption])[0]
        key = text_key(tokens, qwen_fingerprint, text_encoder.dtype)
        if store is not None:
            found, invalid = store.lookup(key)
            summary.invalid += invalid
            if found is not None:
                rows[caption] = (found["qwen_hidden"], tokens.t5_ids, tokens.t5_weights)
                summary.reused += 1
                continue
        todo.append((caption, tokens, key))
    with tqdm(total=len(todo), desc="caching text", unit="caption",
              disable=progress_disabled(not progress or not todo)) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            enc = text_encoder.encode_tokens([t for _, t, _ in chunk])
            for i, (caption, tokens, key) in enumerate(chunk):
                hidden = enc.qwen_hidden[i, : len(tokens.qwen_ids)].cpu().clone()
                rows[caption] = (hidden, tokens.t5_ids, tokens.t5_weights)
                if captions[caption] is not None:
                    captions[caption].put(key, {"qwen_hidden": hidden}, source=f"caption {caption[:60]!r}")
                summary.built += 1
            bar.update(len(chunk))
    return rows, summary
