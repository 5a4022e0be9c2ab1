"""The models a run trains on: the frozen base loaded with start-up validation, and the DiT prepared with its
speed and memory levers and the network to train (checked early on a weightless DiT of the file's shape, and a
weightless Qwen3 when the text encoder gets modules too: kohya's default, issue 15).

Split from train/loop.py so the loop reads top to bottom; bench/ uses `prepare_dit` and `WEIGHT_DTYPES` too.
"""

from __future__ import annotations

import logging
import os

import torch

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.dtypes import PRECISION_DTYPES
from anima_trainer.models.base_models import BaseModels, load_base_models
from anima_trainer.models.attention_backend import configure_attention
from anima_trainer.models.block_runner import setup_memory
from anima_trainer.models.model_files import ModelFileError
from anima_trainer.models.compile import (CACHE_ENV, CompileDecision, compile_decision, compile_dit_blocks,
                                          configure_compile_cache, is_compiled)
from anima_trainer.models.fp8 import Fp8Linear, has_fp8
from anima_trainer.models.fp8_compute import check_fp8_compute_device, enable_fp8_compute
from anima_trainer.models.layers import set_fused_qkv
from anima_trainer.networks import AdapterNetwork, NetworkError, create_network, create_network_from_weights
from anima_trainer.networks.convert import build_meta_dit, build_meta_qwen3
from anima_trainer.networks.diffusers_format import check_network_diffusers
from anima_trainer.networks.formats import comfy_skipped_keys
from anima_trainer.networks.full_finetune import DiTFinetune, select_parameters
from anima_trainer.train.finetune_plan import finetune_memory_levers
from anima_trainer.train.optimizer_levers import describe_levers

log = logging.getLogger(__name__)

WEIGHT_DTYPES = PRECISION_DTYPES  # mixed_precision → the frozen models' dtype ("no": fp32)


