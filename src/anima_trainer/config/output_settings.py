"""Output options of `TrainConfig`: file metadata (kohya's ss_* and modelspec.* keys), output_config, initial
epoch/step, console log file, tokenizer cache and strict captions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.rules import diffusers_refusal

# kohya's SS_METADATA_MINIMUM_KEYS: what no_metadata keeps of the ss_* keys (the modelspec.* keys stay too)
MINIMUM_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                         "ss_network_alpha", "ss_network_args")


def _data_url(path: Path) -> str:
    """An image file as a `data:<mime>;base64,...` URL (kohya's thumbnail conversion)."""
    import base64
    import mimetypes

    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class OutputSettings(BaseModel):
    """Fields, validators and the metadata of the saved files (a mixin of TrainConfig)."""

    save_format: Literal["comfy", "kohya", "diffusers"] = Field(
        "comfy", description="key names of saved networks: comfy (diffusion_model.*; text encoder "
                             "text_encoders.qwen3_06b.*) loads in ComfyUI; kohya (lora_unet_*, lora_te_*): kohya's "
                             "names, ComfyUI loads the DiT part; diffusers (transformer.*/text_conditioner.* "
                             "lora_A/lora_B, scale folded into lora_B: diffusers' Anima loader; LoRA on the DiT "
                             "only, ComfyUI does not read it); anima-trainer option")
    # file metadata (kohya's train_network.py / library/sai_model_spec.py)
    training_comment: str | None = Field(None, description="free text written as ss_training_comment into the "
                                                           "saved files' metadata")
    no_metadata: bool = Field(False, description="write only kohya's minimum ss_* keys (ss_v2, "
                                                 "ss_base_model_version, ss_network_module/_dim/_alpha/_args), "
                                                 "the modelspec.* keys and the sshs_* hashes, as kohya does")
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

    @field_validator("metadata_thumbnail")
    @classmethod
    def _thumbnail(cls, v: str | None) -> str | None:
        # checked here, not at the first save hours later; kohya drops an unreadable thumbnail with a warning
        if v is not None and v and not v.startswith("data:") and not Path(v).expanduser().is_file():
            raise ValueError(f"'{v}' is neither a data: URL nor an image file; give the path of the thumbnail "
                             "image (it is written into the metadata as a data: URL)")
        return v

    def _check_save_format(self) -> None:
        """save_format = "diffusers" carries LoRA on the DiT only: what it cannot carry is refused at start-up
        (with the config's file and line), not at the first save hours later (networks/diffusers_format.py)."""
        if self.save_format != "diffusers":
            return
        problem = diffusers_refusal(self.network_module, self.network_args, option='save_format = "diffusers"',
                                    text_encoder=self.trains_text_encoder)
        if problem is not None:
            raise ValueError(problem)

    # --- metadata ----------------------------------------------------------------------------------------------
    def to_metadata(self, optimizer: str) -> dict[str, str]:
        """The `ss_*` keys kohya's Anima trainer derives from its arguments alone (train_network.py's metadata
        dict and anima_train_network.py's update_metadata), as kohya's strings: `str(value)`, so None → "None",
        booleans "True"/"False".  Keys for options we do not have carry kohya's default (ss_v2, ss_clip_skip,
        ss_max_token_length, ss_lowram, ss_zero_terminal_snr, ss_huber_scale) or the value of our equivalent
        (ss_huber_schedule "constant": huber_c is a constant threshold here).  ss_sd_scripts_commit_hash is
        "(unknown)", kohya's own value when its revision is unknown (anima_trainer_version says ours).  The run's
        numbers, data description, model names and hashes are added by train/file_metadata.py.  `optimizer` is
        ss_optimizer, kohya's `module.Class(k=v,...)`: the train layer resolves the class (train/optim.py
        optimizer_description), which validating a config does not import."""
        meta: dict[str, Any] = {
            "ss_output_name": self.output_name,
            "ss_learning_rate": self.learning_rate,
            "ss_text_encoder_lr": self.text_encoder_lr,
            "ss_unet_lr": self.unet_lr,
            "ss_gradient_checkpointing": self.gradient_checkpointing,
            "ss_gradient_accumulation_steps": self.gradient_accumulation_steps,
            "ss_max_train_steps": self.max_train_steps,
            "ss_lr_warmup_steps": self.lr_warmup_steps,
            "ss_lr_scheduler": self.lr_scheduler,
            "ss_network_module": ko.KOHYA_NETWORK_MODULE_NAME[self.network_module],
            "ss_network_dim": self.network_dim,
            "ss_network_alpha": self.network_alpha,
            "ss_network_dropout": self.network_dropout,
            "ss_mixed_precision": self.mixed_precision,
            "ss_full_fp16": bool(self.full_fp16),
            "ss_v2": False,
            "ss_base_model_version": "anima",
            "ss_clip_skip": None,
            "ss_max_token_length": None,
            "ss_cache_latents": bool(self.cache_latents),
            "ss_seed": self.seed,
            "ss_lowram": False,
            "ss_noise_offset": self.noise_offset,
            "ss_multires_noise_iterations": self.multires_noise_iterations,
            "ss_multires_noise_discount": self.multires_noise_discount,
            "ss_adaptive_noise_scale": self.adaptive_noise_scale,
            "ss_zero_terminal_snr": False,
            "ss_training_comment": self.training_comment,
            "ss_sd_scripts_commit_hash": "(unknown)",
            "ss_optimizer": optimizer,
            "ss_max_grad_norm": self.max_grad_norm,
            "ss_prior_loss_weight": self.prior_loss_weight,
            "ss_min_snr_gamma": self.min_snr_gamma,
            "ss_scale_weight_norms": self.scale_weight_norms,
            "ss_ip_noise_gamma": self.ip_noise_gamma,
            "ss_debiased_estimation": bool(self.debiased_estimation_loss),
            "ss_noise_offset_random_strength": self.noise_offset_random_strength,
            "ss_ip_noise_gamma_random_strength": self.ip_noise_gamma_random_strength,
            "ss_loss_type": self.loss_type,
            "ss_huber_schedule": "constant",
            "ss_huber_scale": 1.0,
            "ss_huber_c": self.huber_c,
            "ss_fp8_base": bool(self.fp8_base),
            "ss_fp8_base_unet": bool(self.fp8_base_unet),
            "ss_validation_seed": self.validation_seed,
            "ss_validation_split": self.validation_split,
            "ss_max_validation_steps": self.max_validation_steps,
            "ss_validate_every_n_epochs": self.validate_every_n_epochs,
            "ss_validate_every_n_steps": self.validate_every_n_steps,
            # anima_train_network.py update_metadata
            "ss_weighting_scheme": self.weighting_scheme,
            "ss_logit_mean": self.logit_mean,
            "ss_logit_std": self.logit_std,
            "ss_mode_scale": self.mode_scale,
            "ss_timestep_sampling": self.timestep_sampling,
            "ss_sigmoid_scale": self.sigmoid_scale,
            "ss_discrete_flow_shift": self.discrete_flow_shift,
            # ours, beyond kohya's keys
            "ss_max_train_epochs": self.max_train_epochs,
            "ss_batch_size_per_device": self.train_batch_size,
        }
        if self.network_args:  # kohya: only with network_args, and its dropout added (train_network.py net_kwargs)
            args: dict[str, Any] = dict(self.network_args)
            if not self.dim_from_weights and "dropout" not in args:
                args["dropout"] = self.network_dropout
            meta["ss_network_args"] = json.dumps(args)
        return {k: str(v) for k, v in meta.items()}

    def modelspec_metadata(self, timestamp: float, resolution: tuple[int, int] | None = None) -> dict[str, str]:
        """kohya's `modelspec.*` keys for an Anima LoRA (library/sai_model_spec.py `build_metadata_dataclass` as
        anima_train_network.py calls it): spec 1.0.1, architecture "anima-preview/lora", implementation, title
        (metadata_title, else output_name), resolution "WxH" (`resolution`, the datasets' common one; else
        kohya's Anima default 1024x1024), the local date of `timestamp` (ISO 8601, whole seconds),
        no prediction_type (kohya writes "epsilon" for every non-Flux model, Anima included; Anima is a
        rectified-flow model, so the key is left out, as kohya does for Flux), timestep_range "min,max" when
        min/max_timestep is set (defaults 0 and 1000), implementation_version (kohya "sd-scripts/<commit>", here
        "anima-trainer/<version>"), and author/description/license/tags when set.  Beyond kohya's Anima trainer
        (whose dataclass path drops them although it accepts the options): usage_hint, thumbnail (a file becomes
        a data: URL), merged_from, trigger_phrase, preprocessor, is_negative_embedding.  Written also with
        no_metadata, as in kohya; modelspec.hash_sha256 is added at save time (networks/hashes.py)."""
        import datetime

        import anima_trainer

        w, h = resolution if resolution is not None else (1024, 1024)
        meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "anima-preview/lora",
                "modelspec.implementation": "https://huggingface.co/circlestone-labs/Anima",
                "modelspec.title": self.metadata_title if self.metadata_title is not None else self.output_name,
                "modelspec.resolution": f"{w}x{h}",
                "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
                "modelspec.implementation_version": f"anima-trainer/{anima_trainer.__version__}"}
        if self.min_timestep is not None or self.max_timestep is not None:
            low = self.min_timestep if self.min_timestep is not None else 0
            high = self.max_timestep if self.max_timestep is not None else 1000
            meta["modelspec.timestep_range"] = f"{low},{high}"
        for name in ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                     "trigger_phrase", "preprocessor", "is_negative_embedding"):
            value = getattr(self, f"metadata_{name}")
            if value is None:
                continue
            if name == "thumbnail" and value and not value.startswith("data:"):
                value = _data_url(Path(value).expanduser())
            meta[f"modelspec.{name}"] = value
        return meta
