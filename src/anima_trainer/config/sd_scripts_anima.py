"""sd-scripts-anima configs in `TrainConfig`: its options, its network_args names, its defaults
(sd_scripts_anima_defaults) and the dialect/notices the loader records."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, model_validator

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.rules import parse_bool

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


class SdScriptsAnimaSettings(BaseModel):
    """sd-scripts-anima's options, its defaults and the config's start-up notices (a mixin of TrainConfig;
    `_sd_scripts_anima` is run by TrainConfig's cross-field check)."""

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

    # start-up notices and the dialect of the config (set by the loader; not settings) ---------------------------------
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

    @model_validator(mode="before")
    @classmethod
    def _lokr_anima_asks_for_defaults(cls, data: Any) -> Any:
        # sd-scripts-anima's own LoKr module name is a sd-scripts-anima config (the loader detects the other names)
        if (isinstance(data, dict) and data.get("network_module") == "networks.lokr_anima"
                and data.get("sd_scripts_anima_defaults") is None):
            data = {**data, "sd_scripts_anima_defaults": True}
        return data

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
            # issue 15: sd-scripts-anima's network has no text-encoder modules (whatever these flags say)
            if not self.network_train_unet_only and not self.network_train_text_encoder_only:
                was_off = "network_train_unet_only" in explicit
                self.network_train_unet_only = True
                applied.append("network_train_unet_only = true (DiT only" + (
                    "; the config's false is overridden as sd-scripts-anima trains no text-encoder LoRA; "
                    "sd_scripts_anima_defaults = false gives kohya's text-encoder LoRA" if was_off else "") + ")")
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
                old = parse_bool("train_norm", args["train_norm"])  # ValueError naming the words
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