def load_models(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> BaseModels:
    """Load the three parts a run names (`models.base_models.load_base_models`, with its block swap and VAE
    layout); wrong files are named with their flag."""
    return load_base_models(cfg.pretrained_model_name_or_path, cfg.qwen3, cfg.vae, device=device, dtype=dtype,
                            llm_adapter_path=cfg.llm_adapter_path, qwen3_tokenizer_path=cfg.qwen3_tokenizer_path,
                            t5_tokenizer_path=cfg.t5_tokenizer_path, blocks_to_swap=cfg.blocks_to_swap,
                            vae_2d=cfg.qwen_image_vae_2d, vae_chunk_rows=cfg.vae_chunk_size)


def check_network_fp8(dit: torch.nn.Module, network: AdapterNetwork) -> None:
    """DoRA reads the raw base weight (its column norms): refuse it on an fp8 DiT."""
    if not has_fp8(dit):
        return
    dora = [m.path for m in network.dit_modules() if getattr(m, "dora_wd", False)
            and isinstance(dit.get_submodule(m.path), Fp8Linear)]
    if dora:
        raise ValueError(f"fp8_base: DoRA (dora_wd) needs the full-precision base weight of {dora[:3]}...; "
                         "turn off fp8_base or dora_wd")


def prepare_dit(cfg: TrainConfig, dit, device: torch.device, dtype: torch.dtype, *, tokens: set[int],
                batch: int, extra_shapes: int = 0, text_encoder: torch.nn.Module | None = None):
    """Speed and memory levers, then the network, in the only order that works: fused q/k/v packing → fp8 compute →
    memory options (fp8 storage, block swap, checkpointing) → network injection → attention kernel choice →
    torch.compile of the blocks (last: it traces the injected forward patches).  Returns (network, attention kernel).
    `text_encoder`: the Qwen3Model, which gets adapter modules too when the config trains it (kohya's default)."""
    set_fused_qkv(dit, cfg.fuse_qkv)
    if cfg.fp8_compute:
        enable_fp8_compute_for_run(cfg, dit, device)
    try:
        setup_memory(dit, device=device, **{**cfg.memory_options(), **finetune_memory_levers(cfg, dit)})
    except ValueError as e:
        raise ConfigError(f"memory options: {e}") from None
    network = build_network(cfg, dit, text_encoder)
    # issue 15: what that layout cannot carry fails now, not at the first save (a fine-tune writes a DiT file)
    if cfg.save_format == "diffusers" and not cfg.finetunes:

        check_network_diffusers(network)
    try:
        check_network_fp8(dit, network)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    network.to(device)
    kernel = configure_attention(dit, cfg.attention_backend, device, dtype, tokens=max(tokens), batch=batch)
    if compiles_blocks(cfg, device):
        if cfg.compile_backend == "inductor":  # the only backend that writes compiled code to reuse
            configure_compile_cache(cfg.compile_cache_dir)
        compile_dit_blocks(dit, mode=cfg.compile_mode, backend=cfg.compile_backend, fullgraph=cfg.compile_fullgraph,
                           cache_size_limit=cfg.compile_cache_size_limit,
                           max_shapes=2 * len(tokens) + extra_shapes)
    return network, kernel


def enable_fp8_compute_for_run(cfg: TrainConfig, dit, device: torch.device) -> None:
    """fp8_compute (models/fp8_compute.py): refused on devices without fp8 GEMMs, converted before fp8 storage and
    block swap (fp8_base's weights reused).  The CPU is allowed: torch runs the same fp8 kernel there, so a CPU
    run shows fp8's numerics exactly (tests, error measurements), only not faster."""
    try:
        check_fp8_compute_device(device)
        enable_fp8_compute(dit, fp8_base=cfg.fp8_base, work_device=device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if device.type == "cpu":
        log.warning("notice: fp8_compute on the CPU runs the fp8 GEMMs with a GPU's numerics but no faster than "
                    "bf16; it pays on CUDA sm89+ only")


def compile_choice(cfg: TrainConfig, device: torch.device, **levers) -> CompileDecision:
    """compile_blocks resolved for this device and the run's levers (models/compile.py resolve_compile_blocks);
    `levers` overrides them (checkpoint_mode, blocks_to_swap, fp8_base: train/vram_plan.py asks per candidate)."""
    levers = {"checkpoint_mode": cfg.checkpoint_mode, "blocks_to_swap": cfg.blocks_to_swap, "fp8_base": cfg.fp8_base,
              **levers}
    return compile_decision(cfg.compile_blocks, device, backend=cfg.compile_backend, **levers)


def compiles_blocks(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether `prepare_dit` compiles the blocks; when "auto" picks eager on a CUDA card, one log line says why
    (CPU and MPS are eager by design: nothing to say)."""
    decision = compile_choice(cfg, device)
    if cfg.compile_blocks == "auto" and device.type == "cuda" and not decision.compiled:
        log.info("%s", decision.reason)
    return decision.compiled


def first_step_notice(cfg: TrainConfig, dit: torch.nn.Module) -> str | None:
    """What follows "first step N s, " in the line train/monitor.py prints after the first step of a run with
    compiled blocks: what the wait was, where the compiled code is kept, and the one-line way back to eager."""
    if not is_compiled(dit):
        return None
    folder = os.environ.get(CACHE_ENV) if cfg.compile_backend == "inductor" else None  # torch's default if not ours
    cached = f" (cached in {folder}: later runs start faster)" if folder else ""
    return f"including torch.compile of the DiT blocks{cached}; compile_blocks = false runs eager"


def check_network_options(cfg: TrainConfig) -> None:
    """network_module, network_dim/alpha and network_args (target_modules included) tried on a DiT of the file's
    shape on the meta device, before the dataset scan and any model load: a typo in network_args fails in a
    second, not after minutes of scanning and loading (issue 14's start-up order)."""
    if cfg.dim_from_weights:
        return  # the network is the file's (checked when the file is read)
    try:
        dit = build_meta_dit(cfg.pretrained_model_name_or_path)
        text_encoder = build_meta_qwen3(cfg.qwen3) if cfg.trains_text_encoder else None
    except (ModelFileError, OSError, ValueError):
        return  # a bad model file is named by its loader, with its own message
    if cfg.finetunes:  # the trainable_patterns must select something (networks/full_finetune.py)
        select_parameters(dit, cfg.trainable_patterns, cfg.finetune_llm_adapter)
        return
    try:
        create_network(dit, algo=cfg.network_module, dim=cfg.network_dim, alpha=cfg.network_alpha,
                       dropout=cfg.network_dropout, text_encoder=text_encoder, train_dit=cfg.trains_dit,
                       **cfg.network_args)
    except NetworkError as e:
        raise NetworkError(f"network_args: {e}" if cfg.network_args else str(e)) from None
    except (RuntimeError, NotImplementedError) as e:  # needs real weights (e.g. DoRA's norms): checked at the build
        log.debug("network options: not checked before the models load (%s)", e)


def build_network(cfg: TrainConfig, dit, text_encoder: torch.nn.Module | None = None):
    """The network to train: configured (optionally initialised from network_weights), or with
    dim_from_weights exactly the network of that file.  `text_encoder` (the Qwen3Model) gets modules only when
    the config trains it (`cfg.trains_text_encoder`)."""
    if cfg.finetunes:  # kohya's anima_train.py: the DiT's own parameters (networks/full_finetune.py)
        return DiTFinetune(dit, trainable_patterns=cfg.trainable_patterns, train_llm_adapter=cfg.finetune_llm_adapter,
                           base_file=cfg.pretrained_model_name_or_path,  # W0 only when a strength ≠ 1 is used:
                           keep_base=cfg.evaluates or bool(cfg.preservation_loss_weight))
    te = text_encoder if cfg.trains_text_encoder else None
    try:
        return _build_network(cfg, dit, te, create_network, create_network_from_weights)
    except NetworkError as e:
        raise NetworkError(f"network_weights: {e}" if cfg.network_weights else str(e)) from None


def _build_network(cfg: TrainConfig, dit, te, create_network, create_network_from_weights):
    if cfg.dim_from_weights:
        if not cfg.trains_dit:
            raise ConfigError("dim_from_weights: builds the file's whole network, so network_train_text_encoder_only "
                              "cannot drop its DiT modules; remove one of them (network_weights without "
                              "dim_from_weights continues a text-encoder-only network)")
        network = create_network_from_weights(dit, cfg.network_weights, dropout=cfg.network_dropout,
                                              text_encoder=te, **cfg.network_args)
        if network.algo != cfg.network_module:
            raise ConfigError(f"dim_from_weights: {cfg.network_weights} is a {network.algo} network but "
                              f"network_module is {cfg.network_module}")
        return network
    network = create_network(dit, algo=cfg.network_module, dim=cfg.network_dim, alpha=cfg.network_alpha,
                             dropout=cfg.network_dropout, text_encoder=te, train_dit=cfg.trains_dit,
                             **cfg.network_args)
    if cfg.network_weights:  # kohya loads it non-strictly: a side the file lacks starts as initialised
        fresh = network.load_weights(cfg.network_weights, fresh_missing_side=True)
        if fresh:
            side = "text-encoder" if fresh[0].startswith("text_encoder.") else "DiT"
            log.warning("notice: network_weights: %s has no %s module, so its %d %s modules start fresh (as in "
                        "kohya); network_train_unet_only = true (or network_train_text_encoder_only) trains only "
                        "the part the file has", cfg.network_weights, side, len(fresh), side)
    return network


def prepare_text_encoder(cfg: TrainConfig, text_encoder, network) -> None:
    """A trained text encoder (network.trains_text_encoder) runs in training mode, as kohya's `t_enc.train()`,
    with Hugging Face gradient checkpointing when gradient_checkpointing is set (non-reentrant: the frozen
    embedding output needs no requires_grad workaround; HF checkpoints only in training mode).  Qwen3 has no
    dropout, so the mode changes nothing else.  A frozen one stays in eval mode."""
    model = text_encoder.model
    if not network.trains_text_encoder:
        model.eval()
        return
    model.train()
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def module_counts(network) -> str:
    """"N DiT + M text-encoder" for the start-up line (kohya logs both parts)."""
    te, dit = len(network.text_encoder_modules()), len(network.dit_modules())
    return f"{dit} DiT + {te} text-encoder" if te else f"{dit} DiT"


def training_summary(cfg: TrainConfig, network) -> str:
    """What trains, for the start-up line: the adapter modules, or the fine-tuned DiT parameters."""
    if isinstance(network, DiTFinetune):
        levers = describe_levers(cfg)  # e.g. "bf16 weights with compensated updates, fused backward"
        return (f"the DiT itself: {len(network.trainable_parameters())} parameter tensors, "
                f"{network.parameter_count():,} weights (fine-tune{'; ' + levers if levers else ''})")
    return f"{module_counts(network)} {cfg.network_module} modules (+{len(network.norms_by_name)} norm gains)"


def kohya_text_encoder_notice(cfg: TrainConfig, network) -> str | None:
    """save_format = "kohya" with text-encoder modules: ComfyUI maps no `lora_te_*` name of Anima's Qwen3, so it
    would load the DiT part only (kohya's docs send users to its converter for the same reason)."""
    if cfg.save_format != "kohya" or not network.trains_text_encoder:
        return None
    skipped = comfy_skipped_keys(list(network.state_tensors(save_format="kohya")))
    if not skipped:
        return None
    return (f"save_format = \"kohya\": ComfyUI loads only the DiT part of the file; its {len(skipped)} text-encoder "
            "keys (lora_te_*) have no ComfyUI name for Anima's Qwen3 and are skipped there. For ComfyUI use "
            "save_format = \"comfy\" (the default), or convert the file with `anima-trainer convert-network --to "
            "comfy`")
