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
import torch.nn.functional as F
from torch import nn

from anima_trainer.models.model_files import (
    VAE_BUNDLE_PREFIX,
    ModelFileError,
    FileInfo,
    WrongModelFileError,
    expect_kind,
    load_state_dict,
)
from anima_trainer.models.diffusers_layout import check_component_config, find_layout, read_config, weight_files

__all__ = [
    "LATENTS_MEAN",
    "LATENTS_STD",
    "VAE_CONFIG",
    "AnimaVAE",
    "VAE2D",
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
            raise ModelFileError(f"VAE keys collide after conversion: {key!r} -> {new!r}")
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
        raise ModelFileError(f"not a Qwen-Image / Wan 2.1 VAE{where}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(t.shape)} (expected {expected[k]})" for k, t in state_dict.items()
             if tuple(t.shape) != expected[k]]
    if wrong:
        raise ModelFileError(f"VAE tensor shapes don't match the Qwen-Image VAE{where}: {_first(wrong, 3)}")
    model.load_state_dict(state_dict, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------------
# The 2-D path for single images (kohya's --qwen_image_vae_2d, sd-scripts PR #2382)
# ---------------------------------------------------------------------------------------------------
#
# Every image is one frame (T = 1) and the encoder/decoder run their first (and only) chunk, so:
# * a causal Conv3d pads 2·p_t zero frames *before* the frame; with T = 1 only the last temporal slice of
#   its kernel ever meets data, so it equals a Conv2d with weight[:, :, -1] (1×1×1 convs: the only slice);
# * the temporal resamplers skip `time_conv` on the first chunk (downsample3d caches the frame,
#   upsample3d marks "Rep"), so they are their spatial Sequential alone;
# * the feature cache only carries frames to the next chunk, which never comes (why kohya's
#   --vae_disable_cache changes nothing for images and is a no-op on this path);
# * RMS norms and the single-head attention act per frame already.
# The same arithmetic with no 5-D reshapes, cache clones or zero frames: faster and less memory.


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, chunk_rows: int | None) -> torch.Tensor:
    """`conv(x)`, computed `chunk_rows` output rows at a time when set (kohya's --vae_chunk_size).

    Exact: each chunk reads the padded input rows its outputs depend on. Only the peak workspace of the
    convolution shrinks; the output is the same tensor.
    """
    kh = conv.kernel_size[0]
    if not chunk_rows or kh == 1:
        return conv(x)
    ph, pw = conv.padding
    sh = conv.stride[0]
    x = F.pad(x, (pw, pw, ph, ph))
    out_h = (x.shape[2] - kh) // sh + 1
    if out_h <= chunk_rows:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride)
    parts = []
    for y0 in range(0, out_h, chunk_rows):
        y1 = min(y0 + chunk_rows, out_h)
        parts.append(F.conv2d(x[:, :, y0 * sh: (y1 - 1) * sh + kh], conv.weight, conv.bias, conv.stride))
    return torch.cat(parts, dim=2)


def _conv2d_from_causal(conv3d: nn.Module) -> nn.Conv2d:
    """A `QwenImageCausalConv3d` as the Conv2d it is for one frame: the last temporal kernel slice."""
    w = conv3d.weight[:, :, -1]
    pad = conv3d._padding[2]  # (w, w, h, h, 2t, 0): spatial padding is symmetric
    out = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[-2:]), stride=tuple(conv3d.stride[1:]),
                    padding=(pad, conv3d._padding[0]), bias=conv3d.bias is not None, device="meta")
    out.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    if conv3d.bias is not None:
        out.bias = nn.Parameter(conv3d.bias.detach().clone(), requires_grad=False)
    return out


