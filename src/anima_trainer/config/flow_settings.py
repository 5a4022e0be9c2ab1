"""Flow-matching options of `TrainConfig`: how σ is drawn (kohya's timestep_sampling and its shift/scale), the
weighting over σ and the per-element loss (train/flow.py).  kohya's noise options are config/noise_settings.py."""

from __future__ import annotations

from typing import Literal

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
