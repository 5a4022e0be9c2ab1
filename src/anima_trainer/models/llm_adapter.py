"""The Anima LLM adapter: T5 token ids query Qwen3 hidden states and become the DiT's 1024-d context.

Module paths equal the checkpoint keys under `llm_adapter.` (`embed`, `blocks.N.{self,cross}_attn.*`,
`blocks.N.norm_*`, `blocks.N.mlp.{0,2}`, `out_proj`, `norm`), so a LoRA key is the parameter's name.
ComfyUI runs it once per prompt on the unpadded tokens; we run batches with key masks, which gives the
same rows (right padding keeps RoPE positions, masked keys drop out of every softmax).
"""

from __future__ import annotations

import torch
from torch import nn

from anima_trainer.models.layers import QKNormAttentionBase, RMSNorm, apply_rotary, attention

CONTEXT_ROWS = 512  # the DiT always sees at least 512 context rows; the zero rows act as an attention sink


class LLMAdapterAttention(QKNormAttentionBase):
    """Attention with rotary embedding on q and k (in cross-attention too: q by T5, k by Qwen position)."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__(dim, context_dim, heads)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                rope_k: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.project(x, context)
        q = apply_rotary(q, *rope_q, in_fp32=False)
        k = apply_rotary(k, *rope_k, in_fp32=False)
        return self.o_proj(attention(q, k, v, key_mask))


class LLMAdapterBlock(nn.Module):
    """Pre-norm block: self-attention over T5 positions, cross-attention to Qwen states, GELU MLP."""

    def __init__(self, dim: int, source_dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm_self_attn = RMSNorm(dim)
        self.self_attn = LLMAdapterAttention(dim, dim, heads)
        self.norm_cross_attn = RMSNorm(dim)
        self.cross_attn = LLMAdapterAttention(dim, source_dim, heads)
        self.norm_mlp = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor, source: torch.Tensor, rope_t5: tuple[torch.Tensor, torch.Tensor],
                rope_qwen: tuple[torch.Tensor, torch.Tensor], t5_mask: torch.Tensor | None,
                qwen_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_self_attn(x)
        x = x + self.self_attn(h, h, rope_t5, rope_t5, t5_mask)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, rope_t5, rope_qwen, qwen_mask)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """6 blocks of width 1024 (16 heads of 64) by default; shapes come from the checkpoint."""

    def __init__(self, vocab: int = 32128, dim: int = 1024, source_dim: int = 1024, blocks: int = 6,
                 heads: int = 16, mlp_dim: int = 4096, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.rope_theta = rope_theta
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LLMAdapterBlock(dim, source_dim, heads, mlp_dim) for _ in range(blocks))
        self.out_proj = nn.Linear(dim, dim)
        self.norm = RMSNorm(dim)

    def rope(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF-Llama rotary tables for positions 0..length-1, computed in fp32, cast to the activation dtype."""
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                                                           device=like.device) / self.head_dim))
        pos = torch.arange(length, dtype=torch.float32, device=like.device)
        angles = torch.outer(pos, inv_freq)
        emb = torch.cat((angles, angles), dim=-1)[None, :, None, :]
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)

    def forward(self, qwen_hidden: torch.Tensor, t5_ids: torch.Tensor, qwen_mask: torch.Tensor | None = None,
                t5_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(t5_ids)
        source = qwen_hidden.to(x.dtype)
        rope_t5 = self.rope(x.shape[1], x)
        rope_qwen = self.rope(source.shape[1], x)
        for block in self.blocks:
            x = block(x, source, rope_t5, rope_qwen, t5_mask, qwen_mask)
        return self.norm(self.out_proj(x))


def pad_context(context: torch.Tensor, rows: int = CONTEXT_ROWS) -> torch.Tensor:
    """Zero-pad [B, S, C] to at least `rows` rows; longer contexts are kept whole (ComfyUI never truncates)."""
    if context.shape[1] >= rows:
        return context
    pad = context.new_zeros(context.shape[0], rows - context.shape[1], context.shape[2])
    return torch.cat((context, pad), dim=1)


def _all_true(mask: torch.Tensor | None) -> bool:
    return mask is None or bool(mask.to(torch.bool).all())


def build_context(llm_adapter: LLMAdapter, qwen_hidden: torch.Tensor, t5_ids: torch.Tensor,
                  qwen_mask: torch.Tensor | None = None, t5_mask: torch.Tensor | None = None,
                  t5_weights: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI's context: adapter output × per-token T5 weight, padded T5 rows zeroed, padded to 512 rows.

    Masks are [B, S] with 1 = real token; omitted or all-ones masks run without masking (faster, and what
    ComfyUI does for a single prompt).
    """
    qm = None if _all_true(qwen_mask) else qwen_mask.to(device=t5_ids.device, dtype=torch.bool)
    tm = None if _all_true(t5_mask) else t5_mask.to(device=t5_ids.device, dtype=torch.bool)
    out = llm_adapter(qwen_hidden, t5_ids, qm, tm)
    if t5_weights is not None:
        out = out * t5_weights.to(device=out.device, dtype=out.dtype).unsqueeze(-1)
    if tm is not None:
        out = out * tm.to(out.dtype).unsqueeze(-1)
    return pad_context(out)
