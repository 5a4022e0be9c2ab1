"""Flow-matching options of `TrainConfig`: how σ is drawn (kohya's timestep_sampling and its shift/scale), the
weighting over σ, the per-element loss and the differential output preservation term (train/flow.py).  kohya's
noise options are config/noise_settings.py."""

from __future__ import annotations

from typing import Literal

from pathlib import Path

from pydantic import BaseModel, Field


class FlowSettings(BaseModel):
    """Fields of the flow-matching objective (a mixin of TrainConfig; their notices are the loader's
    flow_notices)."""

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
    preservation_loss_weight: float = Field(0.0, ge=0, description="differential output preservation: weight w of "
        "w·mean((v_adapted − v_base)²) on preservation prompts at the step's own x_σ and σ, the base prediction "
        "being the same DiT with the network's multiplier at 0 (0 = off; docs/evaluation.md)")
    preservation_prompts: Path | None = Field(None, description="prompt file (kohya prompt syntax) of the prompts "
        "the preservation loss keeps the base's prediction on; unset = the built-in prompt bank")
    preservation_every_n_steps: int = Field(1, ge=1, description="add the preservation loss on every n-th "
                                            "optimizer step (each costs two more DiT forwards and one backward)")

    def _check_preservation(self) -> None:
        """The preservation contexts are encoded once by the frozen text encoder (TrainConfig's cross-field
        check): a trained text encoder would make them stale, and encoding them with grad every step would double
        the text encoder's cost, so the combination is refused."""
        if self.preservation_loss_weight > 0 and getattr(self, "trains_text_encoder", False):
            raise ValueError(f"preservation_loss_weight = {self.preservation_loss_weight}: the preservation prompts "
                             "are encoded once by the frozen text encoder, but this run trains the text encoder "
                             "(network_train_unet_only is false); set network_train_unet_only = true, or "
                             "preservation_loss_weight = 0")