class _RMS2d(nn.Module):
    """`QwenImageRMS_norm` over the channels of [B, C, H, W]."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.scale = norm.scale
        self.gamma = nn.Parameter(norm.gamma.detach().reshape(-1, 1, 1).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class _Convs(nn.Module):
    """Holds the row-chunk size shared by every 2-D conv of the model."""

    chunk_rows: int | None = None

    def conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return _conv_rows(conv, x, self.chunk_rows)


class _Residual2d(nn.Module):
    def __init__(self, block: nn.Module, convs: _Convs) -> None:
        super().__init__()
        self._convs = [convs]  # a list: not a submodule
        self.norm1, self.norm2 = _RMS2d(block.norm1), _RMS2d(block.norm2)
        self.conv1, self.conv2 = _conv2d_from_causal(block.conv1), _conv2d_from_causal(block.conv2)
        self.shortcut = (_conv2d_from_causal(block.conv_shortcut)
                         if not isinstance(block.conv_shortcut, nn.Identity) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._convs[0]
        h = x if self.shortcut is None else self.shortcut(x)
        x = c.conv(self.conv1, F.silu(self.norm1(x)))
        x = c.conv(self.conv2, F.silu(self.norm2(x)))  # dropout is 0 and the model is in eval
        return x + h


class _Attention2d(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn  # diffusers' block works per frame; T = 1 makes its reshapes free

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.unsqueeze(2)).squeeze(2)


class _Resample2d(nn.Module):
    def __init__(self, resample: nn.Module, convs: _Convs) -> None:
        super().__init__()
        self._convs = [convs]
        layers = list(resample.resample)
        self.pre = layers[0]  # ZeroPad2d (down) or nearest-exact Upsample (up)
        self.conv = layers[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._convs[0].conv(self.conv, self.pre(x))


def _layer2d(layer: nn.Module, convs: _Convs) -> nn.Module:
    kind = type(layer).__name__
    if kind == "QwenImageResidualBlock":
        return _Residual2d(layer, convs)
    if kind == "QwenImageAttentionBlock":
        return _Attention2d(layer)
    if kind == "QwenImageResample":
        return _Resample2d(layer, convs)
    raise TypeError(f"no 2-D form for VAE layer {kind}")


class _Coder2d(nn.Module):
    """The encoder or decoder: conv_in, layers, norm_out, SiLU, conv_out, for one frame."""

    def __init__(self, coder: nn.Module, convs: _Convs, encoder: bool) -> None:
        super().__init__()
        self._convs = [convs]
        self.conv_in = _conv2d_from_causal(coder.conv_in)
        mid = [coder.mid_block.resnets[0]]
        for attn, res in zip(coder.mid_block.attentions, coder.mid_block.resnets[1:]):
            mid += [attn, res]
        mid_layers = [_layer2d(m, convs) for m in mid]
        if encoder:
            body = [_layer2d(m, convs) for m in coder.down_blocks] + mid_layers
        else:
            body = list(mid_layers)
            for up in coder.up_blocks:
                body += [_layer2d(m, convs) for m in up.resnets]
                body += [_layer2d(m, convs) for m in (up.upsamplers or [])]
        self.layers = nn.ModuleList(body)
        self.norm_out = _RMS2d(coder.norm_out)
        self.conv_out = _conv2d_from_causal(coder.conv_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._convs[0]
        x = c.conv(self.conv_in, x)
        for layer in self.layers:
            x = layer(x)
        return c.conv(self.conv_out, F.silu(self.norm_out(x)))


class VAE2D(nn.Module):
    """The Qwen-Image VAE for single images with 2-D convolutions (kohya's `--qwen_image_vae_2d`).

    Built from a loaded `AutoencoderKLQwenImage` (weights converted on load, as kohya does). Equal to the 3-D model on
    one frame up to float rounding (tests/models/test_vae_2d.py); bench/vae_2d.py measures the speed. `chunk_rows` =
    kohya's --vae_chunk_size.
    """

    def __init__(self, model3d: nn.Module, chunk_rows: int | None = None) -> None:
        super().__init__()
        self._convs_holder = _Convs()
        self.chunk_rows = chunk_rows
        self.encoder = _Coder2d(model3d.encoder, self._convs_holder, encoder=True)
        self.decoder = _Coder2d(model3d.decoder, self._convs_holder, encoder=False)
        self.quant_conv = _conv2d_from_causal(model3d.quant_conv)
        self.post_quant_conv = _conv2d_from_causal(model3d.post_quant_conv)

    @property
    def chunk_rows(self) -> int | None:
        return self._convs_holder.chunk_rows

    @chunk_rows.setter
    def chunk_rows(self, rows: int | None) -> None:
        if rows is not None and rows < 1:
            raise ValueError(f"vae_chunk_size must be >= 1, got {rows}")
        self._convs_holder.chunk_rows = rows

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [−1, 1] -> posterior mean [B, 16, H/8, W/8]."""
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : moments.shape[1] // 2]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent [B, 16, h, w] -> pixels [B, 3, 8h, 8w] clamped to [−1, 1] (as diffusers does)."""
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)


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
                 batch_size: int = DEFAULT_BATCH_SIZE, two_d: bool = True, chunk_rows: int | None = None) -> None:
        self.model = model.eval().requires_grad_(False)  # the 3-D diffusers model (the weights as loaded)
        # the 2-D path for single images: its own copy of the last temporal kernel slices (~1/3 of the
        # conv weights more; the activation memory it saves is far larger)
        self.model2d = VAE2D(self.model, chunk_rows).eval() if two_d else None
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
            x = (chunk.to(self.device, torch.float32) * 2.0 - 1.0).to(self.dtype)
            if self.model2d is not None:
                moments = self.model2d.encode_mean(x).unsqueeze(2)
            else:
                moments = self.model.encode(x.unsqueeze(2)).latent_dist.mean
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
            if self.model2d is not None:
                pixels = self.model2d.decode(z[:, :, 0])
            else:
                pixels = self.model.decode(z).sample[:, :, 0]  # diffusers clamps to [-1, 1]
            out.append(pixels.float().to(latents.device))
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Normalised latents [B,16,1,h,w] -> images [B,3,8h,8w] in [0,1] (ComfyUI's `(x+1)/2`, clamped)."""
        pixels = self.decode_raw(denormalize_latents(latents), batch_size=batch_size)
        return ((pixels + 1.0) / 2.0).clamp_(0.0, 1.0)


def _sources(path: str | Path) -> list[tuple[Path, str]]:
    """Check the file is a 16-channel Qwen-Image VAE (alone, in a bundle or a diffusers-layout folder);
    [(file, key prefix)] to read it from."""
    info = expect_kind(path, VAE_FLAG, ("qwen_image_vae", "anima_bundle", "anima_diffusers"))
    if Path(path).is_dir():  # a diffusers-layout root or its vae/ folder
        folder = Path(info.components["vae"]) if "vae" in info.components else find_layout(path)[0].folder(
            "vae", VAE_FLAG)
        check_component_config(folder, VAE_FLAG)
        config = read_config(folder)
        for key, ours in (("latents_mean", LATENTS_MEAN), ("latents_std", LATENTS_STD)):
            if key in config and config[key] is not None and [float(v) for v in config[key]] != list(ours):
                raise ModelFileError(f"{VAE_FLAG}: {folder / 'config.json'} sets {key} = {config[key]}, not the "
                                     "Wan 2.1 latent statistics Anima (and ComfyUI) normalise with: another VAE")
        return [(f, "") for f in weight_files(folder, VAE_FLAG)]
    return [(Path(path), _state_dict_prefix(path, info))]


def _state_dict_prefix(path: str | Path, info: FileInfo) -> str:
    """The key prefix of the VAE in a single file (alone or in a bundle)."""
    if info.kind == "anima_bundle":
        if "vae" not in info.components:
            raise WrongModelFileError(f"{VAE_FLAG} expects a Qwen-Image / Wan 2.1 VAE, but {path} is "
                                      f"{info.description} without a VAE (components: {sorted(info.components)})")
        return VAE_BUNDLE_PREFIX
    return info.prefix


def load_vae(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             batch_size: int = DEFAULT_BATCH_SIZE, two_d: bool = True, chunk_rows: int | None = None) -> AnimaVAE:
    """Load the Anima VAE from a single .safetensors file (ComfyUI or diffusers layout, or a `vae.` bundle) or a
    diffusers-layout folder (its root or `vae/`).

    `two_d` (default, kohya's --qwen_image_vae_2d) converts it to the 2-D model for single images (faster,
    less memory, equal up to rounding); False keeps diffusers' 3-D model. `chunk_rows` = --vae_chunk_size
    (2-D path only).

    Wrong files (a DiT, a LoRA, the 48-channel Wan 2.2 VAE, …) raise `WrongModelFileError` naming `--vae`.
    Tensors are read one at a time straight into `dtype`/`device` and assigned to a meta skeleton, so
    peak memory is one copy of the weights.
    """
    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    for file, prefix in _sources(path):
        state.update(load_state_dict(file, prefix=prefix, dtype=dtype, device=device))
    state_dict = convert_vae_state_dict(state)
    conv_in = state_dict.get("encoder.conv_in.weight")
    model = build_vae_skeleton(conv_in.shape[0] if conv_in is not None else VAE_CONFIG["base_dim"])
    try:
        assign_state_dict(model, state_dict, source=str(path))
    except ModelFileError as e:
        raise WrongModelFileError(f"{VAE_FLAG}: {e}") from None
    return AnimaVAE(model, dtype=dtype, device=device, batch_size=batch_size, two_d=two_d, chunk_rows=chunk_rows)
