"""The Qwen-Image VAE (Wan 2.1 architecture) that turns images into Anima latents and back.

The weights run inside diffusers' `AutoencoderKLQwenImage`; what lives here is what has to match
ComfyUI exactly (anima_arch.md §6, pitfall §10.17):

* pixels go in as `2·img − 1`, the latent is the posterior **mean** (no sampling);
* every image of a batch is its own single frame `[B, 3, 1, H, W]` — ComfyUI's VAEEncode would treat
  a batch as the frames of one video, which the causal temporal convolutions would mix;
* latents are normalised per channel with the Wan21 constants, `(z − mean) / std` (scale factor 1).

Files come in ComfyUI's single-file layout (`encoder.downsamples.N.residual.*`, `conv1`, `conv2`, …),
already converted to diffusers names, or inside an all-in-one checkpoint under `vae.`; all three load
through one strict path that never materialises random init weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from anima_trainer.models.checkpoint import (
    VAE_BUNDLE_PREFIX,
    CheckpointError,
    WrongModelFileError,
    expect_kind,
    load_state_dict,
)

__all__ = [
    "LATENTS_MEAN",
    "LATENTS_STD",
    "VAE_CONFIG",
    "AnimaVAE",
    "assign_state_dict",
    "build_vae_skeleton",
    "comfyui_to_diffusers_key",
    "convert_vae_state_dict",
    "denormalize_latents",
    "load_vae",
    "normalize_latents",
]

# comfy.latent_formats.Wan21 (scale_factor 1.0); identical to diffusers' defaults for this model.
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
LATENT_CHANNELS = 16
SPATIAL_FACTOR = 8

# diffusers `AutoencoderKLQwenImage` config of the Qwen-Image / Wan 2.1 VAE (anima_arch.md §6).
VAE_CONFIG: dict = dict(
    base_dim=96,
    z_dim=LATENT_CHANNELS,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)

VAE_FLAG = "--vae"
DEFAULT_BATCH_SIZE = 4


# ---------------------------------------------------------------------------------------------------
# Latent normalisation
# ---------------------------------------------------------------------------------------------------


def _channel_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std shaped to broadcast over dim 1 of a [B, 16, ...] latent, in fp32 on its device."""
    if z.ndim < 2 or z.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected latents shaped [B, {LATENT_CHANNELS}, ...], got {list(z.shape)}")
    shape = (1, LATENT_CHANNELS) + (1,) * (z.ndim - 2)
    mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=z.device).view(shape)
    std = torch.tensor(LATENTS_STD, dtype=torch.float32, device=z.device).view(shape)
    return mean, std


