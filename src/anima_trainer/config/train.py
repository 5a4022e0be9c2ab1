"""`TrainConfig`: every training setting, with kohya's names and (where kohya has one) kohya's defaults.

Values are type-checked by pydantic; `anima_trainer.config.loader.parse_train_args` builds one from the command
line and a `--config_file` TOML.  Paths are kept as given (only `~` is expanded): a relative path, also one from
a TOML, is relative to the current working directory, as in kohya.  An empty string for a path means "not set".
"""

from __future__ import annotations

import ast
import json
import logging
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUseDefault

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.optimizer_rules import check_optimizer_schedule
from anima_trainer.config.errors import ConfigError, did_you_mean
from anima_trainer.download.sources import T5_TOKENIZER as _t5
from anima_trainer.download.urls import parse_source

_NONNEG = {"ge": 0}
_log = logging.getLogger(__name__)
# sd-scripts-anima's network modules (seed_system.md §2) → our algorithms; its LoKr factor default
SD_SCRIPTS_ANIMA_MODULES = {"networks.lokr_anima": "lokr"}
SD_SCRIPTS_ANIMA_LOKR_FACTOR = 8
# its LoKr network_args names → ours (same meaning); an empty value means its default
SD_SCRIPTS_ANIMA_NETWORK_ARGS = {"lokr_factor": "factor", "lokr_full_matrix": "full_matrix",
                                 "lokr_decompose_both": "decompose_both", "lokr_rank_dropout": "rank_dropout",
                                 "lokr_module_dropout": "module_dropout"}
SD_SCRIPTS_ANIMA_EMPTY = {"lokr_factor": str(SD_SCRIPTS_ANIMA_LOKR_FACTOR), "lokr_full_matrix": "false",
                          "lokr_decompose_both": "false", "lokr_rank_dropout": "0", "lokr_module_dropout": "0"}


