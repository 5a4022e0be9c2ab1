"""Weight analysis of an adapter file: what update ΔW each module applies, how large and how low-rank it is, and
where in the model the update's energy goes (docs/evaluation.md, "Weight analysis").

* `analyse_network_file(path, dit=None, text_encoder=None)`: any naming the project reads (ComfyUI, kohya,
  PEFT/diffusers: networks/convert.py renames to ComfyUI names first), every algorithm ComfyUI applies (LoRA
  incl. DoRA, LoKr, LoHa, `diff`/`w_norm` entries of train_norm).
* `analyse_network(network)`: the same for an in-memory AdapterNetwork (its `state_tensors()`).

ΔW is ComfyUI's own math (formats.delta_weight, the code `merge` and `sample` apply) on a zero base weight at
strength 1, so nothing here re-derives a scale or an algorithm.  Singular values use the low-rank structure:
for a LoRA, ΔW·Q with Q an orthonormal basis of `lora_down`'s rows (a QR of the factor) has the singular values of
ΔW and costs out·r² (never a full out×in SVD); a LoKr ΔW = A⊗B is split back into its Kronecker factors
(σ(A⊗B) = σ(A)σ(B)); LoHa, DoRA with base weights and 2-D `diff` take a full SVD of the formed ΔW.
DoRA's update depends on the base weights: with a DiT that holds real weights it is exact, otherwise the
low-rank part scale·B·A is analysed and the module says so.  `set_weight` replaces W and has no ΔW: listed as
skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from anima_trainer.networks.convert import (
    ModuleTable,
    build_meta_dit,
    build_meta_qwen3,
    convert_state_dict,
    read_network,
)
from anima_trainer.networks.formats import (
    TE_NAME_PREFIX,
    NetworkError,
    comfy_key_map,
    delta_weight,
    is_text_encoder_key,
    parse_patches,
)

if TYPE_CHECKING:
    from anima_trainer.networks.base import AdapterNetwork

ALGORITHM_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "diff": "diff", "set": "set_weight"}
# block types in the order tables show them
BLOCK_TYPES = ("self_attn", "cross_attn", "mlp", "adaln", "llm_adapter", "text_encoder", "other")
_BLOCK = re.compile(r"(llm_adapter\.blocks\.\d+|blocks\.\d+|text_encoder\.layers\.\d+)\.")


@dataclass
class ModuleStats:
    """One patched weight.  `energy` = ‖ΔW‖_F²; the rank numbers are None for 1-D updates (norm gains, biases)."""

    target: str  # the model's parameter name, e.g. "blocks.3.self_attn.q_proj.weight"
    algorithm: str
    block: str  # "blocks.3", "llm_adapter.blocks.0", "text_encoder.layers.5", or the top module ("final_layer")
    block_type: str  # one of BLOCK_TYPES
    shape: tuple[int, ...]
    norm: float
    energy: float
    effective_rank: float | None = None  # Roy & Vetterli: exp(entropy of σ_i / Σσ)
    stable_rank: float | None = None  # Σσ² / σ₁²
    top_energy: float | None = None  # σ₁² / Σσ²
    note: str | None = None


@dataclass
class GroupStats:
    """Modules summed per block or per block type; `share` is the group's part of the total ‖ΔW‖_F² (sums to 1)."""

    name: str
    modules: int
    energy: float
    share: float
    norm: float  # sqrt(energy): the Frobenius norm of all the group's updates together
    mean_effective_rank: float | None = None  # over the group's 2-D updates
    mean_top_energy: float | None = None


@dataclass
class NetworkAnalysis:
    """The whole file: every module, the per-type and per-block sums, the modules without a ΔW."""

    file: str
    modules: list[ModuleStats]
    by_type: list[GroupStats]
    by_block: list[GroupStats]
    total_energy: float
    skipped: dict[str, str] = field(default_factory=dict)  # target → why it has no ΔW here

    @property
    def total_norm(self) -> float:
        return math.sqrt(self.total_energy)

    def top_modules(self, n: int = 10) -> list[ModuleStats]:
        """The `n` modules with the largest ‖ΔW‖_F."""
        return sorted(self.modules, key=lambda m: m.energy, reverse=True)[:n]

    def to_dict(self) -> dict:
        """JSON-ready (for `inspect --analysis --json` and the evaluation report)."""
        d = asdict(self)
        d["total_norm"] = self.total_norm
        for m in d["modules"]:
            m["shape"] = list(m["shape"])
        return d


def block_of(target: str) -> str:
    """The block a parameter belongs to: a numbered block, or the top-level module name."""
    m = _BLOCK.match(target)
    return m.group(1) if m else target.split(".")[0]


def block_type_of(target: str) -> str:
    """self_attn / cross_attn / mlp / adaln (every adaLN modulation, the final layer's too) for the DiT's own
    layers, llm_adapter and text_encoder for those models, other for embedders, the final linear, t_embedding_norm."""
    if target.startswith(TE_NAME_PREFIX):
        return "text_encoder"
    if target.startswith("llm_adapter."):
        return "llm_adapter"
    if "adaln_modulation" in target:
        return "adaln"
    if target.startswith("blocks."):
        for kind in ("self_attn", "cross_attn", "mlp"):
            if f".{kind}." in target:
                return kind
    return "other"


