"""A second, independent oracle for the Anima DiT: diffusers' own implementation.

diffusers (>= 0.42) implements Anima as two models: ``CosmosTransformer3DModel`` (the Cosmos-Predict2
``MiniTrainDIT``) and ``AnimaTextConditioner`` (the LLM adapter).  This module builds both from one
ComfyUI-layout single-file checkpoint (keys ``net.*``) with our own explicit key mapping, and calls
them the way diffusers' Anima modular pipeline does (``diffusers/modular_pipelines/anima``):

* conditioner (``AnimaConditionStep._condition_prompt_embeds``): ``text_conditioner(source_hidden_states=
  qwen, target_input_ids=t5_ids, target_attention_mask=t5_mask, source_attention_mask=qwen_mask)`` on a
  right-padded batch; the conditioner zeroes the padded T5 rows and zero-pads to ``min_sequence_length``
  = 512 rows itself.  The Qwen states are zeroed at padded positions first (``_get_qwen_prompt_embeds``).
  The pipeline has no prompt weights; we multiply the per-token T5 weights afterwards, as ComfyUI does.
  ``mode="per_sample"`` instead runs the conditioner like ComfyUI: one sample at a time, on the unpadded
  valid tokens, without masks.
* transformer (``AnimaLoopBeforeDenoiser`` / ``AnimaLoopDenoiser``): ``timestep = t / num_train_timesteps``
  where ``t`` is the ``FlowMatchEulerDiscreteScheduler`` timestep ``= sigma * 1000``, i.e. the DiT gets
  **sigma in [0, 1]** (the same as ComfyUI's ``t = sigma * multiplier 1.0``); ``padding_mask`` = zeros
  ``[1, 1, H_px, W_px]`` (pixel size, resized by the model to the latent size with nearest interpolation);
  ``fps`` None; ``encoder_hidden_states`` = the conditioner output.

Known deviation of diffusers from ComfyUI (see tests/models/test_diffusers_oracle.py): diffusers'
``CosmosTransformerBlock`` builds its attention layers with ``Attention(qk_norm="rms_norm")`` without
passing ``eps``, so the DiT's q/k RMSNorms use diffusers' default ``eps=1e-5`` instead of the checkpoint's
``1e-6``.  :func:`dit_qk_norm_eps` switches it temporarily to quantify that.

Only facts (class names, config fields, module names) were taken from diffusers' source; the code is ours.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from anima_trainer.models.diffusers_layout import anima_key_to_diffusers

DIT_PREFIX = "net."
ADAPTER_PREFIX = "llm_adapter."
CONTEXT_ROWS = 512  # ComfyUI and diffusers both zero-pad the adapter output to at least 512 rows
VAE_SCALE = 8  # the diffusers pipeline builds its padding mask at pixel resolution
# Buffers some derivative exports carry (docs/anima_arch.md §2.1); they hold no learned state.
IGNORED_SOURCE_KEYS = re.compile(r"^pos_embedder\.(seq|dim_spatial_range|dim_temporal_range)$")

# --- key mapping -------------------------------------------------------------------------------------
# ComfyUI / NVIDIA MiniTrainDIT name -> diffusers CosmosTransformer3DModel name: the models layer's table
# (anima_trainer.models.diffusers_layout, which also loads diffusers-layout folders).  Loading diffusers' own
# modules strictly with it, and the outputs matching ours, is what checks that table.
# `llm_adapter.<name>` -> AnimaTextConditioner `<name>`: diffusers kept ComfyUI's adapter names verbatim
# (embed, blocks.{i}.{self,cross}_attn.{q,k,v,o}_proj / {q,k}_norm, norm_{self_attn,cross_attn,mlp},
# mlp.0 / mlp.2 (weight+bias), out_proj (weight+bias), norm), so the adapter mapping is the identity on
# the prefix-stripped name; it is still checked name-by-name and shape-by-shape against the module.


def map_key(key: str) -> tuple[str, str] | None:
    """Model-file key -> ("transformer" | "conditioner", diffusers key); None for ignorable buffers.

    Raises KeyError for any key the mapping does not know (strict).
    """
    name = key[len(DIT_PREFIX):] if key.startswith(DIT_PREFIX) else key
    if name.startswith(ADAPTER_PREFIX):
        return "conditioner", name[len(ADAPTER_PREFIX):]
    mapped = anima_key_to_diffusers(name)
    if mapped is not None:
        return "transformer", mapped
    if IGNORED_SOURCE_KEYS.match(name):
        return None
    raise KeyError(f"no diffusers mapping for checkpoint key {key!r}")


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a ComfyUI-layout Anima state dict to (transformer state dict, conditioner state dict)."""
    out: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "conditioner": {}}
    for key, value in sd.items():
        mapped = map_key(key)
        if mapped is None:
            continue
        part, new_key = mapped
        if new_key in out[part]:
            raise KeyError(f"two checkpoint keys map to {part}.{new_key}")
        out[part][new_key] = value
    return out["transformer"], out["conditioner"]


