"""Network options of `TrainConfig`: the network itself (module, rank, alpha, network_args, starting weights), and
the training options around it: kohya's max-norm regularisation, base weights merged before training, component
learning rates and full half precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, field_validator, model_validator

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.rules import kv_pairs
from anima_trainer.config.sd_scripts_anima import SD_SCRIPTS_ANIMA_MODULES


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
                                         "(an adapter network: needs train_llm_adapter; in a fine-tune a rate above "
                                         "0 trains the LLM adapter; as self_attn_lr)")
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


class NetworkModuleSettings(BaseModel):
    """Fields, validators and the algorithm resolution of the network itself (a mixin of TrainConfig)."""

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

    @field_validator("network_module", mode="before")
    @classmethod
    def _network_module(cls, v: Any) -> Any:
        if isinstance(v, str) and v in SD_SCRIPTS_ANIMA_MODULES:
            return SD_SCRIPTS_ANIMA_MODULES[v]
        if isinstance(v, str) and v in ko.NETWORK_MODULE_ALGOS:
            return ko.NETWORK_MODULE_ALGOS[v]  # "lycoris" is resolved with network_args algo after validation
        accepted = ", ".join(ko.ACCEPTED_NETWORK_MODULES)
        raise ValueError(f"unknown network module {v!r}; accepted: {accepted}")

    @field_validator("network_args", mode="before")
    @classmethod
    def _network_args(cls, v: Any) -> Any:
        return kv_pairs(v, "network_args", literal=False)

    def _check_network_module(self) -> None:
        """dim_from_weights needs weights; the algorithm named in network_args (LyCORIS convention) must agree with
        network_module, and `lycoris.kohya` takes it from there."""
        if self.dim_from_weights and self.network_weights is None:
            raise ValueError("dim_from_weights: needs network_weights")
        algo = self.network_args.get("algo")
        if self.network_module == "lycoris":
            if algo is None or algo.strip().lower() not in ko.LYCORIS_ALGOS:
                raise ValueError(f"network_module: 'lycoris.kohya' needs network_args algo=lokr or algo=loha "
                                 f"(got {algo!r}); for LoRA use networks.lora_anima")
            self.network_module = algo.strip().lower()
        elif algo is not None and algo.strip().lower() != self.network_module:
            raise ValueError(f"network_args: algo={algo} does not match network_module ({self.network_module})")
        self.network_args = {k: v for k, v in self.network_args.items() if k != "algo"}
