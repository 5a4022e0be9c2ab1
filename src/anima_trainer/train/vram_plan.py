"""`vram_budget_gb`: choose the memory settings that make a run fit a GPU, fastest first, and say so.

The estimate is `train.memory_estimate.estimate_training_memory` (calibrated on H200 measurements,
bench/README.md) for the largest bucket and batch of the dataset, plus what else lives on the device: the text
encoder and VAE unless their outputs are cached, and a fixed reserve for the CUDA context and allocator slack.
Candidates, in the order of their speed cost (measured on an H200, bench/README.md): cache the LLM adapter's
output (free when the adapter is not trained), no checkpointing, checkpointing of the first k blocks (k growing),
all blocks, all blocks with CPU-offloaded block inputs, then block swap of more and more blocks.  The first that
fits wins; nothing fitting is a start-up error that shows the smallest estimate.

A fine-tune (training_mode = "finetune") is planned by `plan_finetune_memory` (candidates and predictions in
train/finetune_plan.py) over the levers that leave its
result unchanged (checkpointing, offloaded block inputs, swap of the frozen blocks and, with fused_backward_pass,
of trained blocks too), with no step-time estimate.

Each candidate also gets an expected step time (train/step_time.py: a cost model calibrated on the same H200
measurements, scaled by the step's FLOPs), printed with the plan and labelled as an H200 estimate.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.dtypes import precision_name
from anima_trainer.models.model_files import DIT_KINDS, expect_kind
from anima_trainer.networks.inject import parse_bool
from anima_trainer.models.block_runner import frozen_blocks
from anima_trainer.train.distributed import launched_world_size
from anima_trainer.train.finetune_plan import finetune_candidates, finetune_patterns, finetune_peak_gib, user_levers
from anima_trainer.train.finetune_memory import trained_shapes
from anima_trainer.train.memory_estimate import estimate_training_memory
from anima_trainer.train.model_setup import compile_choice
from anima_trainer.train.step_time import CARD, expected_step_ms

log = logging.getLogger(__name__)
RESERVE_GIB = 1.0  # CUDA context, allocator slack, cuBLAS/cuDNN workspaces
TEXT_ENCODER_GIB = 1.3  # Qwen3-0.6B in bf16 (+ buffers), on the device unless its outputs are cached
# a trained text encoder (issue 15) keeps its activations for the backward pass: per token about 28 layers × ~18k
# values (the LoRA inputs, q/k/v, the 3072-wide MLP) × 2 bytes ≈ 1 MiB, ~1/16 of that with gradient checkpointing
# (one layer input each, plus the layer being recomputed).  A counted estimate, not a measurement.
TEXT_ENCODER_TRAIN_MIB_PER_TOKEN = {False: 1.0, True: 0.0625}
TEXT_TOKENS = 512  # the context's rows: a conservative caption length


def text_encoder_training_gib(cfg: TrainConfig, batch: int) -> float:
    """Extra GiB a trained text encoder needs in a step (0 when it is frozen)."""
    if not cfg.trains_text_encoder:
        return 0.0
    return TEXT_ENCODER_TRAIN_MIB_PER_TOKEN[bool(cfg.gradient_checkpointing)] * TEXT_TOKENS * batch / 1024
VAE_GIB = 0.5  # Qwen-Image VAE encoder + a 1024² encode, unless latents are cached


@dataclass
class MemoryPlan:
    settings: dict[str, Any]  # the TrainConfig fields the plan sets
    estimate_gib: float
    budget_gib: float
    table: list[tuple[str, float]]  # (candidate, estimated GiB) in the order tried
    step_ms: list[float] = field(default_factory=list)  # expected ms/step of each tried candidate (an H200 estimate)
    compiled: list[bool] = field(default_factory=list)  # whether each tried candidate's blocks are compiled

    @property
    def expected_ms(self) -> float | None:
        """The chosen candidate's expected ms/step on an H200 (None when not estimated)."""
        return self.step_ms[self.chosen] if self.step_ms else None

    def describe(self) -> str:
        times = self.step_ms or [None] * len(self.table)
        modes = self.compiled or [False] * len(self.table)
        rows = "\n".join(f"  {'→' if i == self.chosen else ' '} {name:<44} {g:6.2f} GiB"
                         + (f"  ~{ms:5.0f} ms/step ({'compiled' if c else 'eager'})" if ms is not None else "")
                         for i, ((name, g), ms, c) in enumerate(zip(self.table, times, modes)))
        chosen = ", ".join(f"{k} = {v}" for k, v in self.settings.items())
        expected = "" if self.expected_ms is None else (
            f"; expected step time ~{self.expected_ms:.0f} ms (an estimate for an {CARD}, "
            f"{'compiled' if modes[self.chosen] else 'eager'} blocks, train/step_time.py; other cards differ)")
        return (f"vram_budget_gb {self.budget_gib:.1f}: estimated peak {self.estimate_gib:.2f} GiB with {chosen}"
                f"{expected}\n{rows}")

    @property
    def chosen(self) -> int:
        return len(self.table) - 1


