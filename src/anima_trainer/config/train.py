"""`TrainConfig`: every training setting, with kohya's names and (where kohya has one) kohya's defaults.

Values are type-checked by pydantic; `anima_trainer.config.loader.parse_train_args` builds one from the command
line and a `--config_file` TOML.  Paths are kept as given (only `~` is expanded): a relative path, also one from
a TOML, is relative to the current working directory, as in kohya.  An empty string for a path means "not set".
"""

from __future__ import annotations

import ast
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

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.errors import ConfigError, did_you_mean
from anima_trainer.config.network_settings import NetworkSettings
from anima_trainer.config.noise_settings import NoiseSettings
from anima_trainer.config.optimizer_rules import check_optimizer_schedule, optimizer_name
from anima_trainer.config.output_settings import (
    MINIMUM_METADATA_KEYS,
    OutputSettings,
    _data_url,
)
from anima_trainer.config.rules import check_backend_name, check_compile_mode
from anima_trainer.config.sd_scripts_anima import (
    SD_SCRIPTS_ANIMA_EMPTY,
    SD_SCRIPTS_ANIMA_LOKR_FACTOR,
    SD_SCRIPTS_ANIMA_MODULES,
    SD_SCRIPTS_ANIMA_NETWORK_ARGS,
    SdScriptsAnimaSettings,
    _Notices,
)
from anima_trainer.config.source_urls import parse_source
from anima_trainer.config.text_encoder_settings import TextEncoderSettings
from anima_trainer.config.unset import drop_unset
from anima_trainer.config.vae_settings import VaeSettings

_NONNEG = {"ge": 0}
_log = logging.getLogger(__name__)
# re-exported: importable from here as before the option groups moved to their own modules
__all__ = ["FILE_NAME_MAX_BYTES", "MINIMUM_METADATA_KEYS", "OUTPUT_NAME_MAX_BYTES", "SD_SCRIPTS_ANIMA_EMPTY",
           "SD_SCRIPTS_ANIMA_LOKR_FACTOR", "SD_SCRIPTS_ANIMA_MODULES", "SD_SCRIPTS_ANIMA_NETWORK_ARGS", "TrainConfig",
           "check_output_name", "make_train_config", "_Notices", "_data_url"]


