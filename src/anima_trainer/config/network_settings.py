"""Network training options of `TrainConfig` beyond the network itself: kohya's max-norm regularisation, base weights
merged before training, component learning rates and full half precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, Field, field_validator, model_validator


class NetworkSettings(BaseModel):
    """Fields and validators of max-norm, base weights, component lrs and full_bf16/full_fp16 (a mixin of
    TrainConfig)."""

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

    @field_validator("base_weights", "base_weights_multiplier", mode="before")
    @classmethod
    def _base_weights_lists(cls, v: Any, info: Any) -> Any:
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
    def _full_precision(self) -> Self:
        # kohya asserts the same pairs (train_network.py: "full_fp16 requires mixed precision='fp16'")
        if self.full_fp16 and self.full_bf16:
            raise ValueError("full_fp16 and full_bf16 are both set; keep the one matching mixed_precision")
        for flag, mp in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
            if getattr(self, flag) and self.mixed_precision != mp:
                raise ValueError(f"{flag} requires mixed_precision = \"{mp}\" (kohya asserts the same; got "
                                 f"\"{self.mixed_precision}\"): set mixed_precision = \"{mp}\" or remove {flag}")
        return self
