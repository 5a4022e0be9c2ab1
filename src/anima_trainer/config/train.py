"""`TrainConfig`: every training setting, with kohya's names and (where kohya has one) kohya's defaults.

Values are type-checked by pydantic; `anima_trainer.config.loader.parse_train_args` builds one from the command
line and a `--config_file` TOML.  Paths are kept as given (only `~` is expanded): a relative path, also one from
a TOML, is relative to the current working directory, as in kohya.  An empty string for a path means "not set".
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.errors import ConfigError, did_you_mean

_NONNEG = {"ge": 0}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=False)

    # models
    pretrained_model_name_or_path: Path = Field(description="Anima DiT .safetensors")
    qwen3: Path = Field(description="Qwen3-0.6B .safetensors or Hugging Face folder")
    vae: Path = Field(description="Qwen-Image VAE .safetensors")
    llm_adapter_path: Path | None = Field(None, description="separate LLM-adapter weights (else taken from the DiT)")
    qwen3_tokenizer_path: Path | None = Field(None, description="Qwen tokenizer folder (when --qwen3 is one file)")
    t5_tokenizer_path: Path | None = Field(None, description="T5 tokenizer folder")
    # output
    output_dir: Path = Field(description="folder for the saved LoRA files")
    output_name: str = Field("last", min_length=1, description="file name stem (default: last)")
    save_model_as: Literal["safetensors"] = Field("safetensors", description="only safetensors is written")
    save_precision: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="dtype of saved weights (fp32/float, fp16, bf16; default: as trained)")
    save_every_n_steps: int | None = Field(None, ge=1)
    save_every_n_epochs: int | None = Field(None, ge=1)
    save_last_n_steps: int | None = Field(None, ge=1, description="keep step saves of the last N steps only")
    save_last_n_epochs: int | None = Field(None, ge=1, description="keep the last N epoch saves only")
    overwrite: bool = Field(False, description="replace existing output files (anima-trainer option)")
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
    learning_rate: float = Field(2e-6, gt=0, description="base learning rate (kohya default 2e-6)")
    unet_lr: float | None = Field(None, gt=0, description="learning rate of the DiT LoRA (default: learning_rate)")
    optimizer_type: Literal["AdamW"] = Field("AdamW", description="optimizer (AdamW)")
    optimizer_args: dict[str, Any] = Field(default_factory=dict, description="key=value ... for the optimizer")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int | float = Field(0, description="warm-up steps, or a fraction < 1 of all steps")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = off)")
    max_train_steps: int = Field(1600, ge=1)
    max_train_epochs: int | None = Field(None, ge=1, description="overrides max_train_steps")
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int | None = Field(None, ge=0, lt=2**32)
    gradient_checkpointing: bool = False
    max_data_loader_n_workers: int = Field(8, ge=0)
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
    logging_dir: Path | None = None
    log_with: Literal["tensorboard", "wandb", "all"] | None = None
    log_prefix: str | None = None
    sample_every_n_steps: int | None = Field(None, ge=1)
    sample_every_n_epochs: int | None = Field(None, ge=1)
    sample_prompts: Path | None = None
    sample_at_first: bool = False
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

    # --- normalisation (runs also when a TrainConfig is built directly) ----------------------------------------
    @field_validator("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
                     "t5_tokenizer_path", "output_dir", "network_weights", "dataset_config", "logging_dir",
                     "sample_prompts", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if isinstance(v, str):
            return None if v == "" else Path(v).expanduser()
        return v.expanduser() if isinstance(v, Path) else v

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

    @field_validator("network_module", mode="before")
    @classmethod
    def _network_module(cls, v: Any) -> Any:
        if isinstance(v, str) and v in ko.NETWORK_MODULE_ALGOS:
            return ko.NETWORK_MODULE_ALGOS[v]  # "lycoris" is resolved with network_args algo after validation
        accepted = ", ".join(ko.ACCEPTED_NETWORK_MODULES)
        if v in ko.KNOWN_UNIMPLEMENTED_NETWORK_MODULES:
            raise ValueError(f"'{v}' is not implemented yet; accepted: {accepted}")
        raise ValueError(f"unknown network module {v!r}; accepted: {accepted}")

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _optimizer_type(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        name = ko.OPTIMIZER_ALIASES.get(v.strip().lower(), v.strip())
        if name.lower() in ko.IMPLEMENTED_OPTIMIZERS:
            return ko.IMPLEMENTED_OPTIMIZERS[name.lower()]
        known = {k.lower(): k for k in ko.KOHYA_OPTIMIZERS}
        if name.lower() in known or "." in name:
            raise ValueError(f"'{known.get(name.lower(), name)}' is not implemented yet (only AdamW is)")
        raise ValueError(f"unknown optimizer {v!r}{did_you_mean(name, ko.KOHYA_OPTIMIZERS)} (only AdamW is "
                         "implemented)")

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _lr_scheduler(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ko.IMPLEMENTED_SCHEDULERS:
            implemented = ", ".join(ko.IMPLEMENTED_SCHEDULERS)
            if v in ko.KOHYA_SCHEDULERS:
                raise ValueError(f"'{v}' is not implemented yet; implemented: {implemented}")
            raise ValueError(f"unknown scheduler {v!r}{did_you_mean(v, ko.KOHYA_SCHEDULERS)}; "
                             f"implemented: {implemented}")
        return v

    @field_validator("lr_warmup_steps", mode="before")
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
        for k in args if isinstance(args, dict) else ():
            if k == "lr":
                raise ValueError("'lr' cannot be set here; use learning_rate")
            if k not in ko.ADAMW_ARGS:
                raise ValueError(f"AdamW has no argument {k!r}{did_you_mean(k, ko.ADAMW_ARGS)}")
        return args

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
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
        for k in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first"):
            if getattr(self, k) and self.sample_prompts is None:
                raise ValueError(f"{k}: needs sample_prompts")
        return self

    # --- metadata ----------------------------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        """Training settings as kohya-style `ss_*` strings for the LoRA file header (None → "None")."""
        opt = ",".join(f"{k}={v}" for k, v in self.optimizer_args.items())
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
            "ss_optimizer": f"torch.optim.adamw.AdamW({opt})" if opt else "torch.optim.adamw.AdamW",
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
        }
        return {k: str(v) for k, v in meta.items()}


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