class TrainConfig(NetworkSettings, TextEncoderSettings, VaeSettings, NoiseSettings, SdScriptsAnimaSettings,
                  OutputSettings, BaseModel):
    """Every training setting.  The option groups of kohya's later versions and of sd-scripts-anima are mixins
    with their fields, validators and methods (network_settings, text_encoder_settings, noise_settings,
    sd_scripts_anima, vae_settings, output_settings); the cross-field check below runs after their model validators."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=False)
    # where the settings came from (config/loader.py ConfigOrigin, set by parse_train_args; None otherwise): errors
    # found after validation, at the run's start-up, name the user's file and line as parse-time errors do
    _origin: Any = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _kohya_unset(cls, data: Any) -> Any:
        return drop_unset(data)  # "" (and per option "None", []) = not given: config/unset.py

    # models
    pretrained_model_name_or_path: Path = Field(description="Anima DiT .safetensors, or a diffusers-layout Anima "
                                                               "folder (its root or transformer/)")
    qwen3: Path = Field(description="Qwen3-0.6B .safetensors, Hugging Face folder, or a diffusers-layout "
                                     "Anima folder (its root or text_encoder/)")
    vae: Path = Field(description="Qwen-Image VAE .safetensors, or a diffusers-layout Anima folder (its root or "
                                   "vae/)")
    llm_adapter_path: Path | None = Field(None, description="separate LLM-adapter weights: a file or a "
                                                              "text_conditioner/ folder (else taken from the DiT)")
    qwen3_tokenizer_path: Path | None = Field(None, description="Qwen tokenizer folder (when --qwen3 is one file)")
    t5_tokenizer_path: Path | None = Field(None, description="T5 tokenizer folder")
    # tokenizer download at start-up (sd-scripts-anima's flags; tools/download/startup.py)
    auto_download_t5_tokenizer: bool = Field(True, description="download missing T5 (and Qwen) tokenizer files "
                                                               "into their folders at start-up")
    # the defaults are tools/download/sources.py's T5_TOKENIZER entry (tests/config/test_train_config.py compares them)
    t5_tokenizer_repo_id: str = Field("google/t5-v1_1-base", description="T5 tokenizer source: HF repo id, "
                                      "huggingface.co or modelscope.cn URL")
    t5_tokenizer_subfolder: str = Field("tokenizer", description="subfolder tried first (then the repo root)")
    t5_tokenizer_modelscope_fallback: bool = Field(True, description="try ModelScope when Hugging Face fails")
    t5_tokenizer_modelscope_repo_id: str = Field("nv-community/Cosmos-Predict2-2B-Text2Image",
                                                 description="ModelScope fallback repo id or URL")
    t5_tokenizer_modelscope_revision: str = Field("master", description="ModelScope revision")
    t5_tokenizer_modelscope_subfolder: str = Field("tokenizer", description="ModelScope subfolder")
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
    save_every_n_steps: int | None = Field(None, ge=1, description="save an intermediate network file every N "
        "optimizer steps")
    save_every_n_epochs: int | None = Field(None, ge=1, description="save an intermediate network file every N epochs")
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
                          "piecewise_constant", "adafactor"] = Field(
        "constant", description="learning-rate schedule (docs/training.md, Learning-rate schedules)")
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
    max_train_steps: int = Field(1600, ge=1, le=100_000_000, description="optimizer steps to train (unless "
        "max_train_epochs is set)")
    max_train_epochs: int | None = Field(None, ge=1, le=1_000_000, description="overrides max_train_steps")
    train_batch_size: int = Field(1, ge=1, description="images per batch, for datasets whose dataset.toml sets no "
        "batch_size")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="dtype of the frozen models and the "
        "compute (no = fp32); adapters stay fp32")
    seed: int | None = Field(None, ge=0, lt=2**32, description="seed of data order, noise and σ (unset: 42)")
    gradient_checkpointing: bool = Field(False, description="recompute each DiT block in backward: much less "
        "activation memory, slower")
    # memory levers (models/block_runner.py, models/fp8.py, docs/performance.md); all give the same gradients as without
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
    max_data_loader_n_workers: int = Field(8, ge=0, description="image-decoding worker processes (0 = in the training "
        "process)")
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
    timestep_sampling: Literal["sigmoid", "uniform", "sigma", "shift", "flux_shift"] = Field(
        "sigmoid", description="how σ is drawn (sigmoid = logit-normal; shift = logit-normal then shifted)")
    discrete_flow_shift: float = Field(1.0, gt=0, description="shift s of σ ← s·σ / (1 + (s−1)·σ), for shift / "
                                       "sigma sampling")
    sigmoid_scale: float = Field(1.0, gt=0, description="scale of the normal before the sigmoid (sigmoid / shift / "
        "flux_shift)")
    weighting_scheme: Literal["uniform", "logit_normal", "sigma_sqrt", "cosmap", "mode", "none"] = Field(
        "uniform", description="loss weight over σ (sigma_sqrt, cosmap) or σ density for sigma sampling")
    logit_mean: float = Field(0.0, description="mean of the logit-normal weighting_scheme")
    logit_std: float = Field(1.0, gt=0, description="standard deviation of the logit-normal weighting_scheme")
    mode_scale: float = Field(1.29, description="scale of the mode weighting_scheme")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field("l2", description="per-element loss: l2 (MSE), l1, "
        "huber, smooth_l1")
    huber_c: float = Field(0.1, gt=0, description="threshold of the huber / smooth_l1 loss")
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
    tensorboard_host: str = Field("127.0.0.1", min_length=1, description="address the TensorBoard server binds to")
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
    sample_every_n_steps: int | None = Field(None, ge=1, description="preview images every N optimizer steps (needs "
        "sample_prompts)")
    sample_every_n_epochs: int | None = Field(None, ge=1, description="preview images every N epochs (needs "
        "sample_prompts)")
    sample_prompts: Path | None = Field(None, description="kohya prompt file (.txt with --n --w --h --d --s --l "
                                        "--fs, .toml or .json), checked whole at start-up; sizes at most 4096 px")
    sample_at_first: bool = Field(False, description="also sample before the first step")
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
    cache_latents: bool = Field(False, description="encode every image once before training and keep the latents in "
        "RAM")
    cache_latents_to_disk: bool = Field(False, description="the latent cache as safetensors files beside the images "
        "(reused across runs)")
    cache_text_encoder_outputs: bool = Field(False, description="encode every caption once and keep the Qwen3 states "
        "in RAM")
    cache_text_encoder_outputs_to_disk: bool = Field(False, description="the text cache on disk")
    vae_batch_size: int = Field(1, ge=1, description="images per VAE call while caching latents")
    text_encoder_batch_size: int | None = Field(None, ge=1, description="captions per Qwen3 call while caching "
        "(default 8)")
    caption_variants: int = Field(8, ge=1, le=1024, description="random captions + text cache: processed variants "
        "encoded per caption")
    prior_loss_weight: float = Field(1.0, ge=0, description="loss weight of regularisation (is_reg) images")
    cache_llm_adapter_outputs: bool = Field(False, description="frozen LLM adapter: its output per caption computed "
        "once (RAM)")

    # --- normalisation (runs also when a TrainConfig is built directly) ----------------------------------------
    @field_validator("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
                     "t5_tokenizer_path", "output_dir", "network_weights", "dataset_config", "logging_dir",
                     "sample_prompts", "log_tracker_config", "tensorboard_logdir", "console_log_file",
                     "tokenizer_cache_dir", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if isinstance(v, str):
            return Path(v).expanduser()
        return v.expanduser() if isinstance(v, Path) else v

    @field_validator("t5_tokenizer_repo_id", "t5_tokenizer_subfolder", "t5_tokenizer_modelscope_repo_id",
                     "t5_tokenizer_modelscope_revision", "t5_tokenizer_modelscope_subfolder", mode="before")
    @classmethod
    def _t5_source(cls, v: Any, info: Any) -> Any:
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


    @field_validator("output_name", mode="before")
    @classmethod
    def _output_name(cls, v: Any) -> Any:
        return check_output_name(v) if isinstance(v, str) else v

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

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
        return "fp32" if v == "float" else v

    @field_validator("attention_backend", mode="before")
    @classmethod
    def _attention_backend(cls, v: Any) -> Any:
        return check_backend_name(v) if isinstance(v, str) else v  # says why xformers is not one

    @field_validator("compile_mode", mode="before")
    @classmethod
    def _compile_mode(cls, v: Any) -> Any:
        return check_compile_mode(v) if isinstance(v, str) else v  # explains the CUDA-graph modes

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
        # kohya's spelling of its names; the class is resolved at start-up (train/optim.py check_optimization)
        return optimizer_name(v) if isinstance(v, str) else v

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
        return args  # the keys are checked against the optimizer at start-up (train/optim.py)

    @field_validator("lr_scheduler_args", mode="before")
    @classmethod
    def _lr_scheduler_args(cls, v: Any) -> Any:
        return _kv_pairs(v, "lr_scheduler_args", literal=True)

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        self._sd_scripts_anima()
        self._check_text_encoder()  # after sd-scripts-anima's defaults (its DiT-only default)
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
        self._check_save_format()
        if self.log_with in ("tensorboard", "all") and self.logging_dir is None:
            raise ValueError(f"log_with: '{self.log_with}' needs logging_dir")
        if self.nonfinite_loss_policy is None:  # sd-scripts-anima's policy=raise also aborts on a non-finite loss
            self.nonfinite_loss_policy = "raise" if self.monitor_alert_policy == "raise" else "skip_step"
        return self

    def optimizer_mismatch_ignored(self) -> bool:
        """Whether a resume continues with a fresh optimizer state when the optimizer changed or its state does
        not fit (resume_ignore_optimizer_mismatch; by default what resume_snapshot_strict = false allows)."""
        if self.resume_ignore_optimizer_mismatch is not None:
            return self.resume_ignore_optimizer_mismatch
        return not self.resume_snapshot_strict

    def _check_memory_options(self) -> None:
        """Options that only act together with another one; fp8 storage and DoRA (models/fp8.py)."""
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
        """Keyword arguments of models.block_runner.setup_memory / train.memory_estimate.estimate_training_memory."""
        return {"gradient_checkpointing": self.gradient_checkpointing, "checkpoint_blocks": self.checkpoint_blocks,
                "checkpoint_mode": self.checkpoint_mode,
                "cpu_offload_checkpointing": self.cpu_offload_checkpointing or self.unsloth_offload_checkpointing,
                "blocks_to_swap": self.blocks_to_swap, "fp8_base": self.fp8_base or self.fp8_base_unet,
                "fp8_format": self.fp8_format}


# File names are limited to 255 bytes (ext4, XFS, btrfs, APFS, NTFS).  The longest name derived from
# output_name is a preview's temporary file, `.<name>_e<epoch>_<NN>_<seed>.png.<8 random>.tmp` (up to ~55 bytes
# more); the others are `<name>-step<NNNNNNNN>.safetensors` and its `.….tmp`, `.<name>-step<NNNNNNNN>-state.tmp-
# <pid>`, `<name>.events.jsonl`, `.<name>.lock`, `<name>.dataset_report.txt`, `<name>_config/`, the TensorBoard
# run folder `<name>_<timestamp>`.  75 bytes are kept free for them (tests/badinput/test_hardening_limits.py
# checks the real names).
FILE_NAME_MAX_BYTES = 255
OUTPUT_NAME_MAX_BYTES = FILE_NAME_MAX_BYTES - 75




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
