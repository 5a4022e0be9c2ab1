"""The training loop: batch → latents + context → noise and σ → DiT with injected LoRA → loss → step → save.

Read it like minRF: `train()` sets up (models, data, network, optimizer) and runs `training_step` until
`max_train_steps`.  Text conditioning and latents are computed on the fly (frozen Qwen3/VAE under
no_grad; Qwen states are memoised per caption in RAM because captions repeat every epoch); persistent
caches come with the dataset issue.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.data.loader import run_batches
from anima_trainer.models.adapter import pad_context
from anima_trainer.sample.generate import render_previews
from anima_trainer.sample.prompts import load_sample_prompts
from anima_trainer.train.flow import flow_loss, noisy_input, sample_sigmas
from anima_trainer.train.optim import build_optimizer, build_scheduler, resolve_warmup
from anima_trainer.train.state import SavePlan

log = logging.getLogger(__name__)
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAVE_DTYPES = {"fp32": torch.float32, "float": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Models:
    """The frozen base: DiT (with the LoRA injected later), text encoder, VAE."""

    dit: torch.nn.Module
    text_encoder: object
    vae: object


def load_models(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Models:
    """Load the three parts with start-up validation (wrong files are named with their flag)."""
    from anima_trainer.models import load_dit, load_text_encoder, load_vae

    dit = load_dit(cfg.pretrained_model_name_or_path, dtype=dtype, device=device, adapter_path=cfg.llm_adapter_path)
    te = load_text_encoder(cfg.qwen3, tokenizer_dir=cfg.qwen3_tokenizer_path, t5_tokenizer_dir=cfg.t5_tokenizer_path,
                           dtype=dtype, device=device)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # fp16 VAEs overflow; bf16/fp32 are safe
    vae = load_vae(cfg.vae, dtype=vae_dtype, device=device)
    return Models(dit, te, vae)


class TextConditioner:
    """Captions → DiT context; Qwen3 states memoised per caption (frozen encoder, captions repeat)."""

    def __init__(self, dit, text_encoder, max_cached: int = 100_000, cache_contexts: bool = False,
                 train_adapter: bool = False) -> None:
        self.dit, self.te, self.max_cached = dit, text_encoder, max_cached
        self.train_adapter = train_adapter  # adapter LoRA/norms are trained: run it with autograd
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
        """Take pre-encoded captions (from the text cache)."""
        self._cache.update(rows)

    def context(self, captions: list[str]) -> torch.Tensor:
        """[B, ≥512, 1024] context, exactly `dit.encode_context` on the right-padded batch (Qwen3 always
        without gradient; the adapter with gradient only when it is trained)."""
        if not self.cache_contexts or self.max_cached == 0:  # random captions: nothing would repeat
            with torch.set_grad_enabled(self.train_adapter and torch.is_grad_enabled()):
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
        return self.dit.encode_context(hidden, ids, qwen_mask=qmask, t5_mask=tmask, t5_weights=weights)


@dataclass
class Caches:
    """What `prepare_caches` built: latents per dataset item, and caption variants (random captions + text
    cache); None where that part is computed per step."""

    latents: dict[int, torch.Tensor] | None = None
    variants: object | None = None


def prepare_caches(cfg: TrainConfig, dataset, models: Models, conditioner: TextConditioner | None, *,
                   force_disk: bool = False) -> Caches:
    """Build/reuse the caches the config asks for (all of them on disk with `force_disk`, the `cache`
    command)."""
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
        caches.latents, summary = cache_latents(dataset, models.vae, vae_fingerprint=model_fingerprint(cfg.vae),
                                                dtype=vae_dtype, to_disk=force_disk or cfg.cache_latents_to_disk,
                                                batch_size=cfg.vae_batch_size)
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
        rows, summary = cache_text(captions, models.text_encoder, qwen_fingerprint=model_fingerprint(cfg.qwen3),
                                   batch_size=cfg.text_encoder_batch_size or 8)
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


def epoch_inputs(dataset, epoch: int, vae, caches: Caches, device: torch.device, images=None):
    """StepInputs of one epoch: latents from the cache (flipped ones where the epoch flips), or by encoding
    the next `len(dataset)` augmented image batches from `images` (see `data.loader.run_batches`)."""
    from anima_trainer.cache.build import latent_mask

    if caches.latents is None:
        for _ in range(len(dataset)):
            batch = next(images)
            with torch.no_grad():  # never yield inside no_grad: the caller's step would run without autograd
                latents = vae.encode(batch.images.to(device)).to(device)
            mask = None if batch.masks is None else latent_mask(batch.masks, latents.shape[-2:]).to(device)
            yield StepInput(latents, batch.captions, mask, list(batch.is_reg))
        return
    plan = dataset.batch_plan(epoch)
    captions = caches.variants.pick(epoch, plan) if caches.variants else dataset.epoch_captions(epoch, plan)
    flips = dataset.epoch_flips(epoch, plan)
    for k, indices in enumerate(plan):
        latents, mask = caches.latents.batch(indices, flips[k])
        yield StepInput(latents.to(device), captions[k], None if mask is None else mask.to(device),
                        [dataset.items[i].is_reg for i in indices])


def report_long_captions(dataset, text_encoder, limit: int = 512) -> list[tuple[Path, int, int]]:
    """Captions over `limit` tokens on either side, reported once at start-up (file, Qwen and T5 counts).

    They are kept whole, as ComfyUI does at inference (no silent truncation); the context just gets longer.
    """
    long = []
    for i, item in enumerate(dataset.items):
        tokens = text_encoder.tokenize([dataset.caption_for(i, 0)])[0]
        if len(tokens.qwen_ids) > limit or len(tokens.t5_ids) > limit:
            long.append((item.path, len(tokens.qwen_ids), len(tokens.t5_ids)))
    if long:
        shown = "; ".join(f"{p.name} ({q} Qwen / {t} T5 tokens)" for p, q, t in long[:10])
        log.warning("%d captions are longer than %d tokens and are used whole (ComfyUI does not truncate "
                    "either): %s%s", len(long), limit, shown, " …" if len(long) > 10 else "")
    return long


def training_step(dit, latents: torch.Tensor, context: torch.Tensor, cfg: TrainConfig,
                  generator: torch.Generator, mask: torch.Tensor | None = None,
                  sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One rectified-flow loss: σ (fp32) → x_σ → v̂ = DiT(x_σ, σ, c) → loss against ε − x0."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
    patches = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    sigma = sample_sigmas(latents.shape[0], method=cfg.timestep_sampling, sigmoid_scale=cfg.sigmoid_scale,
                          shift=cfg.discrete_flow_shift, weighting_scheme=cfg.weighting_scheme,
                          logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                          patches=patches, generator=generator, device=generator.device).to(device)
    x_t = noisy_input(latents, noise, sigma)
    pred = dit(x_t, sigma, context)
    return flow_loss(pred, noise - latents, sigma, loss_type=cfg.loss_type, huber_c=cfg.huber_c,
                     weighting_scheme=cfg.weighting_scheme, mask=mask, sample_weights=sample_weights)


def build_network(cfg: TrainConfig, dit):
    """The network to train: configured (optionally initialised from network_weights), or with
    dim_from_weights exactly the network of that file."""
    from anima_trainer.networks import create_network, create_network_from_weights

    if cfg.dim_from_weights:
        network = create_network_from_weights(dit, cfg.network_weights, dropout=cfg.network_dropout,
                                              **cfg.network_args)
        if network.algo != cfg.network_module:
            raise ConfigError(f"dim_from_weights: {cfg.network_weights} is a {network.algo} network but "
                              f"network_module is {cfg.network_module}")
        return network
    network = create_network(dit, algo=cfg.network_module, dim=cfg.network_dim, alpha=cfg.network_alpha,
                             dropout=cfg.network_dropout, **cfg.network_args)
    if cfg.network_weights:
        network.load_weights(cfg.network_weights)
    return network


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, epochs); `max_train_epochs` overrides `max_train_steps` as in kohya."""
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * updates_per_epoch, cfg.max_train_epochs
    return cfg.max_train_steps, math.ceil(cfg.max_train_steps / updates_per_epoch)


