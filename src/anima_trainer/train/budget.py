"""The start-up budget: what a step, an epoch and a preview will need, checked before the first step.

A value no machine can train, or one this machine cannot, must stop the run at start-up with one line naming the
key, the value, the limit and the fix — not as an out-of-memory kill in step 1, a MemoryError, or a crash hours
later.  Fixed limits are checked where each value is read, so the message can name its file and table:

- dataset_config `resolution` ≤ 4096 px per side, `min/max_bucket_reso` ≤ 8192, `num_repeats` ≤ 10 000
  (data/config.py); images × repeats of one epoch ≤ 1 000 000 and each caption ≤ 64 KiB (data/scan.py);
- sample-prompt sizes ≤ 4096 px per side, and every other prompt-file mistake (sample/prompts.py);
- `output_name` short enough for every file name derived from it (config/save_settings.py).

This module adds the checks that need the dataset scan, the config and the machine together:

- image tokens of one micro-batch (largest bucket × batch size) ≤ `MAX_STEP_TOKENS`;
- the estimated peak memory of one training step (`train.memory_estimate.estimate_training_memory`, the estimate
  `vram_budget_gb` plans with, plus the text encoder and VAE files and on a GPU the CUDA context) ≤ what the
  device has free now (GPU: `torch.cuda.mem_get_info`; CPU: available RAM).  The extras are lower bounds, so
  the check refuses only runs that cannot fit;
- caption and preview-prompt token counts ≤ `MAX_TEXT_TOKENS` (once the tokenizers are loaded).

Lower layers (data, models, sample) never import this module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.dtypes import precision_name
from anima_trainer.models.model_files import DIT_KINDS, expect_kind
from anima_trainer.models.compile import image_tokens
from anima_trainer.sample.prompts import SamplePrompt, load_sample_prompts
from anima_trainer.train.memory_estimate import estimate_training_memory
from anima_trainer.train.vram_plan import RESERVE_GIB

log = logging.getLogger(__name__)

MAX_STEP_TOKENS = 1 << 20  # image tokens per micro-batch: 256 images at 1024², or 16 at 4096²
MAX_TEXT_TOKENS = 2048  # Qwen3 or T5 tokens of one caption / preview prompt (4 × the 512 Anima pads to)
_GIB = 2**30


def check_before_models(cfg: TrainConfig, dataset: Any, device: torch.device) -> list[SamplePrompt]:
    """Everything that can be judged from the config, the dataset scan and the machine before a model is loaded:
    the sample-prompt file (parsed completely), tokens per micro-batch, one step's memory.  Returns the prompts."""
    prompts = load_sample_prompts(cfg.sample_prompts) if cfg.sample_prompts else []
    width, height, batch = largest_step(dataset)
    tokens = batch * image_tokens(width, height)
    if tokens > MAX_STEP_TOKENS:
        raise ConfigError(f"resolution × batch_size: the largest micro-batch is {batch} × {width}×{height} px = "
                          f"{tokens} image tokens, above the limit of {MAX_STEP_TOKENS}; lower batch_size "
                          "(train_batch_size or dataset_config) or resolution, and use gradient_accumulation_steps "
                          "for a larger effective batch")
    check_step_memory(cfg, (width, height), batch, device)
    return prompts


def largest_step(dataset: Any) -> tuple[int, int, int]:
    """(width, height, batch size) of epoch 0's micro-batch with the most image tokens (a batch is one bucket)."""
    def key(batch: list[int]) -> tuple[int, int]:
        w, h = dataset.items[batch[0]].bucket
        return len(batch) * image_tokens(w, h), len(batch)

    biggest = max(dataset.batch_plan(0), key=key)
    width, height = dataset.items[biggest[0]].bucket
    return width, height, len(biggest)