def spectrum_stats(sigma: torch.Tensor) -> tuple[float, float, float]:
    """(effective rank, stable rank, top energy) of singular values `sigma` (any order; zeros allowed)."""
    s = sigma.double().clamp_min(0)
    total, energy = float(s.sum()), s.square()
    if total == 0.0:
        return 0.0, 0.0, 0.0
    p = s[s > 0] / total
    effective = math.exp(float(-(p * p.log()).sum()))
    top = float(energy.max()) / float(energy.sum())
    return effective, 1.0 / top, top


def _gram_root(x: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of xᵀx (float64): an r×r matrix with the singular values of the tall x."""
    vals, vecs = torch.linalg.eigh(x.T @ x)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _lora_sigma(patch: tuple, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(σ of ΔW, an r×r core with ΔW's singular values and Frobenius norm) for a plain 2-D LoRA of rank
    r < min(out, in); None for the cases formed in full.

    up = P_u·G_u and downᵀ = P_d·G_d with G the symmetric roots of the r×r Gram matrices (upᵀup, down·downᵀ) and
    P_u, P_d with orthonormal columns (polar decomposition), so ΔW = s·up·down = P_u·(s·G_u·G_d)·P_dᵀ and the core
    s·G_u·G_d has ΔW's singular values.  The core is delta_weight of the same patch with the factors replaced by
    G_u and G_d (same rank: the same alpha/rank scale); only r×r matrices are decomposed, in float64."""
    _, up, down, alpha, mid, dora, reshape = patch
    if mid is not None or dora is not None or reshape is not None or len(shape) != 2 or down.dim() != 2:
        return None
    rank = down.shape[0]
    if rank >= min(shape):
        return None
    g_up, g_down = _gram_root(up.double()), _gram_root(down.double().T)
    core = delta_weight(("lora", g_up, g_down, alpha, None, None, None), torch.zeros(rank, rank), 1.0)
    return torch.linalg.svdvals(core.double()), core


def _kron_sigma(patch: tuple, delta: torch.Tensor) -> torch.Tensor | None:
    """σ of a 2-D LoKr ΔW = A⊗B (A the w1 shape) from its Kronecker factors: σ(A⊗B) = {σ_i(A)·σ_j(B)}.

    The factors are read back from ΔW itself (each a×b block is A_ij·B; B is the largest block, A_ij its
    projection on B), so the scale ComfyUI applies stays delta_weight's."""
    w1, w1a, w1b = patch[1], patch[3], patch[4]
    if delta.dim() != 2:
        return None
    a0, a1 = tuple(w1.shape[:2]) if w1 is not None else (w1a.shape[0], w1b.shape[1])
    b0, b1 = delta.shape[0] // a0, delta.shape[1] // a1
    if a0 * b0 != delta.shape[0] or a1 * b1 != delta.shape[1]:
        return None
    blocks = delta.reshape(a0, b0, a1, b1).permute(0, 2, 1, 3).reshape(a0 * a1, b0 * b1)  # row k: block k flat
    b = blocks[int(blocks.norm(dim=1).argmax())]
    if not bool(b.any()):
        return torch.zeros(1)
    a = (blocks @ b) / b.dot(b)
    sa = torch.linalg.svdvals(a.reshape(a0, a1))
    sb = torch.linalg.svdvals(b.reshape(b0, b1))
    return torch.outer(sa, sb).flatten()


def _module_stats(target: str, patch: tuple, base: torch.Tensor | None) -> ModuleStats | str:
    """ModuleStats of one patch, or the reason it has no ΔW."""
    kind = patch[0]
    if kind == "set":
        return "set_weight replaces the weight: no update to measure"
    dora = kind in ("lora", "loha", "lokr") and patch[-2 if kind == "lora" else -1] is not None
    note = None
    if dora and base is None:  # the low-rank part only: DoRA's rescaling needs the base weight's norms
        idx = 5 if kind == "lora" else len(patch) - 1
        patch = (*patch[:idx], None, *patch[idx + 1:])
        note = "DoRA: low-rank part only (the magnitude rescaling needs the base weights)"
    shape = _shape(patch, base)
    if shape is None:
        return "the update's shape needs the base weight (give the DiT)"
    exact_dora = dora and base is not None  # ΔW = decomposed(W + scale·ΔW_lowrank) − W: formed in full
    sigma = None
    if kind == "lora":
        reduced = _lora_sigma(patch, shape)
        if reduced is not None:
            sigma, delta = reduced
    if sigma is None:
        w0 = base.float() if exact_dora else torch.zeros(shape)
        delta = delta_weight(patch, w0, 1.0) - w0
        if kind == "lokr" and not exact_dora:
            sigma = _kron_sigma(patch, delta)
        if sigma is None and delta.dim() >= 2:
            sigma = torch.linalg.svdvals(delta.flatten(1))
    energy = float(delta.double().square().sum())
    effective = stable = top = None
    if sigma is not None:
        effective, stable, top = spectrum_stats(sigma)
    return ModuleStats(target, ALGORITHM_NAMES[kind], block_of(target), block_type_of(target), tuple(shape),
                       math.sqrt(energy), energy, effective, stable, top, note)


def _shape(patch: tuple, base: torch.Tensor | None) -> tuple[int, ...] | None:
    """The weight shape a patch updates: the base weight's, else what the factors imply."""
    if base is not None:
        return tuple(base.shape)
    kind = patch[0]
    if kind == "diff":
        return tuple(patch[1].shape)
    if kind == "lora":
        up, down = patch[1], patch[2]
        return None if patch[4] is not None else (up.shape[0], *down.shape[1:])
    if kind == "loha":
        return (patch[1].shape[0], patch[2].shape[1])
    w1, w2, w1a, w1b, w2a, w2b = patch[1:7]
    a = w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1])
    b = w2.shape if w2 is not None else (w2a.shape[0], w2b.shape[1])
    return (a[0] * b[0], a[1] * b[1])