class _Notices(tuple):
    """Start-up notices of a config: they describe how it was written, not what it is, so two configs that train
    the same compare equal whatever their notices (a resolved config read back has other ones)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Notices)

    def __hash__(self) -> int:
        return 0


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=False)

    # models
    pretrained_model_name_or_path: Path = Field(description="Anima DiT .safetensors")
    qwen3: Path = Field(description="Qwen3-0.6B .safetensors or Hugging Face folder")
    vae: Path = Field(description="Qwen-Image VAE .safetensors")
    llm_adapter_path: Path | None = Field(None, description="separate LLM-adapter weights (else taken from the DiT)")
    qwen3_tokenizer_path: Path | None = Field(None, description="Qwen tokenizer folder (when --qwen3 is one file)")
    t5_tokenizer_path: Path | None = Field(None, description="T5 tokenizer folder")
    # tokenizer download at start-up (sd-scripts-anima's flags; download/startup.py)
    auto_download_t5_tokenizer: bool = Field(True, description="download missing T5 (and Qwen) tokenizer files "
                                                               "into their folders at start-up")
    t5_tokenizer_repo_id: str = Field(_t5.hf_repo, description="T5 tokenizer source: HF repo id, huggingface.co "
                                                               "or modelscope.cn URL")
    t5_tokenizer_subfolder: str = Field(_t5.subfolder, description="subfolder tried first (then the repo root)")
    t5_tokenizer_modelscope_fallback: bool = Field(True, description="try ModelScope when Hugging Face fails")
    t5_tokenizer_modelscope_repo_id: str = Field(_t5.modelscope_repo, description="ModelScope fallback repo id "
                                                                                  "or URL")
    t5_tokenizer_modelscope_revision: str = Field(_t5.modelscope_revision, description="ModelScope revision")
    t5_tokenizer_modelscope_subfolder: str = Field(_t5.modelscope_subfolder, description="ModelScope subfolder")
    t5_tokenizer_validate_strict: bool = Field(False, description="check the T5 tokenizer is exactly Anima's "
                                                                  "(special ids, 32100 tokens, a known encoding)")
    # output
    output_dir: Path = Field(description="folder for the saved LoRA files")
    output_name: str = Field("last", min_length=1, description="file name stem (default: last): a plain file name "
                                                               "(no / \\ .. or control characters), at most 180 "
                                                               "bytes")
    save_model_as: Literal["safetensors"] = Field("safetensors", description="only safetensors is written")
    save_precision: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="dtype of saved weights (fp32/float, fp16, bf16; default: as trained)")
    save_every_n_steps: int | None = Field(None, ge=1)
    save_every_n_epochs: int | None = Field(None, ge=1)
    save_last_n_steps: int | None = Field(None, ge=1, description="keep step saves of the last N steps only")
    save_last_n_epochs: int | None = Field(None, ge=1, description="keep the last N epoch saves only")
    overwrite: bool = Field(False, description="replace existing output files (anima-trainer option)")
    # training states (exact resume)
    save_state: bool = Field(False, description="also save a training state folder with every network save")
    save_state_on_train_end: bool = Field(False, description="save a training state when training ends")
    save_last_n_steps_state: int | None = Field(None, ge=1, description="keep step states of the last N steps")
    save_last_n_epochs_state: int | None = Field(None, ge=1, description="keep the last N epoch states")
    resume: str | None = Field(None, description="a state folder, or 'latest' (newest state of output_name)")
    vram_budget_gb: float | Literal["auto"] | None = Field(
        None, description="fit the run into this much GPU memory (GiB) or 'auto' (92 % of the card): picks "
                          "checkpointing depth, offload, block swap and adapter-output caching, printed at start")
    resume_snapshot_strict: bool = Field(True, description="changed critical settings on resume: error (true) "
                                                           "or warning (false)")
    # network
    network_module: Literal["lora", "lokr", "loha", "lycoris"] = Field(
        "lora", description="networks.lora_anima (= lora), networks.lokr (= lokr), networks.loha (= loha), "
                            "lycoris.kohya with network_args algo=lokr|loha")
    network_dim: int = Field(4, ge=1, description="rank (default 4, as networks.lora_anima); LoKr: >= 100000 = "
                                                  "full matrices")
    network_alpha: float = Field(1.0, gt=0, description="LoRA alpha; scale = alpha / dim (default 1)")
    network_args: dict[str, str] = Field(default_factory=dict, description="key=value ... for the network")
    network_weights: Path | None = Field(None, description="initial LoRA weights")
    network_dropout: float | None = Field(None, ge=0, lt=1, description="neuron dropout on the down projection")
    dim_from_weights: bool = Field(False, description="build the network from --network_weights alone: algorithm, "
                                                      "targets, per-module dims/alphas, LoKr layout, DoRA, norms")
    save_format: Literal["comfy", "kohya"] = Field(
        "comfy", description="key names of saved networks: comfy (diffusion_model.*) or kohya (lora_unet_*); "
                             "anima-trainer option, both load in ComfyUI")
    # optimisation
    # upper bounds: a rate beyond them is a typo (1e39 overflows float32 inside the optimizer); Prodigy and
    # D-Adaptation use about 1
    learning_rate: float = Field(2e-6, gt=0, le=1000, description="base learning rate (kohya default 2e-6)")
    unet_lr: float | None = Field(None, gt=0, le=1000,
                                  description="learning rate of the DiT LoRA (default: learning_rate)")
    optimizer_type: str = Field("AdamW", description="kohya name (AdamW, AdamW8bit, Lion, Prodigy, AdaFactor, "
                                                     "RAdamScheduleFree, ...), a torch.optim or pytorch_optimizer "
                                                     "class, or module.Class")
    optimizer_args: dict[str, Any] = Field(default_factory=dict, description="key=value ... for the optimizer")
    use_8bit_adam: bool = Field(False, description="kohya's legacy flag: optimizer_type AdamW8bit")
    use_lion_optimizer: bool = Field(False, description="kohya's legacy flag: optimizer_type Lion")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
                          "piecewise_constant", "adafactor"] = "constant"
    lr_warmup_steps: int | float = Field(0, description="warm-up steps, or a fraction < 1 of all steps")
    lr_decay_steps: int | float = Field(0, description="warmup_stable_decay: decay steps, or a fraction < 1")
    lr_scheduler_num_cycles: float = Field(1.0, gt=0, description="kohya's meaning: restarts of "
                                           "cosine_with_restarts; 2 x the cosine periods of cosine_with_min_lr and "
                                           "warmup_stable_decay (1 = one descent); not used by cosine (one descent). "
                                           "sd-scripts-anima configs: cosine periods (0.5 = one descent)")
    lr_scheduler_power: float = Field(1.0, gt=0, description="polynomial: exponent of the decay")
    lr_scheduler_min_lr_ratio: float = Field(0.0, ge=0, le=1, description="end lr / lr (cosine_with_min_lr, "
                                                                          "warmup_stable_decay, polynomial)")
    lr_scheduler_timescale: int | None = Field(None, ge=1, description="inverse_sqrt (default: warm-up steps, "
                                                                       "else 10000)")
    lr_scheduler_type: str | None = Field(None, description="a torch.optim.lr_scheduler class or module.Class "
                                                            "(replaces lr_scheduler)")
    lr_scheduler_args: dict[str, Any] = Field(default_factory=dict, description="key=value ... for "
                                              "lr_scheduler_type, or step_rules for piecewise_constant")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = off)")
    # bounded so that step and epoch counters fit every index type (2**63-1 overflowed at the first batch):
    # 100 million steps is years of training
    max_train_steps: int = Field(1600, ge=1, le=100_000_000)
    max_train_epochs: int | None = Field(None, ge=1, le=1_000_000, description="overrides max_train_steps")
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int | None = Field(None, ge=0, lt=2**32)
    gradient_checkpointing: bool = False
    # memory levers (models/memory.py, docs/performance.md); all give the same gradients as without
    checkpoint_blocks: int | None = Field(None, ge=0, description="with gradient_checkpointing: checkpoint only the "
                                          "first N DiT blocks (default: all); the rest keep activations (faster)")
    checkpoint_mode: Literal["full", "selective"] = Field(
        "full", description="full: recompute whole blocks; selective: keep matmul/attention outputs, recompute the "
                            "cheap ops (norms, modulation, GELU, RoPE)")
    cpu_offload_checkpointing: bool = Field(False, description="the residual each checkpointed block keeps goes to "
                                                               "pinned CPU memory (needs gradient_checkpointing)")
    unsloth_offload_checkpointing: bool = Field(False, description="kohya's name for the same offload as "
                                                                   "cpu_offload_checkpointing")
    blocks_to_swap: int = Field(0, ge=0, description="keep the weights of the last N DiT blocks in CPU memory, "
                                                     "streamed to the GPU when used (0 = off)")
    fp8_base: bool = Field(False, description="store the DiT blocks' attention/MLP weights in fp8 with a per-tensor "
                                             "scale (half their memory)")
    fp8_base_unet: bool = Field(False, description="kohya's name: the same as fp8_base (only the DiT is stored in fp8)")
    fp8_scaled: bool = Field(False, description="kohya's flag; fp8 storage here is always scaled (needs fp8_base)")
    fp8_format: Literal["e4m3fn", "e5m2"] = Field("e4m3fn", description="fp8 storage format of fp8_base")
    max_data_loader_n_workers: int = Field(8, ge=0)
    # speed levers (docs/performance.md); each is exact within a stated tolerance
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="SDPA kernel of the DiT attention; auto = fastest measured at start-up on CUDA >= 8.0")
    fuse_qkv: bool = Field(True, description="one GEMM for self-attention q/k/v (weights packed, keys unchanged)")
    compile_blocks: bool = Field(False, description="torch.compile each DiT block, static shapes (alias compile)")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode of the blocks (CUDA-graph modes are not supported)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend (aot_eager/eager: debugging)")
    compile_fullgraph: bool = Field(False, description="fail on a graph break inside a block instead of splitting")
    compile_cache_size_limit: int | None = Field(
        None, ge=1, description="dynamo cache entries per block (default: from the bucket count)")
    # flow matching
    timestep_sampling: Literal["sigmoid", "uniform", "sigma", "shift", "flux_shift"] = "sigmoid"
    discrete_flow_shift: float = Field(1.0, gt=0)
    sigmoid_scale: float = Field(1.0, gt=0)
    weighting_scheme: Literal["uniform", "logit_normal", "sigma_sqrt", "cosmap", "mode", "none"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_c: float = Field(0.1, gt=0)
    # data / logging / sampling
    dataset_config: Path = Field(description="kohya dataset TOML")
    logging_dir: Path | None = Field(None, description="tracker folder (default with TensorBoard: <output_dir>/logs)")
    log_with: Literal["tensorboard", "wandb", "all", "none"] | None = Field(
        None, description="trackers (default: tensorboard when installed; none = off)")
    log_prefix: str | None = Field(None, description="run folder prefix (default: <output_name>_)")
    console_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = Field(
        None, description="console log level (kohya's option; default INFO; DEBUG adds tracebacks to errors)")
    # monitoring / logging (train/monitor.py, events.py, tracking.py)
    log_every_n_steps: int = Field(1, ge=1, description="scalars every N optimizer steps (reads the loss then)")
    log_tracker_name: str | None = Field(None, description="tracker project name (default: network_train)")
    log_tracker_config: Path | None = Field(None, description="TOML of tracker init arguments ([wandb] ...)")
    wandb_run_name: str | None = Field(None, description="wandb run name (default: the run folder name)")
    wandb_api_key: str | None = Field(None, repr=False, description="wandb login key (never written to logs)")
    auto_start_tensorboard: bool = Field(False, description="serve the logs with TensorBoard during the run")
    tensorboard_host: str = Field("127.0.0.1", min_length=1)
    tensorboard_port: int = Field(6006, ge=0, le=65535, description="first port tried (+20 more; 0 = any)")
    tensorboard_logdir: Path | None = Field(None, description="folder served (default: logging_dir)")
    monitor_memory: bool = Field(True, description="log CUDA memory (gpu/*) and check memory_warn_ratio")
    monitor_alert_policy: Literal["warn", "raise"] = Field("warn", description="raise: stop on memory_near_limit")
    nonfinite_loss_policy: Literal["warn", "raise", "skip_step"] | None = Field(
        None, description="NaN/Inf loss or grad norm (default: skip_step; raise when monitor_alert_policy = raise)")
    max_consecutive_nonfinite: int = Field(5, ge=1, description="skip_step: stop after N non-finite steps in a row")
    loss_spike_ratio: float = Field(3.0, gt=1, description="alert when loss > ratio × recent median (0 = default)")
    memory_warn_ratio: float = Field(0.95, gt=0, le=1, description="alert when peak allocated / card memory >= "
                                                                   "ratio (0 = default)")
    sample_every_n_steps: int | None = Field(None, ge=1)
    sample_every_n_epochs: int | None = Field(None, ge=1)
    sample_prompts: Path | None = Field(None, description="kohya prompt file (.txt with --n --w --h --d --s --l "
                                        "--fs, .toml or .json), checked whole at start-up; sizes at most 4096 px")
    sample_at_first: bool = False
    # validation loss on held-out images (train/validation.py); split/seed: defaults for dataset.toml
    validation_split: float = Field(0.0, ge=0, lt=1, description="fraction of each dataset's (non-reg) images held "
                                    "out for validation, where dataset_config does not set it")
    validation_seed: int | None = Field(None, ge=0, description="seed of the held-out choice and the validation "
                                        "noise, where dataset_config does not set it (default: seed)")
    validate_every_n_steps: int | None = Field(None, ge=1, description="validation loss every N optimizer steps")
    validate_every_n_epochs: int | None = Field(None, ge=1, description="validation loss every N epochs (default: "
                                                "every epoch when images are held out)")
    max_validation_steps: int | None = Field(None, ge=1, description="use at most N validation batches")
    # caches of the frozen encoders (content-addressed safetensors beside the images when *_to_disk)
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    vae_batch_size: int = Field(1, ge=1)
    text_encoder_batch_size: int | None = Field(None, ge=1)
    caption_variants: int = Field(8, ge=1, le=1024)  # ours: encodings per caption when captions are random
    prior_loss_weight: float = Field(1.0, ge=0)  # loss weight of regularisation (is_reg) images
    cache_llm_adapter_outputs: bool = False  # ours: frozen adapter → its output per caption computed once
    # --- issue 14 (nets: max-norm, base weights, component lrs, full half precision) ---
    scale_weight_norms: float | None = Field(
        None, ge=0, description="kohya's max-norm regularisation: after every optimizer step each module's "
        "‖scale·ΔW‖ above this value is scaled down to it (LoRA: up and down by √ratio, as kohya; LoKr/LoHa: each "
        "factor, as LyCORIS; kohya's own networks.lokr/loha ignore it); logs max_norm/keys_scaled, "
        "max_norm/max_key_norm, norm/avg_key_norm (0 or unset = off; 1 is kohya's suggested start)")
    base_weights: list[Path] | None = Field(
        None, description="network files merged into the DiT before training (ComfyUI's merge, in order); the "
        "trained network learns on top of them")
    base_weights_multiplier: list[float] | None = Field(
        None, description="strength of each base_weights file, in the same order (missing values: 1.0)")
    self_attn_lr: float | None = Field(
        None, ge=0, description="kohya v0.11 component lr: modules under `.self_attn` (unset = base lr, 0 = frozen); "
        "kohya applies these in full fine-tuning only, here to the adapter modules by the same name rules; a "
        "network_reg_lrs rule wins")
    cross_attn_lr: float | None = Field(None, ge=0, description="component lr of `.cross_attn` modules (as "
                                        "self_attn_lr)")
    mlp_lr: float | None = Field(None, ge=0, description="component lr of `.mlp` modules (as self_attn_lr)")
    mod_lr: float | None = Field(None, ge=0, description="component lr of `.adaln_modulation` modules (excluded by "
                                 "default; as self_attn_lr)")
    llm_adapter_lr: float | None = Field(None, ge=0, description="component lr of everything under `llm_adapter` "
                                         "(needs train_llm_adapter; as self_attn_lr)")
    full_bf16: bool = Field(False, description="kohya: the adapter weights, their gradients and the optimizer state "
                            "in bf16 (needs mixed_precision bf16); saves memory, small updates may round away")
    full_fp16: bool = Field(False, description="kohya: as full_bf16 in fp16 with the gradient scaler (needs "
                            "mixed_precision fp16)")

    # --- issue 14 (noise and timestep options) ---
    noise_offset: float | None = Field(None, ge=0, description="kohya's noise offset: noise += value·N(0,1) per "
                                       "sample and channel (around 0.05–0.1; kohya's own Anima trainer ignores it)")
    noise_offset_random_strength: bool = Field(False, description="noise offset strength drawn from U(0, "
                                               "noise_offset) per sample")
    adaptive_noise_scale: float | None = Field(None, description="adds value·|latent channel mean| to noise_offset "
                                               "(needs noise_offset)")
    multires_noise_iterations: int | None = Field(None, ge=0, description="kohya's multires (pyramid) noise with "
                                                  "this many levels (6–10 usual; 0/unset = off)")
    multires_noise_discount: float = Field(0.3, ge=0, description="weight ratio between multires noise levels")
    ip_noise_gamma: float | None = Field(None, ge=0, description="input perturbation: the model input uses noise "
                                         "ε + γ·ξ, the target keeps ε (around 0.1; as kohya's Anima trainer)")
    ip_noise_gamma_random_strength: bool = Field(False, description="γ drawn from U(0, ip_noise_gamma) per sample")
    min_timestep: int | None = Field(None, ge=0, le=1000, description="lowest timestep on kohya's 0–1000 scale: "
                                     "σ is mapped from [0, 1] onto [min_timestep, max_timestep]/1000")
    max_timestep: int | None = Field(None, ge=0, le=1000, description="highest timestep on kohya's 0–1000 scale "
                                     "(see min_timestep)")
    min_snr_gamma: float | None = Field(None, ge=0, description="accepted for kohya configs; no effect for Anima "
                                        "(flow matching), as in kohya: a start-up notice says so")
    debiased_estimation_loss: bool = Field(False, description="accepted for kohya configs; no effect for Anima, as "
                                           "in kohya: a start-up notice says so")
    v_pred_like_loss: float | None = Field(None, ge=0, description="accepted for kohya configs; no effect for Anima, "
                                           "as in kohya: a start-up notice says so")
    scale_v_pred_loss_like_noise_pred: bool = Field(False, description="accepted for kohya configs; no effect for "
                                                    "Anima (no v-prediction): a start-up notice says so")

    @field_validator("noise_offset", "adaptive_noise_scale", "multires_noise_iterations", "ip_noise_gamma",
                     "min_timestep", "max_timestep", "min_snr_gamma", "v_pred_like_loss", mode="before")
    @classmethod
    def _unset_noise_option(cls, v: Any) -> Any:
        return None if v == "" else v  # kohya's None written by GUIs as ""

    @model_validator(mode="after")
    def _noise_options(self) -> TrainConfig:
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            raise ValueError("adaptive_noise_scale: needs noise_offset (kohya: adaptive_noise_scale requires "
                             "noise_offset); set noise_offset too or remove adaptive_noise_scale")
        lo, hi = self.min_timestep, self.max_timestep
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_timestep: {lo} is above max_timestep {hi}; set min_timestep <= max_timestep")
        return self
    # --- issue 14 (sd-scripts-anima configs) ---
    sd_scripts_anima_defaults: bool = Field(
        False, description="apply sd-scripts-anima's defaults where the config sets nothing: train_norm on, "
                           "LLM-adapter targets, gradient_checkpointing on, LoKr factor 8, logit-normal timesteps "
                           "with shift 3, resume_ignore_optimizer_mismatch on (default: on when the config uses "
                           "sd-scripts-anima's names: anima_transformer, qwen, t5_tokenizer_dir, anima_*, "
                           "networks.lokr_anima)")
    train_norm: bool | None = Field(
        None, description="also train the RMSNorm gains of the DiT and the LLM adapter (sd-scripts-anima's flag; "
                          "wins over network_args train_norm, with a notice; default: network_args train_norm, else "
                          "off, on with sd-scripts-anima defaults)")
    anima_seq_len: int | None = Field(
        None, ge=1, description="sd-scripts-anima's text length; any value is accepted with a notice: the context is "
                                "always padded to 512 rows and captions are not cut, as ComfyUI runs Anima")
    resume_ignore_optimizer_mismatch: bool | None = Field(
        None, description="on resume, a changed optimizer_type or an optimizer state that does not fit restarts the "
                          "optimizer from a fresh state with a warning instead of an error (default: on with "
                          "sd-scripts-anima defaults, else off unless resume_snapshot_strict = false)")
    anima_resume_snapshot_strict: bool = Field(
        False, description="sd-scripts-anima's strict resume: any change of a saved setting (not only the critical "
                           "ones) is an error")
    _sd_notices: _Notices = PrivateAttr(default_factory=lambda: _Notices())


    # --- issue 14 (vae) ---
    qwen_image_vae_2d: bool = Field(True, description="encode/decode single images with the 2-D form of the "
                                    "Qwen-Image VAE (kohya's --qwen_image_vae_2d: the last temporal slice of each "
                                    "causal conv; equal to the 3-D model up to rounding, faster, less memory); on "
                                    "by default here, false = diffusers' 3-D model")
    vae_chunk_size: int | None = Field(None, ge=1, description="VAE convolutions computed this many rows at a "
                                       "time (kohya's --vae_chunk_size: less peak memory, same result; 2-D path)")
    vae_disable_cache: bool = Field(False, description="kohya's switch for the 3-D VAE's feature cache between "
                                    "video chunks; single images never use it, so it changes nothing (a notice)")
    masked_loss: bool = Field(False, description="kohya's --masked_loss: the loss is multiplied by a mask image "
                              "of each subset's conditioning_data_dir (same file stem, red channel, 0..255 -> "
                              "0..1, resized like the image), or by the alpha mask of alpha_mask subsets")
    torch_compile: bool = Field(False, description="kohya's legacy whole-model compile; here it turns on "
                                "compile_blocks (the same math, compiled per DiT block) with a notice")
    dynamo_backend: str = Field("inductor", description="kohya's backend of torch_compile: inductor, aot_eager and "
                                "eager map onto compile_backend; others compile with inductor (a notice)")

    @model_validator(mode="after")
    def _issue14_vae_compile(self) -> TrainConfig:
        """torch_compile/dynamo_backend -> compile_blocks/compile_backend (kohya's --compile is the same idea)."""
        backend = self.dynamo_backend.strip().lower()
        if self.torch_compile and backend != "no":
            self.compile_blocks = True
            if backend in ("inductor", "aot_eager", "eager"):
                self.compile_backend = backend
        return self

    def vae_compile_notices(self) -> list[str]:
        """One start-up notice per issue-14 VAE/compile option that is accepted with a different effect."""
        notes = []
        if self.vae_disable_cache:
            notes.append("vae_disable_cache = true: the VAE's feature cache only carries frames between video "
                         "chunks and a single image never uses it (the 2-D path has none); latents are the same "
                         "either way; nothing to change")
        if self.vae_chunk_size and not self.qwen_image_vae_2d:
            notes.append(f"vae_chunk_size = {self.vae_chunk_size}: chunked convolutions run on the 2-D VAE path; "
                         "with qwen_image_vae_2d = false the 3-D model runs unchunked (same latents, more memory)")
        backend = self.dynamo_backend.strip().lower()
        if self.torch_compile:
            if backend == "no":
                notes.append("torch_compile = true with dynamo_backend = 'no': nothing is compiled (as in kohya)")
            else:
                shown = backend if backend in ("inductor", "aot_eager", "eager") else "inductor"
                extra = "" if shown == backend else f" (dynamo_backend '{self.dynamo_backend}' is not available here)"
                notes.append(f"torch_compile = true: compiled per DiT block (compile_blocks, as kohya's --compile) "
                             f"with backend {shown}{extra} instead of the whole model; the same math, faster to "
                             "compile")
        elif backend not in ("inductor", "no"):  # kohya_ss writes "no": nothing compiled, as asked
            notes.append(f"dynamo_backend = '{self.dynamo_backend}' has no effect without torch_compile (as in kohya)")
        return notes


    # --- issue 14 (config): start-up notices and the dialect of the config (set by the loader; not settings) ------
    _notices: list[str] = PrivateAttr(default_factory=list)
    _seed_style: bool = PrivateAttr(False)

    def set_compat(self, *, notices: list[str], sd_scripts_anima: bool) -> None:
        """Called by the loader: the notices of options accepted without effect, and whether the config was
        written for sd-scripts-anima (its meanings apply, e.g. of lr_scheduler_num_cycles)."""
        self._notices = list(notices)
        self._seed_style = sd_scripts_anima

    @property
    def notices(self) -> list[str]:
        """One line per option that is accepted but changes nothing here (printed at start-up, written to the
        run's events)."""
        return self._notices

    @property
    def sd_scripts_anima(self) -> bool:
        """True when the config uses sd-scripts-anima's own names (kohya_options.is_sd_scripts_anima)."""
        return self._seed_style
    # --- issue 14 (outputs) ---
    # file metadata (kohya's train_network.py / library/sai_model_spec.py)
    training_comment: str | None = Field(None, description="free text written as ss_training_comment into the "
                                                           "saved files' metadata")
    no_metadata: bool = Field(False, description="write only kohya's minimum ss_* keys (ss_v2, "
                                                 "ss_base_model_version, ss_network_module/_dim/_alpha/_args) and "
                                                 "the modelspec.* keys, as kohya does")
    metadata_title: str | None = Field(None, description="modelspec.title (default: output_name)")
    metadata_author: str | None = Field(None, description="modelspec.author")
    metadata_description: str | None = Field(None, description="modelspec.description")
    metadata_license: str | None = Field(None, description="modelspec.license")
    metadata_tags: str | None = Field(None, description="modelspec.tags (comma separated)")
    metadata_usage_hint: str | None = Field(None, description="modelspec.usage_hint")
    metadata_thumbnail: str | None = Field(None, description="modelspec.thumbnail: a data: URL, or an image file "
                                                             "(written as a data: URL)")
    metadata_merged_from: str | None = Field(None, description="modelspec.merged_from")
    metadata_trigger_phrase: str | None = Field(None, description="modelspec.trigger_phrase")
    metadata_preprocessor: str | None = Field(None, description="modelspec.preprocessor")
    metadata_is_negative_embedding: str | None = Field(None, description="modelspec.is_negative_embedding")
    # start-up and run bookkeeping
    output_config: bool = Field(False, description="command line only, with --config_file: write the resolved "
                                                   "settings (those not at their default) to the --config_file "
                                                   "path, which must not exist yet, and exit 0 without training "
                                                   "(kohya's --output_config)")
    save_n_epoch_ratio: int | None = Field(None, ge=1, description="save about N epoch files over the run: "
                                           "save_every_n_epochs = max(1, epochs // N) (replaces "
                                           "save_every_n_epochs, as in kohya)")
    initial_epoch: int | None = Field(None, ge=1, description="start counting at this epoch (1 = the first); "
                                      "initial_step wins. Without skip_until_initial_step only the epoch number "
                                      "(and its data order) moves, as in kohya; the LR schedule starts at 0")
    initial_step: int | None = Field(None, ge=0, description="start counting at this optimizer step (0 = the "
                                     "first); with skip_until_initial_step the data batches up to it are skipped "
                                     "and step numbers continue from it; the LR schedule starts at 0, as in kohya")
    skip_until_initial_step: bool = Field(False, description="skip the data up to initial_step / initial_epoch "
                                                             "(same data order as a run that trained them)")
    console_log_file: Path | None = Field(None, description="write the log lines to this file instead of the "
                                                            "console (appended; kohya's option)")
    console_log_simple: bool = Field(False, description="plain log lines: the message only (warnings and errors "
                                                        "keep their level word)")
    tokenizer_cache_dir: Path | None = Field(None, description="folder for downloaded tokenizers when their "
                                             "folders are not set (default: $HF_HOME/anima-trainer/tokenizers, "
                                             "~/.cache/huggingface/...); reused offline")
    strict_captions: bool = Field(False, description="an image without a caption file is an error (default: it "
                                                     "trains with the subset's class_tokens, else an empty caption, "
                                                     "with a warning listing it, as kohya)")

    # --- normalisation (runs also when a TrainConfig is built directly) ----------------------------------------
    @field_validator("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
                     "t5_tokenizer_path", "output_dir", "network_weights", "dataset_config", "logging_dir",
                     "sample_prompts", "log_tracker_config", "tensorboard_logdir", "console_log_file",
                     "tokenizer_cache_dir", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if isinstance(v, str):
            return None if v == "" else Path(v).expanduser()
        return v.expanduser() if isinstance(v, Path) else v

    @field_validator("t5_tokenizer_repo_id", "t5_tokenizer_subfolder", "t5_tokenizer_modelscope_repo_id",
                     "t5_tokenizer_modelscope_revision", "t5_tokenizer_modelscope_subfolder", mode="before")
    @classmethod
    def _t5_source(cls, v: Any, info: Any) -> Any:
        if isinstance(v, str) and not v.strip():  # sd-scripts-anima: an empty value means the default
            return cls.model_fields[info.field_name].default
        if isinstance(v, str) and info.field_name.endswith("repo_id"):
            modelscope = "modelscope" in info.field_name
            ref = parse_source(v, default_provider="modelscope" if modelscope else "hf")
            if modelscope and ref.provider != "modelscope":
                raise ValueError(f"'{v}' is not a ModelScope repo id or modelscope.cn URL")
            return v.strip()
        return v.strip().strip("/") if isinstance(v, str) else v

    @field_validator("loss_spike_ratio", "memory_warn_ratio", mode="before")
    @classmethod
    def _zero_ratio_is_default(cls, v: Any, info: Any) -> Any:
        # sd-scripts-anima (anima_monitor_*_ratio): 0 means "use the default" (its `ratio or default`)
        try:
            zero = not isinstance(v, bool) and float(v) == 0
        except (TypeError, ValueError):
            return v
        return cls.model_fields[info.field_name].default if zero else v

    @field_validator("output_dir")
    @classmethod
    def _output_dir_can_be_a_folder(cls, v: Path) -> Path:
        # checked here, before minutes of model loading; a file in its place failed later with "[Errno 17]"
        for p in (v, *v.parents):
            if p.exists():
                if not p.is_dir():
                    what = "is" if p == v else f"is inside '{p}', which is"
                    raise ValueError(f"'{v}' {what} a file, not a folder; remove that file or choose another "
                                     "output_dir")
                break
        return v

    @field_validator("console_log_level", mode="before")
    @classmethod
    def _level_name(cls, v: Any) -> Any:
        return (v.strip().upper() or None) if isinstance(v, str) else v  # kohya's choices are upper case

    @field_validator("save_n_epoch_ratio", "initial_epoch", "initial_step", mode="before")
    @classmethod
    def _unset_counts(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip() in ("", "None") else v  # kohya's unset, as GUIs write it

    @field_validator("metadata_thumbnail")
    @classmethod
    def _thumbnail(cls, v: str | None) -> str | None:
        # checked here, not at the first save hours later; kohya drops an unreadable thumbnail with a warning
        if v is not None and v and not v.startswith("data:") and not Path(v).expanduser().is_file():
            raise ValueError(f"'{v}' is neither a data: URL nor an image file; give the path of the thumbnail "
                             "image (it is written into the metadata as a data: URL)")
        return v

    @field_validator("log_prefix", "log_tracker_name", "wandb_run_name", "wandb_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("output_name", mode="before")
    @classmethod
    def _output_name(cls, v: Any) -> Any:
        return check_output_name(v) if isinstance(v, str) else v

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, v: Any) -> Any:
        return None if v == "" else (str(v) if isinstance(v, Path) else v)

    @field_validator("validation_seed", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                     mode="before")
    @classmethod
    def _unset_validation(cls, v: Any) -> Any:
        return None if v == "" else v  # "" = kohya's unset, as GUI-written TOMLs say it

    @field_validator("save_model_as", mode="before")
    @classmethod
    def _save_model_as(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("ckpt", "pt"):
            raise ValueError(f"'{v}' is not written by anima-trainer: only safetensors files are written "
                             "(use save_model_as = \"safetensors\")")
        return v.lower() if isinstance(v, str) else v

    @field_validator("save_precision", mode="before")
    @classmethod
    def _save_precision(cls, v: Any) -> Any:
        return "fp32" if v == "float" else (None if v == "" else v)

    @field_validator("attention_backend", mode="before")
    @classmethod
    def _attention_backend(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if v.strip() == "":
            raise PydanticUseDefault()
        from anima_trainer.models.attention_backend import check_backend_name  # says why xformers is not one

        return check_backend_name(v)

    @field_validator("compile_mode", "compile_backend", "compile_cache_size_limit", mode="before")
    @classmethod
    def _compile_options(cls, v: Any, info: Any) -> Any:
        if isinstance(v, str) and v.strip() in ("", "None"):
            raise PydanticUseDefault()  # kohya's unset (its default None), as GUI-written TOMLs say it
        if info.field_name == "compile_mode" and isinstance(v, str):
            from anima_trainer.models.compile import check_compile_mode  # explains the CUDA-graph modes

            return check_compile_mode(v)
        return v

    @field_validator("network_module", mode="before")
    @classmethod
    def _network_module(cls, v: Any) -> Any:
        if isinstance(v, str) and v in SD_SCRIPTS_ANIMA_MODULES:
            return SD_SCRIPTS_ANIMA_MODULES[v]
        if isinstance(v, str) and v in ko.NETWORK_MODULE_ALGOS:
            return ko.NETWORK_MODULE_ALGOS[v]  # "lycoris" is resolved with network_args algo after validation
        accepted = ", ".join(ko.ACCEPTED_NETWORK_MODULES)
        raise ValueError(f"unknown network module {v!r}; accepted: {accepted}")

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _optimizer_type(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        from anima_trainer.train import optim  # imports torch; lazily, so config stays importable alone

        name = optim.canonical_optimizer_name(v)
        optim.resolve_optimizer(name)  # the package must be installed (error names `pip install ...`)
        return name

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _lr_scheduler(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ko.KOHYA_SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r}{did_you_mean(v, ko.KOHYA_SCHEDULERS)}; "
                             f"accepted: {', '.join(ko.KOHYA_SCHEDULERS)}")
        return v

    @field_validator("lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_min_lr_ratio",
                     "lr_scheduler_timescale", "lr_scheduler_type", mode="before")
    @classmethod
    def _scheduler_number(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip() in ("", "None"):
            raise PydanticUseDefault()  # "" = kohya's unset, as GUI-written TOMLs say it
        if isinstance(v, str) and v.strip().endswith("%"):  # kohya's int_or_float: "50%" → 0.5
            try:
                return float(v.strip()[:-1]) / 100
            except ValueError:
                raise ValueError(f"expected a number, got {v!r}") from None
        return v

    @field_validator("lr_warmup_steps", "lr_decay_steps", mode="before")
    @classmethod
    def _lr_warmup_steps(cls, v: Any) -> Any:
        # kohya's int_or_float: "100" → 100, "0.1" → 0.1, "10%" → 0.1; a float < 1 is a fraction of all steps
        if isinstance(v, str):
            s = v.strip()
            try:
                v = float(s[:-1]) / 100 if s.endswith("%") else (int(s) if s.lstrip("+-").isdigit() else float(s))
            except ValueError:
                raise ValueError(f"expected an integer or a fraction < 1, got {s!r}") from None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"expected an integer or a fraction < 1, got {v!r}")  # noqa: TRY004 (pydantic)
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError(f"a float must be a fraction < 1 of all steps, got {v}")
            v = int(v)
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("network_args", mode="before")
    @classmethod
    def _network_args(cls, v: Any) -> Any:
        return _kv_pairs(v, "network_args", literal=False)

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _optimizer_args(cls, v: Any) -> Any:
        args = _kv_pairs(v, "optimizer_args", literal=True)
        if isinstance(args, dict) and "lr" in args:
            raise ValueError("'lr' cannot be set here; use learning_rate")
        return args  # the keys are checked against the optimizer in config/optimizer_rules.py

    @field_validator("lr_scheduler_args", mode="before")
    @classmethod
    def _lr_scheduler_args(cls, v: Any) -> Any:
        return {} if v == "" else _kv_pairs(v, "lr_scheduler_args", literal=True)

    @field_validator("scale_weight_norms", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr", "llm_adapter_lr",
                     "base_weights", "base_weights_multiplier", mode="before")
    @classmethod
    def _issue14_nets_unset(cls, v: Any, info: Any) -> Any:
        if v == "" or v == []:
            return None  # kohya's unset, as GUI-written TOMLs say it
        if info.field_name == "base_weights" and isinstance(v, (str, Path)):
            v = [v]  # kohya's nargs="*": one file may come as a plain string
        if info.field_name == "base_weights_multiplier" and isinstance(v, (int, float, str)):
            v = [v]
        if info.field_name == "base_weights":
            paths = [Path(x).expanduser() if isinstance(x, str) else x for x in v]
            for p in paths:
                if isinstance(p, Path) and not p.is_file():
                    raise ValueError(f"'{p}' does not exist (a network .safetensors to merge before training)")
            return paths
        return v

    @model_validator(mode="after")
    def _issue14_full_precision(self) -> TrainConfig:
        # kohya asserts the same pairs (train_network.py: "full_fp16 requires mixed precision='fp16'")
        if self.full_fp16 and self.full_bf16:
            raise ValueError("full_fp16 and full_bf16 are both set; keep the one matching mixed_precision")
        for flag, mp in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
            if getattr(self, flag) and self.mixed_precision != mp:
                raise ValueError(f"{flag} requires mixed_precision = \"{mp}\" (kohya asserts the same; got "
                                 f"\"{self.mixed_precision}\"): set mixed_precision = \"{mp}\" or remove {flag}")
        return self
    @model_validator(mode="before")
    @classmethod
    def _lokr_anima_asks_for_defaults(cls, data: Any) -> Any:
        # sd-scripts-anima's own LoKr module name is a sd-scripts-anima config (the loader detects the other names)
        if (isinstance(data, dict) and data.get("network_module") == "networks.lokr_anima"
                and data.get("sd_scripts_anima_defaults") is None):
            data = {**data, "sd_scripts_anima_defaults": True}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        self._sd_scripts_anima()
        check_optimizer_schedule(self)
        self._check_memory_options()
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise ValueError("lr_warmup_steps: the 'constant' scheduler has no warm-up; use lr_scheduler = "
                             "\"constant_with_warmup\" or lr_warmup_steps = 0")
        if self.dim_from_weights and self.network_weights is None:
            raise ValueError("dim_from_weights: needs network_weights")
        # LyCORIS/kohya convention: the algorithm may be named in network_args (algo=lokr); it must agree
        algo = self.network_args.get("algo")
        if self.network_module == "lycoris":
            if algo is None or algo.strip().lower() not in ko.LYCORIS_ALGOS:
                raise ValueError(f"network_module: 'lycoris.kohya' needs network_args algo=lokr or algo=loha "
                                 f"(got {algo!r}); for LoRA use networks.lora_anima")
            self.network_module = algo.strip().lower()
        elif algo is not None and algo.strip().lower() != self.network_module:
            raise ValueError(f"network_args: algo={algo} does not match network_module ({self.network_module})")
        self.network_args = {k: v for k, v in self.network_args.items() if k != "algo"}
        if self.log_with in ("tensorboard", "all") and self.logging_dir is None:
            raise ValueError(f"log_with: '{self.log_with}' needs logging_dir")
        if self.nonfinite_loss_policy is None:  # sd-scripts-anima's policy=raise also aborts on a non-finite loss
            self.nonfinite_loss_policy = "raise" if self.monitor_alert_policy == "raise" else "skip_step"
        return self

    @field_validator("checkpoint_blocks", "blocks_to_swap", mode="before")
    @classmethod
    def _unset_memory_counts(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip() in ("", "None")):
            raise PydanticUseDefault()  # kohya's unset (None; blocks_to_swap None = no swap)
        return v

    def _sd_scripts_anima(self) -> None:
        """sd-scripts-anima's network_args names, its defaults (sd_scripts_anima_defaults), the train_norm flag and
        anima_seq_len; what was done is kept for the start-up report (`sd_scripts_anima_notices`)."""
        notices: list[str] = []
        args = dict(self.network_args)
        algo = self.network_module
        if algo == "lycoris":
            algo = str(args.get("algo", "")).strip().lower()
        for theirs, ours in SD_SCRIPTS_ANIMA_NETWORK_ARGS.items():
            if theirs not in args:
                continue
            v = str(args.pop(theirs)).strip()
            if algo != "lokr":
                notices.append(f"network_args {theirs}={v} ignored: the network is {algo or self.network_module}, not "
                               "LoKr (sd-scripts-anima's LoRA ignores it too)")
                continue
            v = v or SD_SCRIPTS_ANIMA_EMPTY.get(theirs, v)  # its `int(v or 8)` / `float(v or 0)`
            if theirs == "lokr_factor" and v == "-1":
                notices.append("network_args lokr_factor=-1: the most balanced factorisation, as in LyCORIS "
                               "(sd-scripts-anima clamped it to 1: a 1×1 lokr_w1 and the whole matrix in lokr_w2)")
            if ours in args and str(args[ours]).strip() != v:
                raise ValueError(f"network_args: {theirs}={v} (sd-scripts-anima's name) and {ours}={args[ours]} "
                                 "disagree; keep one of them")
            args[ours] = v
        explicit = self.model_fields_set
        if self.sd_scripts_anima_defaults:
            applied = []
            if not self.gradient_checkpointing:  # sd-scripts-anima forces it on (its default config OOMs without)
                was_off = "gradient_checkpointing" in explicit
                self.gradient_checkpointing = True
                applied.append("gradient_checkpointing = true" + (
                    " (the config's false is overridden as sd-scripts-anima does; same result, less memory; "
                    "sd_scripts_anima_defaults = false keeps it off)" if was_off else ""))
            if self.train_norm is None and "train_norm" not in args:
                self.train_norm = True
                applied.append("train_norm = true")
            elif self.train_norm is None:
                notices.append(f"network_args train_norm={args['train_norm']} is used as written (sd-scripts-anima "
                               "would have replaced it by its --train_norm default, true; set train_norm to choose)")
            if not {"target_modules", "train_llm_adapter"} & set(args):
                args["train_llm_adapter"] = "true"
                applied.append("LLM-adapter targets (network_args train_llm_adapter = true)")
            if algo == "lokr" and "factor" not in args:
                args["factor"] = str(SD_SCRIPTS_ANIMA_LOKR_FACTOR)
                applied.append(f"LoKr factor {SD_SCRIPTS_ANIMA_LOKR_FACTOR}")
            for k, v in ko.SD_SCRIPTS_ANIMA_TIMESTEP_DEFAULTS.items():
                if k not in explicit:
                    setattr(self, k, v)
                    applied.append(f"{k} = {v}")
            if self.resume_ignore_optimizer_mismatch is None:
                self.resume_ignore_optimizer_mismatch = True
                applied.append("resume_ignore_optimizer_mismatch = true")
            notices.insert(0, "sd-scripts-anima defaults (the config uses sd-scripts-anima's names): "
                              + (", ".join(applied) if applied else "none needed, the config sets all of them"))
        if self.train_norm is not None:
            if "train_norm" in args and "train_norm" in explicit:
                from anima_trainer.networks.inject import parse_bool  # no torch import: inject needs only nn
                from anima_trainer.networks.formats import NetworkError

                try:
                    old = parse_bool("train_norm", args["train_norm"])
                except NetworkError as e:
                    raise ValueError(str(e)) from None
                if old != self.train_norm:
                    notices.append(f"train_norm = {str(self.train_norm).lower()} wins over network_args "
                                   f"train_norm={args['train_norm']} (as in sd-scripts-anima: the flag wins)")
            args["train_norm"] = "true" if self.train_norm else "false"
        if self.anima_seq_len is not None:
            n = self.anima_seq_len
            notices.append(
                f"anima_seq_len = {n}: the text context is always padded to 512 rows and captions are not cut at {n} "
                "tokens, because ComfyUI runs Anima that way; "
                + ("a shorter context (as sd-scripts-anima trains it) would train a model ComfyUI does not run"
                   if n < 512 else "nothing to change"))
        self.network_args = args
        self._sd_notices = _Notices(notices)

    def sd_scripts_anima_notices(self) -> list[str]:
        """The start-up notices of sd-scripts-anima's options: the defaults applied (one line listing them),
        network_args names ignored, the train_norm flag overriding network_args, anima_seq_len."""
        return list(self._sd_notices)

    def optimizer_mismatch_ignored(self) -> bool:
        """Whether a resume continues with a fresh optimizer state when the optimizer changed or its state does
        not fit (resume_ignore_optimizer_mismatch; by default what resume_snapshot_strict = false allows)."""
        if self.resume_ignore_optimizer_mismatch is not None:
            return self.resume_ignore_optimizer_mismatch
        return not self.resume_snapshot_strict

    def _check_memory_options(self) -> None:
        """Options that only act together with another one; fp8 storage and DoRA (models/memory.py)."""
        if not self.gradient_checkpointing:
            needs = [k for k in ("cpu_offload_checkpointing", "unsloth_offload_checkpointing") if getattr(self, k)]
            needs += ["checkpoint_blocks"] if self.checkpoint_blocks is not None else []
            needs += ["checkpoint_mode"] if self.checkpoint_mode != "full" else []
            if needs:
                raise ValueError(f"{', '.join(needs)}: needs gradient_checkpointing = true")
        if self.checkpoint_mode == "selective" and self.compile_blocks:
            # measured on an H200 (torch 2.11): torch raises "Tensor cached during selective activation checkpoint
            # has been mutated" in the first backward of a compiled block
            raise ValueError("checkpoint_mode: 'selective' does not work with compile_blocks (torch fails in the "
                             "backward); use checkpoint_mode = \"full\" with compile_blocks (faster anyway: "
                             "bench/README.md), or turn compile_blocks off")
        fp8 = self.fp8_base or self.fp8_base_unet
        if self.fp8_scaled and not fp8:
            raise ValueError("fp8_scaled: needs fp8_base (fp8 storage is always scaled in anima-trainer)")
        if fp8 and str(self.network_args.get("dora_wd", "false")).strip().lower() in ("true", "1", "yes", "on"):
            raise ValueError("fp8_base: DoRA (network_args dora_wd) needs the full-precision base weights; turn one "
                             "of them off")

    def memory_options(self) -> dict[str, Any]:
        """Keyword arguments of models.memory.setup_memory / estimate_training_memory for this config."""
        return {"gradient_checkpointing": self.gradient_checkpointing, "checkpoint_blocks": self.checkpoint_blocks,
                "checkpoint_mode": self.checkpoint_mode,
                "cpu_offload_checkpointing": self.cpu_offload_checkpointing or self.unsloth_offload_checkpointing,
                "blocks_to_swap": self.blocks_to_swap, "fp8_base": self.fp8_base or self.fp8_base_unet,
                "fp8_format": self.fp8_format}

    # --- metadata ----------------------------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        """Training settings as kohya-style `ss_*` strings for the LoRA file header (None → "None")."""
        from anima_trainer.train.optim import optimizer_description

        meta: dict[str, Any] = {
            "ss_base_model_version": "anima",
            "ss_output_name": self.output_name,
            "ss_network_module": ko.KOHYA_NETWORK_MODULE_NAME[self.network_module],
            "ss_network_dim": self.network_dim,
            "ss_network_alpha": self.network_alpha,
            "ss_network_dropout": self.network_dropout,
            "ss_network_args": json.dumps(self.network_args),
            "ss_learning_rate": self.learning_rate,
            "ss_unet_lr": self.unet_lr,
            "ss_optimizer": optimizer_description(self.optimizer_type, self.optimizer_args),
            "ss_lr_scheduler": self.lr_scheduler,
            "ss_lr_warmup_steps": self.lr_warmup_steps,
            "ss_max_grad_norm": self.max_grad_norm,
            "ss_max_train_steps": self.max_train_steps,
            "ss_max_train_epochs": self.max_train_epochs,
            "ss_batch_size_per_device": self.train_batch_size,
            "ss_gradient_accumulation_steps": self.gradient_accumulation_steps,
            "ss_gradient_checkpointing": self.gradient_checkpointing,
            "ss_mixed_precision": self.mixed_precision,
            "ss_seed": self.seed,
            "ss_timestep_sampling": self.timestep_sampling,
            "ss_discrete_flow_shift": self.discrete_flow_shift,
            "ss_sigmoid_scale": self.sigmoid_scale,
            "ss_weighting_scheme": self.weighting_scheme,
            "ss_logit_mean": self.logit_mean,
            "ss_logit_std": self.logit_std,
            "ss_mode_scale": self.mode_scale,
            "ss_loss_type": self.loss_type,
            "ss_huber_c": self.huber_c,
            "ss_validation_split": self.validation_split,
            "ss_validation_seed": self.validation_seed,
            "ss_validate_every_n_steps": self.validate_every_n_steps,
            "ss_validate_every_n_epochs": self.validate_every_n_epochs,
            "ss_max_validation_steps": self.max_validation_steps,
            "ss_scale_weight_norms": self.scale_weight_norms,
            "ss_full_fp16": bool(self.full_fp16),
            "ss_training_comment": self.training_comment,
        }
        return {k: str(v) for k, v in meta.items()}

    def modelspec_metadata(self, timestamp: float) -> dict[str, str]:
        """kohya's `modelspec.*` keys (ModelSpec 1.0.1, library/sai_model_spec.py) for an Anima LoRA: the fixed
        architecture/implementation/resolution, the title (metadata_title, else output_name), the date of
        `timestamp`, and every metadata_* option that is set.  Written also with no_metadata, as in kohya."""
        import datetime

        meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "anima-preview/lora",
                "modelspec.implementation": "https://huggingface.co/circlestone-labs/Anima",
                "modelspec.title": self.metadata_title if self.metadata_title is not None else self.output_name,
                "modelspec.resolution": "1024x1024",
                "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat()}
        for name in ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                     "trigger_phrase", "preprocessor", "is_negative_embedding"):
            value = getattr(self, f"metadata_{name}")
            if value is None:
                continue
            if name == "thumbnail" and value and not value.startswith("data:"):
                value = _data_url(Path(value).expanduser())
            meta[f"modelspec.{name}"] = value
        return meta


# File names are limited to 255 bytes (ext4, XFS, btrfs, APFS, NTFS).  The longest name derived from
# output_name is a preview's temporary file, `.<name>_e<epoch>_<NN>_<seed>.png.<8 random>.tmp` (up to ~55 bytes
# more); the others are `<name>-step<NNNNNNNN>.safetensors` and its `.….tmp`, `.<name>-step<NNNNNNNN>-state.tmp-
# <pid>`, `<name>.events.jsonl`, `.<name>.lock`, `<name>.dataset_report.txt`, `<name>_config/`, the TensorBoard
# run folder `<name>_<timestamp>`.  75 bytes are kept free for them (tests/badinput/test_hardening_limits.py
# checks the real names).
FILE_NAME_MAX_BYTES = 255
OUTPUT_NAME_MAX_BYTES = FILE_NAME_MAX_BYTES - 75


def _data_url(path: Path) -> str:
    """An image file as a `data:<mime>;base64,...` URL (kohya's thumbnail conversion)."""
    import base64
    import mimetypes

    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


# kohya's SS_METADATA_MINIMUM_KEYS: what no_metadata keeps of the ss_* keys (the modelspec.* keys stay too)
MINIMUM_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                         "ss_network_alpha", "ss_network_args")


def _shorten(v: str, keep: int = 40) -> str:
    return repr(v) if len(v) <= keep else f"{v[:keep]!r}… ({len(v)} characters)"


def check_output_name(name: str) -> str:
    """`name` when it is a plain file name stem that every derived file name can use; else ValueError.

    Why: output_name is joined to output_dir, so a path in it ("../../x", "/abs") would write outside
    output_dir, and a long one trains for hours and then fails at the first save ("File name too long")."""
    fix = "use a plain file name such as \"my_lora\" (output_dir chooses the folder)"
    bad = None
    if not name.strip():
        bad = "is empty"
    elif "/" in name or "\\" in name:
        bad = "contains a path separator (/ or \\)"
    elif ".." in name or name == ".":
        bad = "contains '..' (or is '.')"
    elif Path(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        bad = "is an absolute path"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        bad = "contains a control character"
    else:
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > OUTPUT_NAME_MAX_BYTES:
            bad = (f"is {size} bytes long (UTF-8); at most {OUTPUT_NAME_MAX_BYTES} bytes fit, since the names derived "
                   f"from it (`.<name>_e000001_00_<seed>.png.<tmp>`, `<name>-step00000100.safetensors`, ...) must "
                   f"stay within the {FILE_NAME_MAX_BYTES}-byte file name limit")
            fix = "use a shorter name"
    if bad:
        raise ValueError(f"{_shorten(name)} {bad}; {fix}")
    return name


def _kv_pairs(v: Any, key: str, literal: bool) -> Any:
    """["a=1", "b=x"] → {"a": "1", "b": "x"} (split at the first '='); with `literal`, values go through
    `ast.literal_eval` when they are Python literals (kohya's optimizer_args), else stay strings."""
    if isinstance(v, dict) or v is None:
        return {} if v is None else v
    if isinstance(v, str):
        v = v.split()
    if not isinstance(v, list | tuple):
        raise ValueError(f"expected a list of 'key=value' strings, got {v!r}")  # noqa: TRY004 (pydantic)
    out: dict[str, Any] = {}
    for item in v:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"item {item!r} is not of the form key=value")
        k, val = (s.strip() for s in item.split("=", 1))
        if k in out:
            raise ValueError(f"key {k!r} is given twice")
        if literal:
            try:
                val = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                pass
        out[k] = val
    return out


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "path": "a path",
    "dict": "a table", "list": "a list",
}


def _error_line(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    typ, ctx, inp = err["type"], err.get("ctx") or {}, err.get("input")
    if typ == "missing" or (inp is None and typ.endswith("_type")):
        return f"{loc}: required (set --{loc} or {loc} in the --config_file TOML)"
    if typ == "extra_forbidden":
        return f"{loc}: unknown setting"
    if typ == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return msg if not err["loc"] or msg.startswith(f"{loc}:") else f"{loc}: {msg}"
    if typ == "literal_error":
        return f"{loc}: expected one of {ctx.get('expected')}, got {inp!r}"
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        bound = next(iter(ctx.values()))
        return f"{loc}: must be {op} {bound}, got {inp!r}"
    if typ == "int_from_float":
        return f"{loc}: expected an integer, got {inp!r}"
    if typ == "finite_number":
        return f"{loc}: expected a finite number, got {inp!r}"
    for word, text in _TYPE_WORDS.items():
        if typ.startswith(word + "_"):
            return f"{loc}: expected {text}, got {inp!r}"
    return f"{loc}: {err['msg']}"


def make_train_config(values: dict[str, Any]) -> TrainConfig:
    """Validate `values` (canonical names) into a TrainConfig; any problem → ConfigError naming the keys."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        # a union (e.g. `int | None`) reports one error per member: keep the first per field
        seen: dict[str, str] = {}
        for err in e.errors():
            seen.setdefault(".".join(str(p) for p in err["loc"][:1]), _error_line(err))
        raise ConfigError("\n".join(seen.values())) from None