def normalize_latents(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE mean -> what the DiT sees: `(z − mean) / std`, computed in fp32."""
    mean, std = _channel_stats(z)
    return (z.float() - mean) / std


def denormalize_latents(z: torch.Tensor) -> torch.Tensor:
    """DiT-space latent -> raw VAE latent: `z · std + mean`, computed in fp32."""
    mean, std = _channel_stats(z)
    return z.float() * std + mean


# ---------------------------------------------------------------------------------------------------
# ComfyUI -> diffusers key conversion
# ---------------------------------------------------------------------------------------------------

# Inside one residual block: ComfyUI keeps the nn.Sequential indices, diffusers names the layers.
_RESIDUAL_RENAMES = {
    "residual.0.gamma": "norm1.gamma",   # RMS_norm
    "residual.2.": "conv1.",             # CausalConv3d (index 1 is SiLU)
    "residual.3.gamma": "norm2.gamma",   # RMS_norm
    "residual.6.": "conv2.",             # CausalConv3d (4 SiLU, 5 Dropout)
    "shortcut.": "conv_shortcut.",       # 1x1x1 conv when the width changes
}
# Top-level and encoder/decoder-level renames (exact prefixes).
_TOP_RENAMES = {
    "conv1.": "quant_conv.",             # 32 -> 32 after the encoder
    "conv2.": "post_quant_conv.",        # 16 -> 16 before the decoder
}
_CODER_RENAMES = {
    "conv1.": "conv_in.",
    "head.0.": "norm_out.",
    "head.2.": "conv_out.",
    "middle.0.": "mid_block.resnets.0.",
    "middle.1.": "mid_block.attentions.0.",  # attention keeps norm/to_qkv/proj names
    "middle.2.": "mid_block.resnets.1.",
}
_FLAT_BLOCK = re.compile(r"^(downsamples|upsamples)\.(\d+)\.(.*)$")


def _rename_inside_block(rest: str) -> str:
    for old, new in _RESIDUAL_RENAMES.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest  # Resample (`resample.1.*`, `time_conv.*`) and attention names are the same


def comfyui_to_diffusers_key(key: str, num_res_blocks: int = VAE_CONFIG["num_res_blocks"]) -> str:
    """One ComfyUI/original Wan VAE key -> its diffusers `AutoencoderKLQwenImage` name.

    ComfyUI stores the encoder's and decoder's stages as one flat list each. The encoder keeps that list
    in diffusers (`down_blocks.N`); the decoder list is regrouped into up blocks of `num_res_blocks + 1`
    residual blocks followed by one upsampler (the last up block has none), so `upsamples.N` becomes
    `up_blocks.{N // (R+2)}.resnets.{N % (R+2)}` or, for the last slot, `.upsamplers.0`.
    Keys that match no rule come back unchanged, so the strict key check reports them.
    """
    for old, new in _TOP_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    coder, dot, rest = key.partition(".")
    if coder not in ("encoder", "decoder") or not dot:
        return key
    for old, new in _CODER_RENAMES.items():
        if rest.startswith(old):
            tail = rest[len(old):]
            inner = _rename_inside_block(tail) if new.startswith("mid_block.resnets") else tail
            return f"{coder}.{new}{inner}"
    m = _FLAT_BLOCK.match(rest)
    if m is None:
        return key
    kind, index, tail = m.group(1), int(m.group(2)), _rename_inside_block(m.group(3))
    if coder == "encoder" and kind == "downsamples":
        return f"encoder.down_blocks.{index}.{tail}"
    if coder == "decoder" and kind == "upsamples":
        per_block = num_res_blocks + 2
        block, slot = divmod(index, per_block)
        where = f"resnets.{slot}" if slot <= num_res_blocks else "upsamplers.0"
        return f"decoder.up_blocks.{block}.{where}.{tail}"
    return key


def convert_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE state dict in either layout -> diffusers names.

    No rule matches a diffusers name, so files already in diffusers layout pass through unchanged and
    no layout sniffing is needed.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = comfyui_to_diffusers_key(key)
        if new in out:
            raise CheckpointError(f"VAE keys collide after conversion: {key!r} -> {new!r}")
        out[new] = tensor
    return out


# ---------------------------------------------------------------------------------------------------
# Model construction and loading
# ---------------------------------------------------------------------------------------------------


def build_vae_skeleton(base_dim: int = VAE_CONFIG["base_dim"]) -> torch.nn.Module:
    """An `AutoencoderKLQwenImage` on the meta device: no memory, no random init to throw away.

    `base_dim` is read from the file (96 for the real VAE; the demo's tiny VAE uses fewer channels).
    """
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        return AutoencoderKLQwenImage(**{**VAE_CONFIG, "base_dim": base_dim})


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(repr(i) for i in items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def assign_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Put converted tensors into a meta skeleton as-is (assign, no copy); strict on names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    where = f" in {source}" if source else ""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise CheckpointError(f"not a Qwen-Image / Wan 2.1 VAE{where}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(t.shape)} (expected {expected[k]})" for k, t in state_dict.items()
             if tuple(t.shape) != expected[k]]
    if wrong:
        raise CheckpointError(f"VAE tensor shapes don't match the Qwen-Image VAE{where}: {_first(wrong, 3)}")
    model.load_state_dict(state_dict, strict=True, assign=True)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"VAE.encode expects float images shaped [B, 3, H, W] in [0, 1], "
                         f"got {images.dtype} {list(images.shape)}")
    h, w = images.shape[-2:]
    if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
        raise ValueError(f"image size {h}x{w} (HxW) is not a multiple of {SPATIAL_FACTOR}; "
                         "crop or resize to multiples of 8 before encoding")


class AnimaVAE:
    """Encode images to normalised Anima latents and decode them back, matching ComfyUI.

    Inputs may live on any device; they are moved to the VAE's device/dtype, and results come back as
    fp32 on the device the inputs came from. Work is split into micro-batches of `batch_size` images to
    bound activation memory (a 1024² image needs several GiB of activations in the encoder).
    """

    def __init__(self, model: torch.nn.Module, *, dtype: torch.dtype, device: torch.device,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.model = model.eval().requires_grad_(False)
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size

    def _chunks(self, x: torch.Tensor, batch_size: int | None) -> tuple[torch.Tensor, ...]:
        size = batch_size or self.batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        return x.split(size)

    @torch.no_grad()
    def encode_raw(self, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> raw posterior mean [B,16,1,H/8,W/8] fp32 (before normalisation)."""
        _check_images(images)
        out = []
        for chunk in self._chunks(images, batch_size):
            # One image = one frame: the batch dimension, never the time dimension.
            x = (chunk.to(self.device, torch.float32) * 2.0 - 1.0).to(self.dtype).unsqueeze(2)
            moments = self.model.encode(x).latent_dist.mean
            out.append(moments.float().to(images.device))
        return torch.cat(out)

    def encode(self, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised latents [B,16,1,H/8,W/8] fp32, as the DiT consumes them."""
        return normalize_latents(self.encode_raw(images, batch_size=batch_size))

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Raw (unnormalised) latents [B,16,1,h,w] -> decoder output [B,3,8h,8w] clamped to [−1, 1], fp32."""
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS or latents.shape[2] != 1:
            raise ValueError(f"VAE.decode expects single-frame latents shaped [B, {LATENT_CHANNELS}, 1, h, w], "
                             f"got {list(latents.shape)}")
        out = []
        for chunk in self._chunks(latents, batch_size):
            z = chunk.to(self.device, self.dtype)
            pixels = self.model.decode(z).sample  # diffusers clamps to [-1, 1]
            out.append(pixels[:, :, 0].float().to(latents.device))
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Normalised latents [B,16,1,h,w] -> images [B,3,8h,8w] in [0,1] (ComfyUI's `(x+1)/2`, clamped)."""
        pixels = self.decode_raw(denormalize_latents(latents), batch_size=batch_size)
        return ((pixels + 1.0) / 2.0).clamp_(0.0, 1.0)


def _state_dict_prefix(path: str | Path) -> str:
    """Check the file is a 16-channel Qwen-Image VAE (alone or in a bundle); its key prefix."""
    info = expect_kind(path, VAE_FLAG, ("qwen_image_vae", "anima_bundle"))
    if info.kind == "anima_bundle":
        if "vae" not in info.components:
            raise WrongModelFileError(f"{VAE_FLAG} expects a Qwen-Image / Wan 2.1 VAE, but {path} is "
                                      f"{info.description} without a VAE (components: {sorted(info.components)})")
        return VAE_BUNDLE_PREFIX
    return info.prefix


def load_vae(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             batch_size: int = DEFAULT_BATCH_SIZE) -> AnimaVAE:
    """Load the Anima VAE from a single .safetensors file (ComfyUI or diffusers layout, or a `vae.` bundle).

    Wrong files (a DiT, a LoRA, the 48-channel Wan 2.2 VAE, …) raise `WrongModelFileError` naming `--vae`.
    Tensors are read one at a time straight into `dtype`/`device` and assigned to a meta skeleton, so
    peak memory is one copy of the weights.
    """
    prefix = _state_dict_prefix(path)
    device = torch.device(device)
    state_dict = convert_vae_state_dict(load_state_dict(path, prefix=prefix, dtype=dtype, device=device))
    conv_in = state_dict.get("encoder.conv_in.weight")
    model = build_vae_skeleton(conv_in.shape[0] if conv_in is not None else VAE_CONFIG["base_dim"])
    try:
        assign_state_dict(model, state_dict, source=str(path))
    except CheckpointError as e:
        raise WrongModelFileError(f"{VAE_FLAG}: {e}") from None
    return AnimaVAE(model, dtype=dtype, device=device, batch_size=batch_size)