def build_metadata(cfg: TrainConfig, *, step: int, epoch: int, num_images: int, batches_per_epoch: int,
                   max_steps: int, started: float, buckets: list) -> dict[str, str]:
    """kohya-style `ss_*` metadata (all strings) describing how the file was trained."""
    meta = dict(cfg.to_metadata())
    meta.update({
        "ss_output_name": cfg.output_name, "ss_steps": str(step), "ss_epoch": str(epoch),
        "ss_max_train_steps": str(max_steps), "ss_num_train_images": str(num_images),
        "ss_num_batches_per_epoch": str(batches_per_epoch), "ss_base_model_version": "anima",
        "ss_sd_model_name": Path(cfg.pretrained_model_name_or_path).name, "ss_vae_name": Path(cfg.vae).name,
        "ss_training_started_at": str(started), "ss_training_finished_at": str(time.time()),
        "ss_bucket_info": json.dumps({"buckets": [list(b) for b in buckets]}),
    })
    return meta


@dataclass
class TrainRun:
    """What a finished run leaves: the final file, the live (still injected) network and DiT, the loss log."""

    final_path: Path
    dit: torch.nn.Module
    network: torch.nn.Module
    losses: list[float]
    steps: int


def train(cfg: TrainConfig) -> Path:
    """Run a whole LoRA training from a validated config; returns the final network file."""
    return run_training(cfg).final_path


