"""Small building blocks shared by the DiT and the LLM adapter (norms, rotary embedding, attention).

Two speed levers live here because they are properties of one attention layer (docs/performance.md):
* `attention(..., backends=)`: the SDPA kernels to try first, in order (set per DiT attention module by
  `models.attention_backend.configure_attention`); the flags are a context manager, no host sync.
* fused q/k/v (`QKNormAttentionBase.fuse_qkv`): self-attention runs one GEMM against the three weights
  packed into one storage.  The weights stay three Parameters (views into that storage) under their own
  state-dict keys, so checkpoints, LoRA targets and merges are unchanged and no memory is added.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_log = logging.getLogger(__name__)
# torch >= 2.6 can take the backend list as a priority order; older torch only as an allowed set
_SDPA_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
# the forward patch `networks.base.AdapterModule.forward`: out = org(x) (+ multiplier · branch(x)); see patched_linear()


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain; statistics in fp32 so bf16/fp16 inputs stay accurate (as ComfyUI)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """ComfyUI's RMSNorm maths (the DiT's norms, and a trained norm gain in their place): fp32 statistics for
    half-precision inputs, normalised, rounded to the input's dtype, then scaled by the gain in that dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), gain.to(x.dtype), eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * gain.to(x.dtype)


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              backends: tuple[SDPBackend, ...] | None = None) -> torch.Tensor:
    """SDPA over [B, S, H, D] tensors (returns [B, S, H*D]).

    `key_mask` is [B, S_k] with True = attend.  Rows whose keys are all masked return 0 on every PyTorch
    version (older SDPA gave NaN there), which is what caption dropout with an all-masked text produces.
    `backends`: SDPA kernels in priority order (None = torch's own choice); on torch without priority
    support only the first is allowed.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if key_mask is not None:
        key_mask = key_mask.to(torch.bool)
        mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~key_mask, torch.finfo(q.dtype).min)[:, None, None, :]
    if backends:
        if _SDPA_PRIORITY:
            with sdpa_kernel(list(backends), set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            with sdpa_kernel([backends[0]]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if key_mask is not None:
        out = out * key_mask.any(dim=-1).to(out.dtype)[:, None, None, None]
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


def patched_linear(linear: nn.Linear, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`linear(x)` given `base` = the Linear's own output F.linear(x, W): adds what an injected network adds.

    A network (networks/inject.py) replaces the Linear's forward by its adapter module's forward, which is
    `add_to_output(org(x), x)`; the fused GEMM stands in for org(x) and calls the same method, so the rule
    (multiplier, module_dropout, the random draws in the same order) exists once.  Any other patch runs whole
    (exact, one more GEMM)."""
    if not getattr(linear, "_anima_network_patched", False):
        return base
    add = getattr(getattr(linear.forward, "__self__", None), "add_to_output", None)
    return add(base, x) if callable(add) else linear(x)


def _owners(linears: tuple[nn.Linear, ...]) -> tuple[object, ...]:
    """The network module patched into each Linear (None where none is)."""
    return tuple(getattr(lin.forward, "__self__", None) if getattr(lin, "_anima_network_patched", False)
                 else None for lin in linears)


def _group_method(owners: tuple[object, ...], name: str):
    """`name` of the owners' common class when one network class patches all of them (else None)."""
    kind = type(owners[0])
    return getattr(kind, name, None) if all(type(o) is kind for o in owners) else None


def merged_qkv_weight(linears: tuple[nn.Linear, ...], packed: torch.Tensor) -> torch.Tensor | None:
    """The packed [3·out, in] weight with the patching network's ΔW merged in (LoKr/LoHa with merged_forward),
    or None: then the base GEMM runs on `packed` and `patched_linears` adds the branches."""
    owners = _owners(linears)
    merge = _group_method(owners, "merged_weights_fused")
    return None if merge is None else merge(owners, packed)


