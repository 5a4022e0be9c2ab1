"""Fine-tune options of `TrainConfig` (kohya's `anima_train.py`): which mode trains, which DiT parameters train,
and the checks of the options that mean something else, or nothing, when the DiT itself trains.

`training_mode = "finetune"` trains the DiT's own parameters (networks/full_finetune.py) instead of an adapter
network; the data, caching, sampling, validation, evaluation, preservation loss, monitoring and resume machinery
is the same (a fine-tune's strength m is W0 + m·(W − W0), networks/full_finetune.py).  What a fine-tune
cannot honour is refused at validation, naming the option and the fix (compatibility rule); the adapter-only
options are accepted with one start-up notice each (`finetune_notices`).  The LLM adapter is opt-in
(`finetune_llm_adapter`); kohya's `llm_adapter_lr` above 0 opts in, as kohya trains the adapter at that rate."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator

from anima_trainer.config.kohya_options import FUSED_BACKWARD_NETWORK

TRAINING_MODES = ("network", "finetune")
# adapter-network options that do nothing in a fine-tune (one start-up notice each when set)
ADAPTER_ONLY = ("network_dim", "network_alpha", "network_args", "network_dropout", "scale_weight_norms",
                "network_module", "save_format", "text_encoder_lr", "network_train_unet_only", "unet_lr")


class FinetuneSettings(BaseModel):
    """Fields and checks of the fine-tune mode (a mixin of TrainConfig)."""

    training_mode: Literal["network", "finetune"] = Field(
        "network", description="what trains: \"network\" (an adapter: LoRA/LoKr/LoHa, anima_train_network.py) or "
        "\"finetune\" (the DiT's own parameters, kohya's anima_train.py; saves whole DiT checkpoints)")
    trainable_patterns: list[str] | None = Field(
        None, description="fine-tune only: regexes searched in each DiT parameter name (e.g. "
        "`^blocks\\.(1[4-8])\\.` = blocks 14-18, `cross_attn`, `adaln_modulation`); a parameter trains when one "
        "matches; unset = the whole DiT (the LLM adapter only with finetune_llm_adapter)")
    finetune_llm_adapter: bool = Field(
        False, description="fine-tune only: train the LLM adapter's parameters too (opt-in; kohya's anima_train.py "
        "trains it unless llm_adapter_lr = 0; an llm_adapter_lr above 0 turns this on)")
    fsdp_sharding: Literal["auto", "off"] = Field(
        "auto", description="fine-tune only: with several processes (accelerate launch --num_processes N) \"auto\" "
        "shards the DiT's weights, gradients and optimizer state over them with FSDP2, one unit per block "
        "(docs/multi_gpu.md); \"off\" trains plain data-parallel with the whole DiT in every process")

    fused_backward_pass: bool = Field(
        False, description="fine-tune (kohya's anima_train.py): each parameter is updated during backward and its "
        "gradient freed at once, so a full set of gradients never exists; max_grad_norm then clips each gradient on "
        "its own; needs gradient_accumulation_steps = 1, one process, AdamW/AdaFactor-like optimizers, not fp16. "
        "An adapter network ignores it (one notice)")
    optimizer_offload: bool = Field(
        False, description="fine-tune only: the optimizer state (and bf16 weights' update remainder) lives in host "
        "memory, stepped there; saves 8 bytes per trained parameter of GPU memory with AdamW, costs host compute "
        "and copies every step; combines with fused_backward_pass")

    _finetune_notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("trainable_patterns", mode="before")
    @classmethod
    def _patterns(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        for p in v or ():
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                raise ValueError(f"{p!r} is not a regular expression ({e})") from None
        return v

    @property
    def finetunes(self) -> bool:
        """Whether the run trains the DiT's own parameters (training_mode = "finetune")."""
        return self.training_mode == "finetune"

    def _check_finetune(self) -> None:
        """TrainConfig's cross-field check: what a fine-tune cannot honour (an error naming the option and the
        fix) and the fine-tune options set without a fine-tune."""
        if not self.finetunes:
            for name in ("trainable_patterns", "finetune_llm_adapter"):
                if getattr(self, name):
                    raise ValueError(f"{name}: selects what a fine-tune trains, but training_mode is \"network\"; "
                                     "set training_mode = \"finetune\" (anima_train.py) or remove it")
            if self.optimizer_offload:
                raise ValueError("optimizer_offload: keeps a fine-tune's optimizer state in host memory; an adapter's "
                                 "state is small and stays on the GPU. Set training_mode = \"finetune\" or remove it")
            self._finetune_notes = [f"fused_backward_pass = true: {FUSED_BACKWARD_NETWORK}"] \
                if self.fused_backward_pass else []
            if self.fsdp_sharding != "auto":
                raise ValueError("fsdp_sharding: shards a fine-tune over several processes, but training_mode is "
                                 "\"network\" (adapters train data-parallel); remove it")
            return
        refusals = {
            "network_weights": "starts an adapter from a file; a fine-tune starts from pretrained_model_name_or_path "
                               "(put the weights to continue from there)",
            "dim_from_weights": "builds an adapter from a file",
            "base_weights": "merges adapters before training; merge them into the DiT first (anima-trainer merge)",
            "fp8_compute": "its fp8 GEMMs would run the trained Linears' forward on fp8-rounded weights, which "
                           "changes what they learn (fp8_base stores only the frozen Linears in fp8: use it instead)",
            "network_train_text_encoder_only": "a fine-tune trains the DiT",
        }
        for name, why in refusals.items():
            value = getattr(self, name, None)
            if value:
                raise ValueError(f"{name}: {why}; remove it for training_mode = \"finetune\"")
        self._finetune_notes = self._adapter_option_notes()
        if self.llm_adapter_lr and not self.finetune_llm_adapter:  # kohya's meaning: the adapter trains at that lr
            self.finetune_llm_adapter = True
            self._finetune_notes.append(f"llm_adapter_lr = {self.llm_adapter_lr:g}: the LLM adapter trains at this "
                                        "rate, as in kohya's anima_train.py (finetune_llm_adapter turned on)")
        if self.preservation_loss_weight:
            self._finetune_notes.append(
                f"preservation_loss_weight = {self.preservation_loss_weight:g} in a fine-tune: the base model's "
                "output needs every trained tensor set to its base value and back at each step that carries the "
                "term (its memory traffic twice per step: for the whole DiT about as much as the step's weight "
                "reads; one more device copy of the trained tensors during the base forward) and a host copy of "
                "the base values (2 bytes per trained bf16 parameter, 4 per fp32 one); a partial fine-tune "
                "(trainable_patterns) pays only for its selection")
        self.scale_weight_norms = None  # an adapter's max-norm: noticed above, then off for the loop
        self.unet_lr = None  # the adapter's DiT rate: kohya's anima_train.py has none and trains at learning_rate

    def finetune_notices(self) -> list[str]:
        """One start-up notice per adapter option set in a fine-tune (it changes nothing there), and what the
        trained weights' precision is; with an adapter network, fused_backward_pass's notice."""
        return list(self._finetune_notes)

    def _adapter_option_notes(self) -> list[str]:
        fields = type(self).model_fields
        notes = [f"{name}: an adapter-network option; training_mode = \"finetune\" trains the DiT's own parameters, "
                 "so it changes nothing" + (" (the DiT trains at learning_rate and the component rates, as in "
                                            "kohya's anima_train.py)" if name == "unet_lr" else "")
                 for name in ADAPTER_ONLY if getattr(self, name) != fields[name].get_default(call_default_factory=True)]
        if self.mixed_precision == "bf16":
            flag = "full_bf16 = true" if self.full_bf16 else "mixed_precision = \"bf16\""
            notes.append(f"{flag}: the fine-tuned weights are held in bf16 and updated with exactly compensated steps "
                         "(each weight's fp32 remainder kept as an int16 in the optimizer state): the same updates as "
                         "fp32 master weights (kohya's mixed bf16) at 4 bytes per parameter, where kohya's full_bf16 "
                         "rounds small updates away; a Kahan buffer in bf16 or stochastic rounding would drift "
                         "(train/bf16_update.py). D-Adaptation, Prodigy and schedule-free optimizers update plain "
                         "bf16; a fine-tune sharded across processes (FSDP2) instead keeps fp32 master shards "
                         "(4 bytes per trained parameter / N) and computes in bf16")
        elif self.mixed_precision == "fp16" and not self.full_fp16:
            notes.append("mixed_precision = \"fp16\": the fine-tuned weights are held and updated in fp16 (as kohya's "
                         "full_fp16; kohya keeps fp32 weights without it); mixed_precision = \"bf16\" updates bf16 "
                         "weights as exactly as fp32 ones, mixed_precision = \"no\" trains fp32 weights")
        return notes
