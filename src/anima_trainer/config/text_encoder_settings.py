"""Text-encoder training options of `TrainConfig` (kohya's --network_train_unet_only,
--network_train_text_encoder_only, --text_encoder_lr): which parts get adapter modules, and why the text encoder
is not trained when its outputs are cached.

kohya's meaning is the rule (our TOML is kohya's format): without network_train_unet_only a LoRA is trained on the
Qwen3 text encoder too, at text_encoder_lr (default learning_rate).  sd-scripts-anima configs keep that trainer's
DiT-only default (config/sd_scripts_anima.py applies it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, field_validator

# the options whose cached values stand in for the text encoder's output: training it through them is impossible
TEXT_CACHE_OPTIONS = ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "cache_llm_adapter_outputs")
# settings that only act on DiT modules: without any (network_train_text_encoder_only) they change nothing
DIT_LR_FIELDS = ("unet_lr", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr", "llm_adapter_lr")
DIT_NETWORK_ARGS = ("train_llm_adapter", "train_norm", "train_adaln", "train_final_layer", "train_embedders",
                    "loraplus_unet_lr_ratio")


class TextEncoderSettings(BaseModel):
    """Fields, the consistency check and the start-up notices of text-encoder training (a mixin of TrainConfig;
    `_check_text_encoder` is run by TrainConfig's cross-field check, after sd-scripts-anima's defaults)."""

    network_train_unet_only: bool = Field(
        False, description="kohya: adapter modules on the DiT only. false (kohya's default, also here) trains a "
        "LoRA on the Qwen3 text encoder too (q/k/v/o and gate/up/down of every layer: 196 modules on Qwen3-0.6B), "
        "unless its outputs are cached (cache_text_encoder_outputs*, cache_llm_adapter_outputs: then it stays "
        "frozen, with a notice). sd-scripts-anima configs: true by default (its trainer has no text-encoder LoRA)")
    network_train_text_encoder_only: bool = Field(
        False, description="kohya: adapter modules on the text encoder only; the DiT (and its LLM adapter) is left "
        "as it is. Cannot be combined with cached text-encoder outputs")
    text_encoder_lr: float | list[float] | None = Field(
        None, description="learning rate of the text-encoder modules (default: learning_rate; 0 = the text "
        "encoder is frozen, as kohya drops a group with lr 0). kohya takes one value per text encoder; Anima has "
        "one, so a list's first value is used (a notice names the others)")
    _te_notices: list[str] = PrivateAttr(default_factory=list)

    @field_validator("text_encoder_lr", mode="before")
    @classmethod
    def _text_encoder_lr(cls, v: Any) -> Any:
        if v is None:
            return None
        values = v if isinstance(v, list | tuple) else [v]
        out = []
        for x in values:
            if isinstance(x, bool):
                raise ValueError(f"expected a number or a list of numbers, got {v!r}")  # noqa: TRY004 - pydantic wants ValueError
            try:
                f = float(x)
            except (TypeError, ValueError):
                raise ValueError(f"expected a number or a list of numbers, got {v!r}") from None
            if not 0 <= f <= 1000:  # learning_rate's bounds; 0 freezes the text encoder (kohya)
                raise ValueError(f"must be between 0 and 1000, got {f:g}")
            out.append(f)
        return out if isinstance(v, list | tuple) else out[0]

    # ------------------------------------------------------------------------------------------------ decisions --
    @property
    def text_cache_option(self) -> str | None:
        """The option that caches text-encoder outputs (so the encoder cannot be trained), or None."""
        return next((k for k in TEXT_CACHE_OPTIONS if getattr(self, k)), None)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the run trains adapter modules on the Qwen3 text encoder: kohya's default, unless
        network_train_unet_only, a text-output cache, or text_encoder_lr = 0 says otherwise."""
        return (not self.network_train_unet_only and self.text_cache_option is None
                and self.text_encoder_lr != 0 and getattr(self, "training_mode", "network") != "finetune")

    @property
    def trains_dit(self) -> bool:
        """Whether the run trains adapter modules on the DiT (all but network_train_text_encoder_only)."""
        return not self.network_train_text_encoder_only

    def _check_text_encoder(self) -> None:
        """kohya's combinations: the list form of text_encoder_lr, nothing-to-train errors, and the notices."""
        notes: list[str] = []
        if isinstance(self.text_encoder_lr, list):
            values = self.text_encoder_lr
            self.text_encoder_lr = values[0]
            if len(values) > 1:
                extra = ", ".join(f"{x:g}" for x in values[1:])
                notes.append(f"text_encoder_lr = {values}: Anima has one text encoder (Qwen3), which uses the first "
                             f"value {values[0]:g}; {extra} belong to no encoder (kohya ignores them too)")
        cache = self.text_cache_option
        if self.network_train_text_encoder_only:
            if self.network_train_unet_only:
                raise ValueError("network_train_unet_only and network_train_text_encoder_only are both set, so "
                                 "nothing would be trained; keep one of them")
            if cache is not None:
                raise ValueError(f"network_train_text_encoder_only: the text encoder cannot be trained while {cache} "
                                 "is on (its outputs are computed once), so nothing would be trained; turn "
                                 f"{cache} off, or remove network_train_text_encoder_only to train the DiT")
            if self.text_encoder_lr == 0:
                raise ValueError("network_train_text_encoder_only with text_encoder_lr = 0: nothing would be "
                                 "trained; give text_encoder_lr a value (or leave it unset: learning_rate)")
            dit_only = [f"{k} = {getattr(self, k):g}" for k in DIT_LR_FIELDS if getattr(self, k) is not None]
            dit_only += [f"network_args {k}={v}" for k, v in self.network_args.items()
                         if k in DIT_NETWORK_ARGS and str(v).strip().lower() not in ("false", "0", "no", "off", "")]
            if dit_only:
                notes.append(f"{', '.join(dit_only)}: no effect, network_train_text_encoder_only trains no DiT "
                             "module (nor the LLM adapter or norm gains inside the DiT; as in kohya)")
        if getattr(self, "training_mode", "network") == "finetune":
            pass  # a fine-tune trains no text encoder: its adapter options get finetune_settings' notice
        elif not self.network_train_unet_only and cache is not None and self.text_encoder_lr != 0:
            notes.append(f"{cache} = true: the text encoder (Qwen3) is not trained, only the DiT, because its outputs "
                         "are cached (kohya refuses this combination with an assert; this run goes on as with "
                         "network_train_unet_only = true). To train a text-encoder LoRA too, turn "
                         f"{cache} off; to say so, set network_train_unet_only = true")
        elif self.text_encoder_lr is not None and not self.trains_text_encoder:
            why = ("network_train_unet_only = true" if self.network_train_unet_only else
                   f"{cache} caches its outputs" if cache is not None else "")
            if self.text_encoder_lr == 0 and not self.network_train_unet_only and cache is None:
                notes.append("text_encoder_lr = 0: the text encoder (Qwen3) stays frozen (kohya drops a group with "
                             "lr 0), so no text-encoder modules are made; only the DiT is trained")
            else:
                notes.append(f"text_encoder_lr = {self.text_encoder_lr:g}: no effect, the text encoder is not "
                             f"trained ({why})")
        self._te_notices = notes

    def text_encoder_notices(self) -> list[str]:
        """Start-up notices of the text-encoder options: caching instead of training, text_encoder_lr values
        without an encoder or without effect, unet_lr without DiT modules."""
        return list(self._te_notices)