# --- configs inferred from shapes --------------------------------------------------------------------
def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len(DIT_PREFIX):] if k.startswith(DIT_PREFIX) else k): v for k, v in sd.items()}


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def transformer_config(sd: dict[str, torch.Tensor]) -> dict:
    """CosmosTransformer3DModel config of an Anima checkpoint (Cosmos-Predict2 text2image settings).

    Shapes give width, heads, depth, adaLN-LoRA rank, context width, MLP ratio; the rest is what ComfyUI
    fixes for Anima (docs/anima_arch.md §1): patch (1,2,2), concat padding mask, RoPE NTK extrapolation
    t/h/w = 1/4/4 (diffusers' `rope_scale` is ordered (t, h, w)), no learnable extra pos-emb, max size
    128x240x240 (diffusers sizes its RoPE position table from it: at most 128 latent patches per axis).
    """
    sd = _strip(sd)
    x_w = sd["x_embedder.proj.1.weight"]
    hidden, patch_in = x_w.shape
    patch = (1, 2, 2)
    in_channels = patch_in // (patch[0] * patch[1] * patch[2]) - 1  # -1: the padding-mask channel
    head_dim = sd["blocks.0.self_attn.q_norm.weight"].shape[0]
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    return {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "num_attention_heads": int(hidden // head_dim),
        "attention_head_dim": int(head_dim),
        "num_layers": _count(sd, r"^blocks\.(\d+)\."),
        "mlp_ratio": sd["blocks.0.mlp.layer1.weight"].shape[0] / hidden,
        "text_embed_dim": int(sd["blocks.0.cross_attn.k_proj.weight"].shape[1]),
        "adaln_lora_dim": int(sd["blocks.0.adaln_modulation_self_attn.1.weight"].shape[0]),
        "max_size": (128, 240, 240),
        "patch_size": patch,
        "rope_scale": (1.0, 4.0, 4.0),
        "concat_padding_mask": True,
        "extra_pos_embed_type": None,
    }


def conditioner_config(sd: dict[str, torch.Tensor]) -> dict:
    """AnimaTextConditioner config from the `llm_adapter.*` shapes (6 blocks, 1024, 16 heads in Anima)."""
    sd = _strip(sd)
    p = ADAPTER_PREFIX
    vocab, target_dim = sd[p + "embed.weight"].shape
    model_dim = sd[p + "blocks.0.self_attn.q_proj.weight"].shape[0]
    if p + "in_proj.weight" in sd:
        raise ValueError("adapters with an in_proj (model_dim != target_dim) are not Anima")
    head_dim = sd[p + "blocks.0.self_attn.q_norm.weight"].shape[0]
    return {
        "source_dim": int(sd[p + "blocks.0.cross_attn.k_proj.weight"].shape[1]),
        "target_dim": int(target_dim),
        "model_dim": int(model_dim),
        "num_layers": _count(sd, r"^llm_adapter\.blocks\.(\d+)\."),
        "num_attention_heads": int(model_dim // head_dim),
        "mlp_ratio": sd[p + "blocks.0.mlp.0.weight"].shape[0] / model_dim,
        "target_vocab_size": int(vocab),
        "use_self_attention": True,
        "use_layer_norm": False,
        "min_sequence_length": CONTEXT_ROWS,
    }


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shape = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shape:
        raise KeyError(f"{what}: missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatch {shape[:10]}")
    module.load_state_dict(sd, strict=True, assign=True)


# --- torchvision shim --------------------------------------------------------------------------------
def _ensure_resize_available() -> None:
    """diffusers resizes `padding_mask` with torchvision (imported only when installed); give it a stand-in.

    With torchvision absent, `transformer_cosmos.transforms` is undefined and forward raises NameError.
    The stand-in does what torchvision's tensor NEAREST resize does (`F.interpolate(mode="nearest")`);
    for Anima the mask is all zeros anyway, so the exact resize rule cannot change the result.
    """
    module = sys.modules["diffusers.models.transformers.transformer_cosmos"]
    if hasattr(module, "transforms"):
        return

    def resize(img: torch.Tensor, size: list[int], interpolation: str = "nearest") -> torch.Tensor:
        if interpolation != "nearest":
            raise NotImplementedError(interpolation)
        return F.interpolate(img, size=list(size), mode="nearest")

    module.transforms = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=resize),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
    )