def check_step_memory(cfg: TrainConfig, size: tuple[int, int], batch: int, device: torch.device) -> None:
    """ConfigError when one step's estimated peak memory exceeds what the device has free now.

    Skipped (with a debug line) where no estimate can be made (`step_memory_gib`) or the machine gives no number."""
    have, where = available_memory(device)
    if have is None:
        log.debug("start-up budget: the free memory of %s is unknown; memory not checked", device)
        return
    estimate = step_memory_gib(cfg, size, batch, device)
    if estimate is None:
        return
    need, est = estimate
    log.info("start-up budget: one step needs about %.2f GiB (%d×%d px, batch %d); %.2f GiB %s", need, size[0],
             size[1], batch, have / _GIB, where)
    if need * _GIB > have:
        levers = "vram_budget_gb = \"auto\" (picks checkpointing / offload / block swap that fit)"
        if device.type != "cuda":
            levers = "gradient_checkpointing = true"
        raise ConfigError(f"resolution × batch_size: one training step needs about {need:.1f} GiB (largest bucket "
                          f"{size[0]}×{size[1]} px, batch {batch}, weights {est['weights_gib']:.1f} GiB, "
                          f"activations {est['activations_gib']:.1f} GiB) but {device} has {have / _GIB:.1f} GiB "
                          f"{where}; lower resolution or batch_size in dataset_config, or set {levers}")


def step_memory_gib(cfg: TrainConfig, size: tuple[int, int], batch: int,
                    device: torch.device) -> tuple[float, dict[str, float]] | None:
    """(GiB, estimate details) one training step of `batch` images of `size` (w, h) needs on `device`, or None
    where no estimate can be made: an unreadable DiT header or bad network options are reported by the loaders
    with their own messages, later."""
    try:
        info = expect_kind(cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path",
                           DIT_KINDS)
        dtype = precision_name(cfg.mixed_precision)
        est = estimate_training_memory(info.dit_config, resolution=(size[1], size[0]), batch=batch,
                                       rank=cfg.network_dim, dtype=dtype, network_args=cfg.network_args,
                                       include_llm_adapter=False if cfg.cache_llm_adapter_outputs else None,
                                       **cfg.memory_options())
    except Exception as e:  # noqa: BLE001 - the loaders report bad files and options with better messages
        log.debug("start-up budget: no memory estimate (%s: %s)", type(e).__name__, e)
        return None
    # the text encoder and VAE at their size on disk (a lower bound: the check must never refuse a run that
    # fits), and on a GPU the CUDA context
    extra = RESERVE_GIB * _GIB if device.type == "cuda" else 0
    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk):
        extra += _file_bytes(cfg.qwen3)
    if not (cfg.cache_latents or cfg.cache_latents_to_disk):
        extra += _file_bytes(cfg.vae)
    return est["total_gib"] + extra / _GIB, est


def _file_bytes(path: Path) -> int:
    """Bytes of a model file, or of the .safetensors files of a model folder (0 when unreadable)."""
    try:
        path = Path(path)
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
    except OSError:
        return 0


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes a step can use now on `device`, and what they are: free GPU memory, or available RAM on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), "free"
    if device.type != "cpu":
        return None, ""
    try:
        import psutil  # optional: the most portable number
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available), "of RAM available"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "of RAM available"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of RAM free"
    except (ValueError, OSError, AttributeError):
        return None, ""


def check_text_tokens(prompts: list[SamplePrompt], text_encoder: Any) -> None:
    """Preview prompts longer than `MAX_TEXT_TOKENS` (captions: `inputs.report_long_captions`) → ConfigError
    naming the prompt file and line."""
    for p in prompts:
        for text, what in ((p.prompt, "prompt"), (p.negative_prompt, "negative prompt")):
            tokens = text_encoder.tokenize([text])[0]
            n = max(len(tokens.qwen_ids), len(tokens.t5_ids))
            if n > MAX_TEXT_TOKENS:
                raise ConfigError(f"sample_prompts: {p.where}: the {what} is {n} tokens long, above the limit of "
                                  f"{MAX_TEXT_TOKENS}; shorten it")
