"""MiniTrainDIT as used by Anima (Cosmos-Predict2 DiT + LLM adapter), written to match ComfyUI exactly.

Read top to bottom: patch embedding → timestep embedding (sinusoid, adaLN-LoRA MLP) → 3D RoPE tables →
N blocks (self-attention with RoPE, cross-attention to the 512-row text context, GELU MLP, each gated by
adaLN modulation) → final layer → unpatchify.  Parameter names equal the checkpoint keys (prefix
stripped), so `diffusion_model.<name>` is a ComfyUI LoRA key.

Numerics follow ComfyUI (docs/anima_arch.md §3): the timestep sinusoid and RoPE are computed and applied
in fp32, norms take fp32 statistics, and with fp16 weights the residual stream is kept in fp32 (it
overflows otherwise).  The timestep is σ in [0, 1], never σ·1000.

Speed: RoPE tables are cached per (frames, height, width, device); forward has no host-device syncs and
no einops; every block is a module callable on its own (checkpointing, block swap, per-block compile).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anima_trainer.models.llm_adapter import LLMAdapter, build_context
from anima_trainer.models.block_runner import BlockRunner
from anima_trainer.models.model_files import (DIT_KINDS, DIT_PREFIXES, ModelFileError, DitConfig, FileInfo,
                                             expect_kind, infer_dit_config, load_state_dict, read_header)
from anima_trainer.models.diffusers_layout import (DiffusersLayout, anima_dit_shapes, check_component_config,
                                                   diffusers_key_to_anima, find_layout, weight_files)
from anima_trainer.models.layers import QKNormAttentionBase, RMSNorm, apply_rotary, attention
from anima_trainer.models.renamed_arguments import renamed_argument

log = logging.getLogger(__name__)


class Patchify(nn.Module):
    """[B, C, T, H, W] → [B, T, H/p, W/p, C·p·p] with channel-major features (c, p_h, p_w)."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        p = self.patch
        x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t, h // p, w // p, c * p * p)