# --- the oracle --------------------------------------------------------------------------------------
@dataclass
class DiffusersOracle:
    transformer: torch.nn.Module  # diffusers.CosmosTransformer3DModel
    conditioner: torch.nn.Module  # diffusers.AnimaTextConditioner

    @torch.no_grad()
    def oracle_context(
        self,
        qwen_hidden: torch.Tensor,
        t5_ids: torch.Tensor,
        t5_weights: torch.Tensor | None = None,
        qwen_lengths: list[int] | torch.Tensor | None = None,
        t5_lengths: list[int] | torch.Tensor | None = None,
        mode: str = "pipeline",
    ) -> torch.Tensor:
        """DiT context [B, max(512, S_t), target_dim] from right-padded Qwen states and T5 ids.

        mode "pipeline": one masked batch call, as diffusers' Anima pipeline does.
        mode "per_sample": ComfyUI's way, each sample alone on its valid tokens, no masks.
        Either way the rows are multiplied by `t5_weights` (ComfyUI prompt weights; the diffusers pipeline
        has none) and rows at and beyond each T5 length are exactly zero.
        """
        b, s_q = qwen_hidden.shape[:2]
        s_t = t5_ids.shape[1]
        q_len = torch.as_tensor(qwen_lengths if qwen_lengths is not None else [s_q] * b).tolist()
        t_len = torch.as_tensor(t5_lengths if t5_lengths is not None else [s_t] * b).tolist()
        dtype = self.conditioner.dtype
        qwen_hidden = qwen_hidden.to(dtype)
        if mode == "pipeline":
            qwen_mask = (torch.arange(s_q)[None, :] < torch.tensor(q_len)[:, None]).long()
            t5_mask = (torch.arange(s_t)[None, :] < torch.tensor(t_len)[:, None]).long()
            ctx = self.conditioner(
                source_hidden_states=qwen_hidden * qwen_mask.to(qwen_hidden).unsqueeze(-1),
                target_input_ids=t5_ids,
                target_attention_mask=t5_mask,
                source_attention_mask=qwen_mask,
            )
        elif mode == "per_sample":
            rows = max(CONTEXT_ROWS, max(t_len))
            ctx = qwen_hidden.new_zeros(b, rows, self.conditioner.config.target_dim)
            for i in range(b):
                out = self.conditioner(
                    source_hidden_states=qwen_hidden[i : i + 1, : q_len[i]],
                    target_input_ids=t5_ids[i : i + 1, : t_len[i]],
                )
                ctx[i, : t_len[i]] = out[0, : t_len[i]]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if t5_weights is not None:
            w = torch.zeros(b, ctx.shape[1], dtype=ctx.dtype)
            for i in range(b):
                w[i, : t_len[i]] = t5_weights[i, : t_len[i]].to(ctx.dtype)
            ctx = ctx * w.unsqueeze(-1)
        return ctx

    @torch.no_grad()
    def oracle_velocity(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Flow velocity [B, C, T, H, W] for latent `x` at noise level `sigma` (shape [B], in [0, 1]).

        Calls the transformer exactly as diffusers' Anima denoise loop does: `timestep` is sigma itself
        (the pipeline passes scheduler timestep / num_train_timesteps = sigma), a zero pixel-size padding
        mask, no fps, no attention mask.  Latent H and W must be even (ComfyUI would circular-pad).
        """
        b, _, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError("diffusers' Anima path needs even latent height/width")
        dtype = self.transformer.dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b)
        padding_mask = torch.zeros(1, 1, h * VAE_SCALE, w * VAE_SCALE, dtype=dtype)
        out = self.transformer(
            hidden_states=x.to(dtype),
            timestep=sigma.to(dtype),
            encoder_hidden_states=context.to(dtype),
            padding_mask=padding_mask,
            return_dict=False,
        )[0]
        return out.float()


def load_diffusers_oracle(path: str | Path, dtype: torch.dtype = torch.float32) -> DiffusersOracle:
    """Build diffusers' Anima transformer + text conditioner from a ComfyUI-layout checkpoint (strict)."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    _ensure_resize_available()
    sd = load_file(str(path))
    t_cfg, c_cfg = transformer_config(sd), conditioner_config(sd)
    t_sd, c_sd = split_state_dict(sd)
    del sd
    t_sd = {k: v.to(dtype) for k, v in t_sd.items()}  # no-op (no copy) when the file already is `dtype`
    c_sd = {k: v.to(dtype) for k, v in c_sd.items()}
    with torch.device("meta"):
        transformer = CosmosTransformer3DModel(**t_cfg)
        conditioner = AnimaTextConditioner(**c_cfg)
    # the meta modules take the checkpoint's tensors as they are (assign, no copy); the non-persistent
    # buffer (the adapter's RoPE inv_freq) is rebuilt on the CPU
    conditioner.rotary_emb = type(conditioner.rotary_emb)(c_cfg["model_dim"] // c_cfg["num_attention_heads"])
    _load_strict(transformer, t_sd, "CosmosTransformer3DModel")
    _load_strict(conditioner, c_sd, "AnimaTextConditioner")
    for module in (transformer, conditioner):
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            raise RuntimeError(f"{type(module).__name__} has a tensor left on the meta device")
    return DiffusersOracle(transformer.eval(), conditioner.eval())


@contextlib.contextmanager
def dit_qk_norm_eps(transformer: torch.nn.Module, eps: float) -> Iterator[None]:
    """Temporarily set the eps of every DiT attention q/k RMSNorm (diffusers builds them with 1e-5)."""
    norms = [m for name, m in transformer.named_modules() if name.endswith(("norm_q", "norm_k"))]
    old = [m.eps for m in norms]
    try:
        for m in norms:
            m.eps = eps
        yield
    finally:
        for m, e in zip(norms, old):
            m.eps = e
