"""What the step consumes: captions → DiT context (memoised Qwen3 states, optional adapter-output cache), the
persistent caches, and the per-epoch stream of latents (from the latent cache or encoded from decoded images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.models.llm_adapter import pad_context

log = logging.getLogger(__name__)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → GPU without stalling the host: through pinned memory with a non-blocking copy (the caching host
    allocator keeps the pinned buffer alive until the copy is done).  Elsewhere a plain `.to`."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class TextConditioner:
    """Captions → DiT context; Qwen3 states memoised per caption (frozen encoder, captions repeat).  With
    `train_text_encoder` (a text-encoder LoRA is trained) Qwen3 and the adapter run with autograd on every batch and
    nothing is memoised: the encoder changes with every step."""

    def __init__(self, dit, text_encoder, max_cached: int = 100_000, cache_contexts: bool = False,
                 train_llm_adapter: bool = False, train_text_encoder: bool = False) -> None:
        self.dit, self.te, self.max_cached = dit, text_encoder, max_cached
        self.train_llm_adapter = train_llm_adapter  # adapter LoRA/norms are trained: run it with autograd
        self.train_text_encoder = train_text_encoder
        self._cache: dict[str, tuple[torch.Tensor, list[int], list[float]]] = {}
        # frozen adapter: its output rows per caption never change, so compute them once (ComfyUI's
        # per-prompt result) and skip the adapter in every later step
        self.cache_contexts = cache_contexts
        self._contexts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode_missing(self, captions: list[str]) -> None:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if not missing or len(self._cache) >= self.max_cached:
            return  # nothing to do, or no room: `context` encodes the batch directly
        enc = self.te.encode(missing)
        for i, caption in enumerate(missing):
            n, m = int(enc.qwen_mask[i].sum()), int(enc.t5_mask[i].sum())
            if len(self._cache) < self.max_cached:
                self._cache[caption] = (enc.qwen_hidden[i, :n].cpu(), enc.t5_ids[i, :m].tolist(),
                                        enc.t5_weights[i, :m].tolist())

    def prefill(self, rows: dict[str, tuple[torch.Tensor, list[int], list[float]]]) -> None:
        """Take pre-encoded captions (from the text cache; never with a trained text encoder)."""
        if self.train_text_encoder:
            raise ValueError("cached text-encoder outputs cannot stand in for a text encoder that is trained")
        self._cache.update(rows)

    def context(self, captions: list[str]) -> torch.Tensor:
        """[B, ≥512, 1024] context, exactly `dit.encode_context` on the right-padded batch (Qwen3 always
        without gradient; the adapter with gradient only when it is trained), or with a trained text encoder
        both with gradient (where gradients are enabled: validation runs under no_grad)."""
        if self.train_text_encoder:
            enc = self.te.encode(captions, grad=True)
            return self.dit.encode_context(enc.qwen_hidden, enc.t5_ids, qwen_mask=enc.qwen_mask,
                                           t5_mask=enc.t5_mask, t5_weights=enc.t5_weights)
        if not self.cache_contexts or self.max_cached == 0:  # random captions: nothing would repeat
            with torch.set_grad_enabled(self.train_llm_adapter and torch.is_grad_enabled()):
                return self._context(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._contexts))
        if missing:
            with torch.no_grad():
                ctx = self._context(missing)
            for caption, row in zip(missing, ctx, strict=True):
                n = len(self.te.tokenize([caption])[0].t5_ids)  # the adapter's real rows; the rest are 0
                self._contexts[caption] = row[:n].clone()
        rows = [self._contexts[c] for c in captions]
        return pad_context(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True))

    def _context(self, captions: list[str]) -> torch.Tensor:
        self._encode_missing(captions)
        rows = [self._cache.get(c) for c in captions]
        if any(r is None for r in rows):  # cache full: encode this batch directly
            with torch.no_grad():
                enc = self.te.encode(captions)
            return self.dit.encode_context(enc.qwen_hidden, enc.t5_ids, qwen_mask=enc.qwen_mask,
                                           t5_mask=enc.t5_mask, t5_weights=enc.t5_weights)
        sq, st = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        b, dim = len(rows), rows[0][0].shape[-1]
        hidden = torch.zeros(b, sq, dim, dtype=rows[0][0].dtype)
        qmask = torch.zeros(b, sq, dtype=torch.long)
        ids = torch.zeros(b, st, dtype=torch.long)
        tmask = torch.zeros(b, st, dtype=torch.long)
        weights = torch.zeros(b, st)
        for i, (h, t, w) in enumerate(rows):
            hidden[i, : len(h)], qmask[i, : len(h)] = h, 1
            ids[i, : len(t)], tmask[i, : len(t)], weights[i, : len(t)] = torch.tensor(t), 1, torch.tensor(w)
        device = next(self.dit.parameters()).device
        return self.dit.encode_context(to_device(hidden, device), to_device(ids, device), qwen_mask=qmask,
                                       t5_mask=tmask, t5_weights=to_device(weights, device))


@dataclass
class Caches:
    """What `prepare_caches` built: latents per dataset item, and caption variants (random captions + text
    cache); None where that part is computed per step."""

    latents: dict[int, torch.Tensor] | None = None
    variants: object | None = None


def prepare_caches(cfg: TrainConfig, dataset, models, conditioner: TextConditioner | None, *,
                   force_disk: bool = False, dist=None) -> Caches:
    """Build/reuse the caches the config asks for (all of them on disk with `force_disk`, the `cache`
    command).  With several processes (`dist`), disk caches are built in shares, then read by everyone."""
    from anima_trainer.train.distributed import Distributed, take_owned

    dist = dist or Distributed()
    from anima_trainer.cache import cache_latents, cache_text, model_fingerprint
    from anima_trainer.cache.store import store_for
    from anima_trainer.cache.variants import CaptionVariants

    caches = Caches()
    if (cfg.cache_latents or cfg.cache_latents_to_disk) and dataset.uses_random_pixels:
        raise ConfigError("cache_latents: random_crop / color_aug in dataset_config change the pixels every epoch, "
                          "so cached latents would be wrong; turn the latent cache or those options off")
    if force_disk and dataset.uses_random_pixels:
        log.warning("random_crop / color_aug change pixels every epoch: no latent cache is built")
    elif force_disk or cfg.cache_latents or cfg.cache_latents_to_disk:
        vae_dtype = next(models.vae.model.parameters()).dtype
        to_disk = force_disk or cfg.cache_latents_to_disk
        caches.latents, summary = dist.build_cache(lambda owned: cache_latents(
            dataset, models.vae, vae_fingerprint=model_fingerprint(cfg.vae), dtype=vae_dtype, to_disk=to_disk,
            batch_size=cfg.vae_batch_size, progress=dist.is_main, owned=owned,
            workers=cfg.max_data_loader_n_workers), to_disk=to_disk)
        log.info("latent cache: %s", summary)
    if force_disk or cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
        to_disk = force_disk or cfg.cache_text_encoder_outputs_to_disk
        where = lambda i: store_for(dataset.items[i].path) if to_disk else None  # noqa: E731
        if dataset.captions_are_static:
            captions = {dataset.caption_for(i, 0): where(i) for i in range(len(dataset.items))}
        else:
            try:
                caches.variants = CaptionVariants(dataset, cfg.caption_variants)
            except ValueError as e:
                raise ConfigError(f"cache_text_encoder_outputs: {e}") from None
            captions = {"": where(0)}
            for i, rows in caches.variants.table.items():
                captions.update({c: where(i) for c in rows if c not in captions})
            log.info("captions change every step: %d variants per caption are cached (caption_variants)",
                     cfg.caption_variants)
        rows, summary = dist.build_cache(lambda owned: cache_text(
            take_owned(captions, owned), models.text_encoder, qwen_fingerprint=model_fingerprint(cfg.qwen3),
            batch_size=cfg.text_encoder_batch_size or 8, progress=dist.is_main), to_disk=to_disk)
        log.info("text cache: %s", summary)
        if conditioner is not None:
            conditioner.prefill(rows)
    return caches


@dataclass
class StepInput:
    """One batch as the step needs it: latents on the device, captions, loss mask, reg flags."""

    latents: torch.Tensor
    captions: list[str]
    mask: torch.Tensor | None  # [B, 1, 1, h, w] at latent resolution, or None
    is_reg: list[bool]
    samples: list[tuple[int, int]]  # per sample (dataset item index, occurrence in the epoch): seeds its noise


def epoch_inputs(dataset, epoch: int, vae, caches: Caches, device: torch.device, images=None, skip: int = 0,
                 shard: list[int] | None = None):
    """StepInputs of one epoch: the batches of the epoch's plan at the positions `shard` lists (this process's
    share; default all), from position `skip` of it on (a resume).  Latents come from the cache (flipped ones
    where the epoch flips), or by encoding the next batches from `images` (`data.loader.run_batches`, which
    starts at the same place with the same shard).  Captions and flips depend on the whole plan."""
    from anima_trainer.cache.build import latent_mask

    positions = list(shard) if shard is not None else list(range(len(dataset)))
    if caches.latents is None:
        for _ in range(len(positions) - skip):
            batch = next(images)
            with torch.no_grad():  # never yield inside no_grad: the caller's step would run without autograd
                latents = vae.encode(to_device(batch.images, device)).to(device)
            mask = None if batch.masks is None else latent_mask(batch.masks, latents.shape[-2:]).to(device)
            yield StepInput(latents, batch.captions, mask, list(batch.is_reg),
                            list(zip(batch.indices, batch.occurrences, strict=True)))
        return
    plan = dataset.batch_plan(epoch)
    captions = caches.variants.pick(epoch, plan) if caches.variants else dataset.epoch_captions(epoch, plan)
    flips = dataset.epoch_flips(epoch, plan)
    occurrences = dataset.plan_occurrences(plan)
    for k in positions[skip:]:
        indices = plan[k]
        latents, mask = caches.latents.batch(indices, flips[k])
        yield StepInput(to_device(latents, device), captions[k], None if mask is None else to_device(mask, device),
                        [dataset.items[i].is_reg for i in indices], list(zip(indices, occurrences[k], strict=True)))


def report_long_captions(dataset, text_encoder, limit: int = 512,
                         max_tokens: int | None = None) -> list[tuple[Path, int, int]]:
    """Captions over `limit` tokens on either side, reported once at start-up (file, Qwen and T5 counts).

    They are kept whole, as ComfyUI does at inference (no silent truncation); the context just gets longer.
    One over `max_tokens` (train/budget.py) is a ConfigError naming its image: it would be encoded whole in
    every step.
    """
    long = []
    for i, item in enumerate(dataset.items):
        tokens = text_encoder.tokenize([dataset.caption_for(i, 0)])[0]
        if len(tokens.qwen_ids) > limit or len(tokens.t5_ids) > limit:
            long.append((item.path, len(tokens.qwen_ids), len(tokens.t5_ids)))
    for path, q, t in long:
        if max_tokens is not None and max(q, t) > max_tokens:
            raise ConfigError(f"dataset_config: the caption of {path} is {q} Qwen / {t} T5 tokens long, above the "
                              f"limit of {max_tokens} tokens; shorten it (captions are used whole, never truncated)")
    if long:
        shown = "; ".join(f"{p.name} ({q} Qwen / {t} T5 tokens)" for p, q, t in long[:10])
        log.warning("%d captions are longer than %d tokens and are used whole (ComfyUI does not truncate "
                    "either): %s%s", len(long), limit, shown, " …" if len(long) > 10 else "")
    return long


def check_masked_loss(cfg, dataset) -> str | None:
    """kohya's masked_loss against the dataset (right after `build_dataset`): a conditioning_data_dir without
    masked_loss is a ConfigError (kohya accepts the key only with masked_loss, for its loss mask); masked_loss
    with no mask source anywhere returns a notice (kohya then trains unmasked without a word)."""
    if dataset.uses_mask_folders and not cfg.masked_loss:
        raise ConfigError("masked_loss: the dataset_config has conditioning_data_dir mask folders, which are the "
                          "loss mask only with masked_loss (kohya's ControlNet-style subsets); set masked_loss = true "
                          "or remove conditioning_data_dir")
    if cfg.masked_loss and not dataset.uses_mask_folders and not dataset.uses_alpha_mask:
        return ("masked_loss = true: no subset has conditioning_data_dir or alpha_mask, so there is no mask and the "
                "loss is unmasked (as in kohya); add conditioning_data_dir mask folders to the subsets to mask it")
    return None
