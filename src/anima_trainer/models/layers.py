"""Small building blocks shared by the DiT and the LLM adapter (norms, rotary embedding, attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain; statistics in fp32 so bf16/fp16 inputs stay accurate (as ComfyUI)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return y * self.weight.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX pairing: element i rotates with element i + d/2."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, in_fp32: bool) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin; in fp32 when asked (ComfyUI does this for the DiT), then cast back."""
    if in_fp32 and x.dtype != torch.float32:
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over [B, S, H, D] tensors (returns [B, S, H*D]).

    `key_mask` is [B, S_k] with True = attend.  Rows whose keys are all masked return 0 on every PyTorch
    version (older SDPA gave NaN there), which is what caption dropout with an all-masked text produces.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if key_mask is not None:
        key_mask = key_mask.to(torch.bool)
        mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~key_mask, torch.finfo(q.dtype).min)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if key_mask is not None:
        out = out * key_mask.any(dim=-1).to(out.dtype)[:, None, None, None]
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


class QKNormAttentionBase(nn.Module):
    """q/k/v projections (no bias) with per-head q/k RMSNorm, shared by the DiT and the LLM adapter.

    Subclasses add the output projection under the checkpoint's name (`output_proj` in the DiT, `o_proj` in
    the adapter) and decide where RoPE applies.
    """

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised q, k and plain v as [B, S, heads, head_dim]."""
        b, s, _ = x.shape
        sk = context.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(context).view(b, sk, self.heads, self.head_dim))
        return q, k, self.v_proj(context).view(b, sk, self.heads, self.head_dim)
