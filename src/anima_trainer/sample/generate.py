"""Text → image with the full Anima stack: encode prompts, sample with the flow Euler sampler, decode, save PNG.

The PNG carries every parameter (prompt, negative, seed, steps, cfg, shift, size, model files) as a
`parameters` JSON text chunk, so any image can be reproduced from itself.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, PngImagePlugin

from anima_trainer.fileio import atomic_write_bytes, check_writable
from anima_trainer.sample.prompts import PREVIEW_MAX_SIDE
from anima_trainer.sample.sampler import cfg_velocity, initial_noise, sample_euler, simple_schedule


@dataclass
class SampleParams:
    """Everything that determines an image (recorded in the PNG)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    cfg: float = 4.0
    width: int = 1024
    height: int = 1024
    seed: int = 0
    shift: float = 3.0
    sampler: str = "euler"
    scheduler: str = "simple"
    models: dict[str, str] = field(default_factory=dict)
    networks: dict[str, float] = field(default_factory=dict)  # file name → strength

    def validate(self) -> None:
        """Refuse what cannot make an image, before any model is loaded: a size that is not a positive multiple
        of 16 (0 crashed in the VAE), fewer than one step, and non-finite numbers (`cfg = nan` made a black PNG)."""
        if self.width < 16 or self.height < 16 or self.width % 16 or self.height % 16:
            raise ValueError(f"width and height must be positive multiples of 16 (8 for the VAE × 2 for the DiT "
                             f"patch), got {self.width}x{self.height}")
        if max(self.width, self.height) > PREVIEW_MAX_SIDE:
            raise ValueError(f"width and height must be at most {PREVIEW_MAX_SIDE} px (1024 is Anima's native size), "
                             f"got {self.width}x{self.height}")
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.cfg):
            raise ValueError(f"--cfg must be a finite number (1 = no guidance, 4 is usual), got {self.cfg}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"--shift must be a finite number > 0 (ComfyUI uses 3.0), got {self.shift}")
        for name, strength in self.networks.items():
            if not math.isfinite(strength):
                raise ValueError(f"network {name}: strength must be a finite number, got {strength}")


def encode_prompts(dit, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts → DiT context [B, ≥512, 1024] (Qwen3 + T5 ids → LLM adapter), ComfyUI-exact."""
    enc = text_encoder.encode(prompts)
    return dit.encode_context(enc.qwen_hidden, enc.t5_ids, qwen_mask=enc.qwen_mask, t5_mask=enc.t5_mask,
                              t5_weights=enc.t5_weights)


@torch.no_grad()
def generate_latents(dit, cond: torch.Tensor, uncond: torch.Tensor | None, params: SampleParams,
                     progress: bool = True, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Normalised latents [1, 16, 1, H/8, W/8] for one image."""
    params.validate()
    device = next(dit.parameters()).device
    noise = initial_noise((1, 16, 1, params.height // 8, params.width // 8), params.seed).to(device)
    velocity = cfg_velocity(dit, cond.to(device), None if uncond is None else uncond.to(device), params.cfg)
    return sample_euler(velocity, noise, simple_schedule(params.steps, params.shift), progress=progress,
                        cancel=cancel)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] → 8-bit RGB."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def png_bytes(image: Image.Image, params: SampleParams | dict) -> bytes:
    """PNG with `params` as its `parameters` JSON text chunk (a `SampleParams`, or any plain dict: a grid's)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(params if isinstance(params, dict) else asdict(params), ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, params: SampleParams | dict, path: str | Path, overwrite: bool = False) -> Path:
    """Atomic PNG write with the parameters embedded; refuses to replace an existing file unless asked."""
    check_writable(path, overwrite)
    return atomic_write_bytes(png_bytes(image, params), path, what="image ")


def read_png_parameters(path: str | Path) -> dict:
    """The `parameters` JSON that `save_png` embedded."""
    with Image.open(path) as im:
        return json.loads(im.text["parameters"])


@torch.no_grad()
def prompt_latents(dit, text_encoder, params: SampleParams, progress: bool = True,
                   cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Text → normalised latents (everything of `generate_image` but the VAE decode); the negative prompt is
    encoded the ComfyUI way (empty = `<|endoftext|>` state)."""
    params.validate()
    prompts = [params.prompt] if params.cfg == 1.0 else [params.prompt, params.negative_prompt]
    contexts = [encode_prompts(dit, text_encoder, [p]) for p in prompts]
    return generate_latents(dit, contexts[0], contexts[1] if len(contexts) > 1 else None, params, progress, cancel)


@torch.no_grad()
def generate_image(dit, text_encoder, vae, params: SampleParams, progress: bool = True,
                   cancel: Callable[[], bool] | None = None) -> Image.Image:
    """Full text-to-image: `prompt_latents`, then the VAE decode."""
    return to_pil(vae.decode(prompt_latents(dit, text_encoder, params, progress, cancel))[0])


@torch.no_grad()
def render_previews(dit, text_encoder, vae, prompts, out_dir: str | Path, tag: str, output_name: str,
                    cancel: Callable[[], bool] | None = None, writes: bool = True) -> list[Path]:
    """Training previews: `<out_dir>/<output_name>_<tag>_<NN>_<seed>.png` with ComfyUI's schedule (what the user
    will see after loading the LoRA in ComfyUI), one image per prompt; `cancel` (checked between sampler
    steps) stops them with SamplingCancelled.  `writes` False: the DiT calls only, nothing decoded or written
    (returns []) — the other processes of a sharded fine-tune, whose every DiT forward is a collective that
    the writing process's sampler needs them to join."""
    written = []
    for i, p in enumerate(prompts):
        params = SampleParams(prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps, cfg=p.cfg,
                              width=p.width, height=p.height, seed=p.seed, shift=p.shift)
        latents = prompt_latents(dit, text_encoder, params, progress=False, cancel=cancel)
        if writes:
            path = Path(out_dir) / f"{output_name}_{tag}_{i:02d}_{p.seed}.png"
            written.append(save_png(to_pil(vae.decode(latents)[0]), params, path, overwrite=True))
    return written