def patched_linears(linears: tuple[nn.Linear, ...], x: torch.Tensor,
                    bases: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """`patched_linear` for Linears that share the input `x` (the fused q/k/v): when one network's modules of
    one class patch all of them and that class offers `add_to_outputs_fused` (LoRA: the down projections as one
    GEMM), it adds their branches together; else (or when it returns None) each branch runs on its own."""
    owners = _owners(linears)
    fused = _group_method(owners, "add_to_outputs_fused")
    if fused is not None:
        outs = fused(owners, bases, x)
        if outs is not None:
            return outs
    return [patched_linear(lin, x, base) for lin, base in zip(linears, bases, strict=True)]


class QKNormAttentionBase(nn.Module):
    """q/k/v projections (no bias) with per-head q/k RMSNorm, shared by the DiT and the LLM adapter.

    Subclasses add the output projection under the checkpoint's name (`output_proj` in the DiT, `o_proj` in
    the adapter) and decide where RoPE applies.

    With `fuse_qkv` (set by `set_fused_qkv`), self-attention (`project(x, x)`) computes q, k, v with one GEMM.
    The three weights are packed into one [3·out, in] storage and each Parameter is a view of it
    (`pack_qkv`); `.to()`/`.cuda()` and `load_state_dict` re-pack, in-place writes (merges) go straight into
    the packed storage.  Whenever the weights are not packed (moved by assigning `.data` as block swap does,
    trainable, different dtypes, fp8 Linears) the separate projections run instead, with the same result.
    """

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.fuse_qkv = False
        self.qkv_packed = False  # last result of check_qkv_packed() (what a compiled forward relies on)
        self.register_load_state_dict_post_hook(_repack_after_load)

    # --- packing ---------------------------------------------------------------------------------------------
    def _qkv(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj

    def _qkv_fusable(self) -> bool:
        """Plain Linears (an fp8 Linear's product is not F.linear on its weight) of one shape, dtype, device."""
        q = self.q_proj.weight
        return (q.device.type != "meta"
                and all(type(lin).forward is nn.Linear.forward and lin.bias is None for lin in self._qkv())
                and all(lin.weight.shape == q.shape and lin.weight.dtype == q.dtype and lin.weight.device == q.device
                        for lin in self._qkv()))

    def check_qkv_packed(self) -> bool:
        """Whether the fused GEMM may read the three weights as one [3·out, in] tensor (host-side checks only)."""
        q, k, v = (lin.weight for lin in self._qkv())
        ok = (self._qkv_fusable() and not (q.requires_grad or k.requires_grad or v.requires_grad)
              and q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
        if ok:
            step = q.numel() * q.element_size()
            base = q.untyped_storage().data_ptr()
            ok = (k.data_ptr() == q.data_ptr() + step and v.data_ptr() == q.data_ptr() + 2 * step
                  and k.untyped_storage().data_ptr() == base and v.untyped_storage().data_ptr() == base)
        self.qkv_packed = ok
        return ok

    @torch.no_grad()
    def pack_qkv(self) -> bool:
        """Copy q/k/v weights into one new storage and make each Parameter a view of its rows (no-op when
        already packed).  Returns whether the fused GEMM can now run."""
        if self.check_qkv_packed():
            return True
        if not self._qkv_fusable():
            return False
        q, k, v = (lin.weight for lin in self._qkv())
        packed = torch.cat([q.detach(), k.detach(), v.detach()])
        for w, rows in zip((q, k, v), packed.split(q.shape[0])):
            w.data = rows
        return self.check_qkv_packed()

    def _apply(self, fn, recurse: bool = True):  # torch's signature
        out = super()._apply(fn, recurse)
        if self.fuse_qkv:  # .to()/.cuda()/.half() convert each weight on its own: pack them again
            self.pack_qkv()
        return out

    # --- forward ---------------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised q, k and plain v as [B, S, heads, head_dim]."""
        b, s, _ = x.shape
        if self.fuse_qkv and context is x and (
                self.qkv_packed if torch.compiler.is_compiling() else self.check_qkv_packed()):
            return self._project_fused(x)
        sk = context.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(context).view(b, sk, self.heads, self.head_dim))
        return q, k, self.v_proj(context).view(b, sk, self.heads, self.head_dim)

    def _project_fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One GEMM against the packed weights, then each projection's network branch (if patched) added."""
        b, s, _ = x.shape
        wq = self.q_proj.weight
        n, d_in = wq.shape
        fused = wq.detach().as_strided((3 * n, d_in), (d_in, 1))  # rows of q, k, v (checked adjacent)
        merged = merged_qkv_weight(self._qkv(), fused)
        if merged is not None:  # the network's ΔW merged into the packed weight: nothing to add
            parts = F.linear(x, merged).split(n, dim=-1)
        else:
            parts = patched_linears(self._qkv(), x, F.linear(x, fused).split(n, dim=-1))
        q, k, v = (out.view(b, s, self.heads, self.head_dim) for out in parts)
        return self.q_norm(q), self.k_norm(k), v


def _repack_after_load(module: QKNormAttentionBase, incompatible_keys: object) -> None:
    """load_state_dict(assign=True) puts new tensors in the Parameters: pack them again."""
    if module.fuse_qkv:
        module.pack_qkv()


def set_fused_qkv(model: nn.Module, enabled: bool) -> int:
    """Turn fused q/k/v on or off for every self-attention of `model`'s DiT blocks (`blocks.N.self_attn`).

    On: the weights are packed now (a copy of q/k/v weights while packing, freed after: no lasting memory).
    Off: the views stay valid Parameters; the separate projections run.  Returns how many layers are packed.
    """
    packed = 0
    for name, module in model.named_modules():
        if isinstance(module, QKNormAttentionBase) and name.startswith("blocks.") and name.endswith(".self_attn"):
            module.fuse_qkv = bool(enabled)
            packed += bool(enabled) and module.pack_qkv()
    if enabled:
        _log.info("fused q/k/v: %d self-attention layer(s) packed", packed)
    return packed