class PatchEmbed(nn.Module):
    """`x_embedder.proj` = (patchify, Linear) so the weight key is `x_embedder.proj.1.weight`."""

    def __init__(self, in_features: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(Patchify(patch), nn.Linear(in_features, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TimestepSinusoid(nn.Module):
    """cos ‖ sin features of σ with frequencies exp(-ln(10000)·k/half), always in fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        angles = t.float()[:, None] * torch.exp(exponent)[None, :]
        return torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1)


class TimestepEmbedding(nn.Module):
    """adaLN-LoRA timestep MLP: returns the shared 3·D modulation bias added to every block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


def _adaln(dim: int, rank: int, chunks: int) -> nn.Sequential:
    """SiLU → Linear(D→rank) → Linear(rank→chunks·D): keys `.1.weight`, `.2.weight`."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, rank, bias=False), nn.Linear(rank, chunks * dim, bias=False))


class Attention(QKNormAttentionBase):
    """DiT attention: RoPE only when tables are given (self-attention), no mask (zero context rows count).

    `sdpa_backends`: SDPA kernels in priority order, set by models.attention_backend.configure_attention
    (None = torch's choice); `fuse_qkv`: see QKNormAttentionBase.
    """

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__(dim, context_dim, heads)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.sdpa_backends: tuple | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = self.project(x, context)
        if rope is not None:
            q = apply_rotary(q, *rope, in_fp32=True)
            k = apply_rotary(k, *rope, in_fp32=True)
        return self.output_proj(attention(q, k, v, backends=self.sdpa_backends))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.gelu(self.layer1(x)))


class Block(nn.Module):
    """One DiT block; callable alone with (x, emb, adaln_lora, context, rope).

    x: [B, L, D] residual stream; emb: [B, 1, D] normalised timestep embedding; adaln_lora: [B, 1, 3D].
    """

    def __init__(self, dim: int, context_dim: int, heads: int, mlp_dim: int, adaln_rank: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, dim, heads)
        self.cross_attn = Attention(dim, context_dim, heads)
        self.mlp = MLP(dim, mlp_dim)
        self.adaln_modulation_self_attn = _adaln(dim, adaln_rank, 3)
        self.adaln_modulation_cross_attn = _adaln(dim, adaln_rank, 3)
        self.adaln_modulation_mlp = _adaln(dim, adaln_rank, 3)
        self.dim = dim

    def _norm(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h = F.layer_norm(x, (self.dim,), eps=1e-6)
        return (h * (1 + scale) + shift).to(dtype)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        dtype = emb.dtype  # compute dtype; x may be an fp32 residual stream
        shift, scale, gate = (self.adaln_modulation_self_attn(emb) + adaln_lora).chunk(3, dim=-1)
        h = self._norm(x, shift, scale, dtype)
        x = torch.addcmul(x, gate, self.self_attn(h, h, rope))
        shift, scale, gate = (self.adaln_modulation_cross_attn(emb) + adaln_lora).chunk(3, dim=-1)
        x = torch.addcmul(x, gate, self.cross_attn(self._norm(x, shift, scale, dtype), context))
        shift, scale, gate = (self.adaln_modulation_mlp(emb) + adaln_lora).chunk(3, dim=-1)
        return torch.addcmul(x, gate, self.mlp(self._norm(x, shift, scale, dtype)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + Linear to p·p·C_out features per token."""

    def __init__(self, dim: int, out_features: int, adaln_rank: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_features, bias=False)
        self.adaln_modulation = _adaln(dim, adaln_rank, 2)
        self.dim = dim

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[..., : 2 * self.dim]).chunk(2, dim=-1)
        h = F.layer_norm(x, (self.dim,), eps=1e-6) * (1 + scale) + shift
        return self.linear(h.to(emb.dtype))


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) rotary dims: h = w = head_dim//6·2, t gets the rest (44/42/42 for head_dim 128)."""
    dim_h = head_dim // 6 * 2
    return head_dim - 2 * dim_h, dim_h, dim_h


def rope_tables(head_dim: int, frames: int, height: int, width: int, device: torch.device | str,
                hw_extrapolation: float = 4.0, t_extrapolation: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [1, T·H·W, 1, head_dim] of the 3D RoPE (NTK-scaled θ on h/w), token order (t, h, w)."""
    dim_t, dim_h, dim_w = rope_axis_dims(head_dim)

    def freqs(dim: int, ratio: float) -> torch.Tensor:
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        rng = torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim
        return 1.0 / (theta ** rng)

    ft, fh, fw = freqs(dim_t, t_extrapolation), freqs(dim_h, hw_extrapolation), freqs(dim_w, hw_extrapolation)
    at = torch.outer(torch.arange(frames, dtype=torch.float32, device=device), ft)
    ah = torch.outer(torch.arange(height, dtype=torch.float32, device=device), fh)
    aw = torch.outer(torch.arange(width, dtype=torch.float32, device=device), fw)
    angles = torch.cat((at[:, None, None, :].expand(frames, height, width, -1),
                        ah[None, :, None, :].expand(frames, height, width, -1),
                        aw[None, None, :, :].expand(frames, height, width, -1)), dim=-1)
    angles = angles.reshape(frames * height * width, head_dim // 2)
    angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]
    return angles.cos(), angles.sin()


class AnimaDiT(nn.Module):
    """The Anima diffusion model: `dit(x, σ, context)` → velocity (noise − x0)."""

    def __init__(self, config: DitConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or DitConfig()
        dim, p = c.model_channels, c.patch_spatial
        self.x_embedder = PatchEmbed((c.in_channels + 1) * p * p * c.patch_temporal, dim, p)
        self.t_embedder = nn.Sequential(TimestepSinusoid(dim), TimestepEmbedding(dim))
        self.t_embedding_norm = RMSNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, c.crossattn_dim, c.num_heads, c.mlp_dim, c.adaln_lora_dim)
                                    for _ in range(c.num_blocks))
        self.final_layer = FinalLayer(dim, p * p * c.patch_temporal * c.out_channels, c.adaln_lora_dim)
        self.llm_adapter = (LLMAdapter(c.llm_adapter_vocab, c.llm_adapter_dim, c.llm_adapter_source_dim,
                                       c.llm_adapter_blocks, c.llm_adapter_heads, c.llm_adapter_mlp_dim)
                            if c.has_llm_adapter else None)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # None = fp32 residual stream whenever weights are reduced precision: fp16 overflows without it and
        # bf16 halves its error against ComfyUI's fp32 output (rel. L2 0.0105 → 0.0057 on the fixture).
        self.residual_fp32: bool | None = None
        # the block loop's memory settings (block_runner.setup_memory): gradient checkpointing of the first N
        # blocks, "full" or "selective" recompute, residuals parked on the CPU, block weights streamed from the CPU
        self.runner = BlockRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj[1].weight.dtype

    def rope(self, frames: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached RoPE tables for one latent grid (in patches)."""
        key = (frames, height, width, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.config.head_dim, frames, height, width, device)
        return self._rope_cache[key]

    def encode_context(self, qwen_hidden: torch.Tensor, t5_ids: torch.Tensor, qwen_mask: torch.Tensor | None = None,
                       t5_mask: torch.Tensor | None = None, t5_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LLM adapter and return the zero-padded [B, 512, 1024] context exactly as ComfyUI builds it."""
        if self.llm_adapter is None:
            raise ModelFileError("this DiT file has no llm_adapter.* weights; pass the adapter file "
                                 "(load_dit(..., llm_adapter_path=FILE), CLI --llm_adapter_path)")
        device = self.llm_adapter.embed.weight.device
        return build_context(self.llm_adapter, qwen_hidden.to(device), t5_ids.to(device), qwen_mask, t5_mask,
                             t5_weights)

    def embed(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens [B, L, D], normalised timestep embedding [B, 1, D] and adaLN-LoRA bias [B, 1, 3D]."""
        dtype = self.dtype
        x = torch.cat((x, x.new_zeros(x.shape[0], 1, *x.shape[2:])), dim=1)  # padding-mask channel (zeros)
        tokens = self.x_embedder(x.to(dtype))
        tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
        sinusoid = self.t_embedder[0](timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1
                                      else timesteps.reshape(-1)).to(dtype)
        adaln_lora = self.t_embedder[1](sinusoid)[:, None, :]
        emb = self.t_embedding_norm(sinusoid)[:, None, :]
        return tokens, emb, adaln_lora

    def unpatchify(self, out: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """[B, L, p·p·C] with channel-minor features (p_h, p_w, c) → [B, C, T, H·p, W·p]."""
        p, c = self.config.patch_spatial, self.config.out_channels
        b = out.shape[0]
        out = out.view(b, frames, height, width, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, c, frames, height * p, width * p)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B,16,T,H,W] normalised latents, timesteps σ∈[0,1] [B], context [B,≥512,1024] → velocity."""
        in_dtype = x.dtype
        _, _, frames, h0, w0 = x.shape
        p = self.config.patch_spatial
        pad_h, pad_w = (-h0) % p, (-w0) % p
        if pad_h or pad_w:  # ComfyUI pads odd latents circularly and crops the output
            x = F.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="circular")
        height, width = x.shape[3] // p, x.shape[4] // p
        tokens, emb, adaln_lora = self.embed(x, timesteps)
        rope = self.rope(frames, height, width, tokens.device)
        context = context.to(self.dtype)
        fp32_residual = self.residual_fp32 if self.residual_fp32 is not None else self.dtype != torch.float32
        if fp32_residual:
            tokens = tokens.float()
        tokens = self.runner(self.blocks, tokens, emb, adaln_lora, context, rope)  # checkpointing, offload, swap
        out = self.final_layer(tokens, emb, adaln_lora)
        out = self.unpatchify(out, frames, height, width)[:, :, :, :h0, :w0]
        return out.to(in_dtype)


def load_dit(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             llm_adapter_path: str | Path | None = None, flag: str = "--pretrained_model_name_or_path",
             adapter_path: str | Path | None = None) -> AnimaDiT:
    """Load an Anima DiT (28/40-block or tiny) from a single .safetensors file or a diffusers-layout folder,
    config inferred from shapes.

    Accepts `net.`, `model.diffusion_model.`, `diffusion_model.` or no prefix, all-in-one bundles, and a
    diffusers folder (its root or `transformer/`; the LLM adapter then comes from `text_conditioner/`) or one
    diffusers transformer weights file; `llm_adapter_path` supplies (or replaces) the LLM adapter from a separate
    file, a `text_conditioner/` folder or a diffusers-layout root.  Known non-weight keys (RoPE tables, training
    counters, `_extra_state`) are skipped with a log line; keys outside the DiT's prefix are ignored as ComfyUI
    ignores them, unless they are DiT weights found nowhere else (then the file is refused, naming one).
    Tensors are read one at a time from the mmap straight into `dtype` on `device`; the model itself is built on
    the meta device.  `adapter_path` is the old spelling of `llm_adapter_path` (still accepted, warned).
    """
    llm_adapter_path = renamed_argument("load_dit", "llm_adapter_path", llm_adapter_path, "adapter_path",
                                        adapter_path)
    info = expect_kind(path, flag, DIT_KINDS)
    if info.kind == "diffusers_dit":  # one transformer weights file; its text_conditioner/ sibling if it has one
        found = find_layout(Path(path).parent)
        layout = DiffusersLayout(None, {"dit": Path(path)})
        if found is not None and found[1] == "dit" and "llm_adapter" in found[0].folders:
            layout.folders["llm_adapter"] = found[0].folders["llm_adapter"]
        with_llm_adapter = llm_adapter_path is None and "llm_adapter" in layout.folders
        shapes = anima_dit_shapes(layout, flag, with_llm_adapter=with_llm_adapter)
        state = _diffusers_state(layout, flag, dtype, device, with_llm_adapter=with_llm_adapter)
    elif info.kind == "anima_diffusers":
        layout = find_layout(path)[0]
        shapes = anima_dit_shapes(layout, flag, with_llm_adapter=llm_adapter_path is None)
        state = _diffusers_state(layout, flag, dtype, device, with_llm_adapter=llm_adapter_path is None)
    else:
        prefix = info.components.get("dit", info.prefix)
        header = read_header(path)[0]
        shapes = {k[len(prefix):]: s for k, (_, s) in header.items() if k.startswith(prefix)}
        _check_outside_prefix(path, header, prefix, info.components, llm_adapter_given=llm_adapter_path is not None)
        state = load_state_dict(path, prefix=prefix, dtype=dtype, device=device)
    if llm_adapter_path is not None:
        ainfo = expect_kind(llm_adapter_path, "--llm_adapter_path", ("llm_adapter", "anima_dit", "anima_diffusers"))
        shapes = {k: s for k, s in shapes.items() if not k.startswith("llm_adapter.")}
        state = {k: v for k, v in state.items() if not k.startswith("llm_adapter.")}
        for file, llm_adapter_prefix in _llm_adapter_sources(Path(llm_adapter_path), ainfo):
            shapes.update({"llm_adapter." + k[len(llm_adapter_prefix):]: s for k, (_, s) in
                           read_header(file)[0].items() if k.startswith(llm_adapter_prefix)})
            state.update({"llm_adapter." + k: v for k, v in
                          load_state_dict(file, prefix=llm_adapter_prefix, dtype=dtype, device=device).items()})
    config = infer_dit_config(shapes)
    with torch.device("meta"):
        model = AnimaDiT(config)
    if info.kind == "anima_bundle":  # other components share the file; keep only DiT keys
        state = {k: v for k, v in state.items() if k in shapes}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelFileError(f"{path}: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected "
                             f"keys {unexpected[:5]} for an Anima DiT with {config.num_blocks} blocks")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _llm_adapter_sources(path: Path, info: FileInfo) -> list[tuple[Path, str]]:
    """[(file, key prefix)] of an LLM adapter: a file (bare or `llm_adapter.` keys, or a whole DiT) or a
    diffusers `text_conditioner/` folder (its shards, bare keys)."""
    if path.is_dir():  # text_conditioner/ itself, or a diffusers-layout root that has one
        folder = Path(info.components["llm_adapter"]) if "llm_adapter" in info.components else find_layout(
            path)[0].folder("llm_adapter", "--llm_adapter_path")
        return [(f, "") for f in weight_files(folder, "--llm_adapter_path")]
    return [(path, info.prefix if info.kind == "llm_adapter" else info.prefix + "llm_adapter.")]


def _diffusers_state(layout: DiffusersLayout, flag: str, dtype: torch.dtype, device: str | torch.device,
                     with_llm_adapter: bool) -> dict[str, torch.Tensor]:
    """The DiT state dict (our names) of a diffusers-layout folder: `transformer/` renamed key by key (a key with
    no DiT name is an error naming it), `text_conditioner/` as `llm_adapter.*`; configs checked for settings
    the shapes cannot show."""
    dit_dir = layout.folder("dit", flag)
    files = [dit_dir] if dit_dir.is_file() else weight_files(dit_dir, flag)
    check_component_config(dit_dir.parent if dit_dir.is_file() else dit_dir, flag)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, t in load_state_dict(file, dtype=dtype, device=device).items():
            name = diffusers_key_to_anima(key)
            if name is None:
                raise ModelFileError(f"{flag}: {file}: the key {key!r} is no CosmosTransformer3DModel weight of an "
                                     "Anima DiT (another model in Anima's folder layout?)")
            state[name] = t
    if with_llm_adapter:
        llm_adapter_dir = layout.folder("llm_adapter", flag)
        check_component_config(llm_adapter_dir, flag)
        for file in weight_files(llm_adapter_dir, flag):
            state.update({"llm_adapter." + k: v for k, v in load_state_dict(file, dtype=dtype, device=device).items()})
    return state


def _check_outside_prefix(path: str | Path, header: dict, prefix: str, components: dict[str, str],
                          llm_adapter_given: bool) -> None:
    """Keys outside the DiT's prefix (and outside a bundle's other parts) are ignored as ComfyUI's prefix filter
    ignores them, with a log line: EMA counters, stray parts of other models, a second copy of the DiT under
    another prefix.  DiT weights that exist only under another prefix (an LLM adapter saved bare next to `net.*`
    blocks) would be lost, giving another model than the file holds, so they stop the load, naming one."""
    if not prefix:
        return
    others = tuple(p for c, p in components.items() if c != "dit" and p)
    outside = [k for k in header if not k.startswith(prefix) and not (others and k.startswith(others))]
    if not outside:
        return
    main = {k[len(prefix):] for k in header if k.startswith(prefix)}
    lost = [k for k in outside if (n := _strip_known_prefix(k)) not in main and _is_dit_weight(n)
            and not (llm_adapter_given and n.startswith("llm_adapter."))]
    if lost:
        raise ModelFileError(f"{path}: the DiT is stored under {prefix!r}, but {lost[0]!r} ({len(lost)} such "
                             "keys) is a DiT weight under another prefix, which ComfyUI would not load either; "
                             "re-save the file with one prefix")
    copies = sum(_strip_known_prefix(k) in main for k in outside)
    log.info("%s: ignored %d keys outside the DiT's prefix %r, as ComfyUI does (e.g. %s)%s", path, len(outside),
             prefix, ", ".join(repr(k) for k in sorted(outside)[:3]),
             f"; {copies} of them repeat names the DiT has under {prefix!r}" if copies else "")


def _strip_known_prefix(key: str) -> str:
    for p in DIT_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _is_dit_weight(name: str) -> bool:
    head = name.split(".", 1)[0]
    return head in _DIT_TOP_MODULES and name.endswith((".weight", ".bias"))


_DIT_TOP_MODULES = frozenset({"x_embedder", "t_embedder", "t_embedding_norm", "blocks", "final_layer", "llm_adapter"})
