"""Noise and timestep options of `TrainConfig` (kohya's noise offset, multires noise, input perturbation, timestep
range, and the loss options accepted without effect for Anima)."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, Field, model_validator


class NoiseSettings(BaseModel):
    """Fields, validators and checks of the noise and timestep options (a mixin of TrainConfig)."""

    noise_offset: float | None = Field(None, ge=0, description="kohya's noise offset: noise += value·N(0,1) per "
                                       "sample and channel (around 0.05–0.1; kohya's own Anima trainer ignores it)")
    noise_offset_random_strength: bool = Field(False, description="noise offset strength drawn from U(0, "
                                               "noise_offset) per sample")
    adaptive_noise_scale: float | None = Field(None, description="adds value·|latent channel mean| to noise_offset "
                                               "(needs noise_offset)")
    multires_noise_iterations: int | None = Field(None, ge=0, description="kohya's multires (pyramid) noise with "
                                                  "this many levels (6–10 usual; 0/unset = off)")
    multires_noise_discount: float = Field(0.3, ge=0, description="weight ratio between multires noise levels")
    ip_noise_gamma: float | None = Field(None, ge=0, description="input perturbation: the model input uses noise "
                                         "ε + γ·ξ, the target keeps ε (around 0.1; as kohya's Anima trainer)")
    ip_noise_gamma_random_strength: bool = Field(False, description="γ drawn from U(0, ip_noise_gamma) per sample")
    min_timestep: int | None = Field(None, ge=0, le=1000, description="lowest timestep on kohya's 0–1000 scale: "
                                     "σ is mapped from [0, 1] onto [min_timestep, max_timestep]/1000")
    max_timestep: int | None = Field(None, ge=0, le=1000, description="highest timestep on kohya's 0–1000 scale "
                                     "(see min_timestep)")
    min_snr_gamma: float | None = Field(None, ge=0, description="accepted for kohya configs; no effect for Anima "
                                        "(flow matching), as in kohya: a start-up notice says so")
    debiased_estimation_loss: bool = Field(False, description="accepted for kohya configs; no effect for Anima, as "
                                           "in kohya: a start-up notice says so")
    v_pred_like_loss: float | None = Field(None, ge=0, description="accepted for kohya configs; no effect for Anima, "
                                           "as in kohya: a start-up notice says so")
    scale_v_pred_loss_like_noise_pred: bool = Field(False, description="accepted for kohya configs; no effect for "
                                                    "Anima (no v-prediction): a start-up notice says so")

    @model_validator(mode="after")
    def _noise_options(self) -> Self:
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            raise ValueError("adaptive_noise_scale: needs noise_offset (kohya: adaptive_noise_scale requires "
                             "noise_offset); set noise_offset too or remove adaptive_noise_scale")
        lo, hi = self.min_timestep, self.max_timestep
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_timestep: {lo} is above max_timestep {hi}; set min_timestep <= max_timestep")
        return self