def run_training(cfg: TrainConfig) -> TrainRun:
    """The loop behind `train`, returning the live model too (tests, notebooks)."""
    from accelerate import Accelerator

    from anima_trainer.data import build_dataset, load_dataset_config

    plan = SavePlan(Path(cfg.output_dir), cfg.output_name, every_n_steps=cfg.save_every_n_steps,
                    every_n_epochs=cfg.save_every_n_epochs, keep_last_n_steps=cfg.save_last_n_steps,
                    keep_last_n_epochs=cfg.save_last_n_epochs, overwrite=cfg.overwrite)
    plan.check_start()
    seed = cfg.seed if cfg.seed is not None else 42
    torch.manual_seed(seed)
    # Without a latent cache, decode every image once at start-up: a file damaged inside its compressed data
    # is then skipped with a report instead of stopping the run hours later (caching decodes them anyway).
    cached = cfg.cache_latents or cfg.cache_latents_to_disk
    dataset = build_dataset(load_dataset_config(cfg.dataset_config), default_batch_size=cfg.train_batch_size,
                            seed=seed, verify_images=not cached)
    accelerator = Accelerator(mixed_precision="no", log_with=cfg.log_with if cfg.log_with else None,
                              project_dir=str(cfg.logging_dir) if cfg.logging_dir else None)
    device = accelerator.device
    dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    models = load_models(cfg, device, dtype)
    dit = models.dit
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    network = build_network(cfg, dit)
    network.to(device)
    lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    max_steps, epochs = total_steps(cfg, len(dataset))
    optimizer = build_optimizer(network.param_groups(lr), lr, cfg.optimizer_args, device)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, max_steps, resolve_warmup(cfg.lr_warmup_steps, max_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if cfg.log_with:
        accelerator.init_trackers(cfg.log_prefix or "network_train", config={"max_train_steps": max_steps})
    dataset.max_train_steps, dataset.gradient_accumulation_steps = max_steps, cfg.gradient_accumulation_steps
    report_long_captions(dataset, models.text_encoder)
    if cfg.cache_llm_adapter_outputs and network.trains_llm_adapter:
        raise ConfigError("cache_llm_adapter_outputs: the LLM adapter is trained (train_llm_adapter or train_norm), "
                          "so its output changes every step and cannot be cached; turn one of them off")
    # captions that change every step are not memoised (the memo would grow without bound)
    conditioner = TextConditioner(dit, models.text_encoder,
                                  max_cached=100_000 if dataset.captions_are_static else 0,
                                  cache_contexts=cfg.cache_llm_adapter_outputs,
                                  train_adapter=network.trains_llm_adapter)
    caches = prepare_caches(cfg, dataset, models, conditioner)
    if caches.variants is not None:
        conditioner.max_cached = 100_000  # a finite set of captions now: memoise them
    images = None
    if caches.latents is None:  # decode images in worker processes, ahead of the GPU
        images = run_batches(dataset, epochs, cfg.max_data_loader_n_workers,
                             caches.variants.pick if caches.variants is not None else None)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    params = network.trainable_parameters()
    log.info("training %d %s modules (+%d norm gains), %d images, %d batches/epoch, %d steps, %d epochs",
             len(network.modules_by_name), cfg.network_module, len(network.norms_by_name), dataset.num_images,
             len(dataset), max_steps, epochs)

    previews = load_sample_prompts(cfg.sample_prompts) if cfg.sample_prompts else []
    preview_dir = Path(cfg.output_dir) / "sample"

    def preview(tag: str) -> None:
        network.eval()
        render_previews(dit, models.text_encoder, models.vae, previews, preview_dir, tag, cfg.output_name)
        network.train()

    if previews and cfg.sample_at_first:
        preview("000000")
    started = time.time()
    step, micro, losses = 0, 0, []
    meta = lambda ep: build_metadata(cfg, step=step, epoch=ep, num_images=dataset.num_images,  # noqa: E731
                                     batches_per_epoch=len(dataset), max_steps=max_steps, started=started,
                                     buckets=dataset.bucket_table())
    save_dtype = SAVE_DTYPES.get(cfg.save_precision) if cfg.save_precision else None
    bar = tqdm(total=max_steps, desc="training", unit="step", dynamic_ncols=True)
    for epoch in range(1, epochs + 1):
        for batch in epoch_inputs(dataset, epoch - 1, models.vae, caches, device, images):
            context = conditioner.context(batch.captions)
            weights = None
            if any(batch.is_reg) and cfg.prior_loss_weight != 1.0:
                weights = torch.tensor([cfg.prior_loss_weight if r else 1.0 for r in batch.is_reg])
            loss = training_step(dit, batch.latents, context, cfg, generator, batch.mask, weights)
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            micro += 1
            if micro % cfg.gradient_accumulation_steps:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss.item()
            losses.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", epoch=epoch)
            if cfg.log_with:
                logs = {"loss/current": loss_value, "lr/unet": scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=step)
            if previews and cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                preview(f"{step:06d}")
            if plan.due_at_step(step) and step < max_steps:
                path = network.save(plan.step_path(step), metadata=meta(epoch), dtype=save_dtype,
                                    overwrite=cfg.overwrite,
                                    save_format=cfg.save_format)
                plan.record_step(step, path)
            if step >= max_steps:
                break
        if plan.due_at_epoch(epoch) and epoch < epochs and step < max_steps:
            path = network.save(plan.epoch_path(epoch), metadata=meta(epoch), dtype=save_dtype,
                                overwrite=cfg.overwrite,
                                    save_format=cfg.save_format)
            plan.record_epoch(epoch, path)
        if previews and cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            preview(f"e{epoch:06d}")
        if step >= max_steps:
            break
    bar.close()
    final = network.save(plan.final_path, metadata=meta(epoch), dtype=save_dtype, overwrite=cfg.overwrite,
                                    save_format=cfg.save_format)
    if cfg.log_with:
        accelerator.end_training()
    log.info("saved %s", final)
    return TrainRun(final, dit, network, losses, step)