def _groups(modules: list[ModuleStats], key: str, order: list[str], total: float) -> list[GroupStats]:
    members: dict[str, list[ModuleStats]] = {}
    for m in modules:
        members.setdefault(getattr(m, key), []).append(m)
    out = []
    for name in order:
        group = members.get(name)
        if not group:
            continue
        energy = sum(m.energy for m in group)
        ranked = [m for m in group if m.effective_rank is not None]
        out.append(GroupStats(name, len(group), energy, energy / total if total else 0.0, math.sqrt(energy),
                              sum(m.effective_rank for m in ranked) / len(ranked) if ranked else None,
                              sum(m.top_energy for m in ranked) / len(ranked) if ranked else None))
    return out


def _block_order(name: str) -> tuple:
    """DiT blocks by index, then the LLM adapter's, the text encoder's, then the other modules by name."""
    m = re.fullmatch(r"(.*?)(\d+)", name)
    rank = {"blocks.": 0, "llm_adapter.blocks.": 1, "text_encoder.layers.": 2}
    if m and m.group(1) in rank:
        return (rank[m.group(1)], int(m.group(2)), "")
    return (3, 0, name)


def analyse_state_dict(sd: Mapping[str, torch.Tensor], dit: nn.Module, text_encoder: nn.Module | None = None,
                       source: str = "<memory>") -> NetworkAnalysis:
    """Analyse adapter tensors under ComfyUI names (what `convert_state_dict(..., "comfy")` gives).

    Base weights are used where `dit` / `text_encoder` hold real ones (DoRA is then exact); on the meta device
    only names and shapes are taken from them."""
    key_map = comfy_key_map(dit, text_encoder)
    patches, loaded = parse_patches(dict(sd), key_map, source=source)
    if not patches:
        raise NetworkError(f"{source}: no adapter tensors (LoRA, LoKr, LoHa, diff) under names this DiT has: not a "
                           "network file")
    params = dict(dit.state_dict(keep_vars=True))
    if text_encoder is not None:
        params.update({TE_NAME_PREFIX + k: v for k, v in text_encoder.state_dict(keep_vars=True).items()})
    modules, skipped = [], {}
    with torch.no_grad():
        for target, patch in sorted(patches.items()):
            p = params.get(target)
            base = p.detach() if p is not None and p.device.type != "meta" else None
            stats = _module_stats(target, patch, base)
            if isinstance(stats, str):
                skipped[target] = stats
            else:
                modules.append(stats)
    total = sum(m.energy for m in modules)
    by_type = _groups(modules, "block_type", list(BLOCK_TYPES), total)
    blocks = sorted({m.block for m in modules}, key=_block_order)
    return NetworkAnalysis(source, modules, by_type, _groups(modules, "block", blocks, total), total, skipped)


def analyse_network_file(path: str | Path, dit: nn.Module | None = None,
                         text_encoder: nn.Module | None = None) -> NetworkAnalysis:
    """Analyse an adapter file in any naming; `dit` defaults to the 2B layout on meta (names only), the text
    encoder to Qwen3-0.6B on meta when the file has text-encoder keys.  A file that is not an adapter file is a
    NetworkError saying so."""
    sd, meta = read_network(path)
    dit = dit if dit is not None else build_meta_dit()
    if text_encoder is None and any(is_text_encoder_key(k) for k in sd):
        text_encoder = build_meta_qwen3()
    try:
        comfy, _ = convert_state_dict(sd, meta, "comfy", ModuleTable.from_dit(dit, text_encoder))
    except NetworkError as e:
        raise NetworkError(f"{path}: not a network file this project reads: {e}") from None
    return analyse_state_dict(comfy, dit, text_encoder, source=str(path))


def analyse_network(network: AdapterNetwork) -> NetworkAnalysis:
    """Analyse an in-memory network (what its file would hold), against its own DiT and text encoder."""
    return analyse_state_dict(network.state_tensors(), network.dit, network.text_encoder)