AUTO_FRACTION = 0.92  # of the card's memory that `auto` plans for


def resolve_budget(value: float | str, device: Any) -> float:
    """A number of GiB, or `auto` (CUDA only): 92 % of the card's memory, or what is free on it now when that is
    less.  Free memory counts another process (a desktop, a second run) that holds part of the card; it is read
    before the models load, so this process's own CUDA context is already in use (RESERVE_GIB counts it again: a
    margin of ~0.3-0.5 GiB).  Memory this process's allocator already reserved is added back (it is ours)."""
    if value != "auto":
        return float(value)
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        raise ConfigError("vram_budget_gb = auto needs a CUDA device; give the budget in GiB instead")
    free, total = torch.cuda.mem_get_info(device)
    card = total / 2**30 * AUTO_FRACTION
    available = (free + torch.cuda.memory_reserved(device)) / 2**30
    if available < card:
        log.info("vram_budget_gb = auto: %.1f GiB free of the card's %.1f GiB (another process uses the rest): "
                 "planning for %.1f GiB", available, total / 2**30, available)
        return available
    return card


def candidates(num_blocks: int, llm_adapter_cacheable: bool) -> list[tuple[str, dict[str, Any]]]:
    """Memory settings from the fastest to the most frugal."""
    base = {"cache_llm_adapter_outputs": True} if llm_adapter_cacheable else {}
    out = [("no checkpointing", {**base, "gradient_checkpointing": False, "checkpoint_blocks": None,
                                 "cpu_offload_checkpointing": False, "blocks_to_swap": 0})]
    for k in range(4, num_blocks, 4):
        out.append((f"checkpointing of {k} blocks", {**base, "gradient_checkpointing": True, "checkpoint_blocks": k,
                                                      "cpu_offload_checkpointing": False, "blocks_to_swap": 0}))
    full = {**base, "gradient_checkpointing": True, "checkpoint_blocks": None, "blocks_to_swap": 0}
    out.append(("checkpointing of all blocks", {**full, "cpu_offload_checkpointing": False}))
    out.append(("all blocks + offloaded block inputs", {**full, "cpu_offload_checkpointing": True}))
    for n in range(4, num_blocks - 1, 4):
        out.append((f"… + block swap of {n} blocks", {**full, "cpu_offload_checkpointing": True, "blocks_to_swap": n}))
    out.append((f"… + block swap of {num_blocks - 2} blocks", {**full, "cpu_offload_checkpointing": True,
                                                                "blocks_to_swap": num_blocks - 2}))
    return out


def resident_extras_gib(cfg: TrainConfig) -> float:
    """What the device holds besides the DiT's step: the reserve, and the text encoder and VAE unless their
    outputs are cached."""
    extra = RESERVE_GIB
    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk):
        extra += TEXT_ENCODER_GIB
    if not (cfg.cache_latents or cfg.cache_latents_to_disk):
        extra += VAE_GIB
    return extra


def plan_memory(cfg: TrainConfig, dit_config: Any, *, resolution: tuple[int, int], batch: int,
                budget_gib: float, llm_adapter_trained: bool, device: Any = None) -> MemoryPlan:
    """The fastest candidate whose estimate fits `budget_gib` (ConfigError when none does), with each tried
    candidate's expected step time, compiled or eager as `compile_blocks` resolves for `device` with that
    candidate's levers (train/model_setup.py `compile_choice`: "auto" runs block swap eager, for one)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    extra = resident_extras_gib(cfg)
    dtype = precision_name(cfg.mixed_precision)
    table: list[tuple[str, float]] = []
    step_ms: list[float] = []
    compiled: list[bool] = []
    for name, settings in candidates(dit_config.num_blocks, dit_config.has_llm_adapter and not llm_adapter_trained):
        options = {**cfg.memory_options(), **{k: v for k, v in settings.items() if k != "cache_llm_adapter_outputs"}}
        te_gib = text_encoder_training_gib(cfg.model_copy(update={
            "gradient_checkpointing": options["gradient_checkpointing"]}), batch)
        est = estimate_training_memory(dit_config, resolution=resolution, batch=batch, rank=cfg.network_dim,
                                       dtype=dtype, network_args=cfg.network_args,
                                       include_llm_adapter=not settings.get("cache_llm_adapter_outputs", False),
                                       **options)
        total = est["total_gib"] + extra + te_gib
        table.append((name, total))
        compiled.append(compile_choice(cfg, device, checkpoint_mode=options["checkpoint_mode"],
                                       blocks_to_swap=options["blocks_to_swap"]).compiled)
        step_ms.append(expected_step_ms(dit_config, tokens=est["tokens"] // batch, batch=batch, compiled=compiled[-1],
                                        block_bytes=est["block_weights_gib"] * 2**30, **options))
        if total <= budget_gib:
            return MemoryPlan(settings, total, budget_gib, table, step_ms, compiled)
    smallest = min(g for _, g in table)
    raise ConfigError(f"vram_budget_gb {budget_gib:.1f}: no memory setting fits; the most frugal one needs about "
                      f"{smallest:.1f} GiB at {resolution[1]}×{resolution[0]} px, batch {batch} (lower the "
                      "resolution or batch size, cache latents and text encoder outputs, or use fp8_base)")


def plan_finetune_memory(cfg: TrainConfig, dit_config: Any, *, resolution: tuple[int, int], batch: int,
                         budget_gib: float, extra_gib: float) -> MemoryPlan:
    """The fastest fine-tune candidate (train/finetune_plan.py `finetune_candidates`) whose predicted peak plus
    `extra_gib` (text encoder, VAE, reserve) fits `budget_gib`; a ConfigError naming the user levers that would
    make it fit (with their predictions) when none does."""
    patterns = finetune_patterns(cfg.trainable_patterns, cfg.finetune_llm_adapter)
    dtype = "no" if cfg.mixed_precision == "no" else cfg.mixed_precision
    trained = trained_shapes(dit_config, patterns)
    n_frozen = len(frozen_blocks(dit_config.num_blocks, trained))
    levers = user_levers(cfg, dit_config=dit_config, budget_gib=budget_gib)
    common = {"patterns": patterns, "resolution": resolution, "batch": batch, "dtype": dtype,
              "fp8_base": cfg.fp8_base}
    table: list[tuple[str, float]] = []
    for name, settings in finetune_candidates(dit_config.num_blocks, n_frozen, swap_trained=levers["fused_backward"]):
        total = finetune_peak_gib(dit_config, settings, levers, **common) + extra_gib
        table.append((name, total))
        if total <= budget_gib:
            return MemoryPlan(settings, total, budget_gib, table)
    options = []
    for fused, optimizer, offload in dict.fromkeys(itertools.product(
            (levers["fused_backward"], True), (levers["optimizer"], "adamw8bit", "adafactor"),
            (levers["optimizer_offload"], True))):
        changed = {"fused_backward": fused, "optimizer": optimizer, "optimizer_offload": offload}
        if changed == {k: levers[k] for k in changed}:
            continue
        frugal = finetune_candidates(dit_config.num_blocks, n_frozen, swap_trained=fused)[-1][1]
        peak = finetune_peak_gib(dit_config, frugal, {**levers, **changed}, **common) + extra_gib
        options.append((peak, _lever_words(levers, changed)))
    fitting = [(g, w) for g, w in options if g <= budget_gib]
    fitting = [(g, w) for g, w in fitting  # the least change: no fitting option that sets a subset of its levers
               if not any(set(v.split(" + ")) < set(w.split(" + ")) for _, v in fitting)]
    fitting.sort(key=lambda o: (o[1].count("+"), o[0]))
    best = min(g for _, g in table)
    listed = fitting or [min(options)]
    words = "; ".join(f"{w}: {g:.1f} GiB predicted" for g, w in listed)
    swaps = levers["fused_backward"] or any("fused_backward_pass" in w for _, w in listed)
    frugal_words = "the most frugal memory setting" + (
        ", which with fused_backward_pass swaps trained blocks too" if swaps and n_frozen < dit_config.num_blocks
        else "")
    lead = f"these would make it fit (with {frugal_words})" if fitting else \
        "even the most frugal choice of them does not fit"
    cached = (cfg.cache_latents or cfg.cache_latents_to_disk) and (cfg.cache_text_encoder_outputs
                                                                   or cfg.cache_text_encoder_outputs_to_disk)
    cache = "" if cached else ", cache latents and text encoder outputs"
    raise ConfigError(f"vram_budget_gb {budget_gib:.1f}: no memory setting fits this fine-tune; the most frugal one "
                      f"({table[-1][0]}) is predicted at {best:.1f} GiB at {resolution[1]}×{resolution[0]} px, batch "
                      f"{batch}. The optimizer and its levers are yours to choose: {lead}: {words}. Otherwise lower "
                      f"the resolution or batch size, or train fewer parameters (trainable_patterns){cache}")


def _lever_words(levers: dict[str, Any], changed: dict[str, Any]) -> str:
    """"fused_backward_pass + optimizer_type = AdaFactor" for the levers `changed` sets differently."""
    names = {"adamw8bit": "AdamW8bit", "adafactor": "AdaFactor", "adamw": "AdamW"}
    words = []
    if changed["fused_backward"] and not levers["fused_backward"]:
        words.append("fused_backward_pass")
    if changed["optimizer"] != levers["optimizer"]:
        words.append(f"optimizer_type = {names[changed['optimizer']]}")
    if changed["optimizer_offload"] and not levers["optimizer_offload"]:
        words.append("optimizer_offload")
    return " + ".join(words)


def apply_plan(cfg: TrainConfig, dataset, device: Any, *, llm_adapter_trained: bool) -> TrainConfig:
    """`cfg` with the memory settings of its `vram_budget_gb` (unchanged without one); logs the plan."""
    if cfg.vram_budget_gb is None:
        return cfg
    if cfg.finetunes and cfg.fsdp_sharding == "auto" and (processes := launched_world_size()) > 1:
        log.warning("notice: vram_budget_gb = %s: a fine-tune sharded over %d processes is not planned (the plan "
                    "models one process holding the whole DiT, a sharded process holds 1/%d of its weights, "
                    "gradients and optimizer state); the run uses its own checkpointing settings. docs/multi_gpu.md "
                    "gives the computed memory per GPU", cfg.vram_budget_gb, processes, processes)
        return cfg
    info = expect_kind(cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path",
                       DIT_KINDS)
    buckets = dataset.bucket_table()
    width, height = max(((w, h) for w, h, *_ in buckets), key=lambda wh: wh[0] * wh[1])
    batch = max((len(b) for b in dataset.batch_plan(0)), default=1)
    budget = resolve_budget(cfg.vram_budget_gb, device)
    if cfg.finetunes:  # the fine-tune's memory model and levers (train/finetune_plan.py)
        plan = plan_finetune_memory(cfg, info.dit_config, resolution=(height, width), batch=batch, budget_gib=budget,
                                    extra_gib=resident_extras_gib(cfg))
    else:
        plan = plan_memory(cfg, info.dit_config, resolution=(height, width), batch=batch, budget_gib=budget,
                           llm_adapter_trained=llm_adapter_trained, device=device)
    log.info("%s", plan.describe())
    return cfg.model_copy(update=plan.settings)


def llm_adapter_trained(cfg: TrainConfig) -> bool:
    """Whether the network trains anything inside the LLM adapter, or the text encoder before it (then the
    adapter's output cannot be cached)."""
    if cfg.dim_from_weights or cfg.trains_text_encoder:
        return True  # decided by the file; assume the worst
    if "target_modules" in cfg.network_args:  # sd-scripts-anima's list may name adapter modules: assume it does
        return True
    return any(parse_bool(k, cfg.network_args.get(k, False)) for k in ("train_llm_adapter", "train_norm"))
