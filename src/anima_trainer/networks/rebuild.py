"""Rebuild the exact network an adapter file describes, from the file alone (kohya's `--dim_from_weights`).

The tensors decide everything structural: the algorithm, the target modules, each module's rank and alpha,
LoKr's factor shapes and which factors are decomposed, DoRA (`.dora_scale`), and `train_norm` (`.w_norm`).
Any naming the loaders read works (ComfyUI, kohya, PEFT/diffusers: converted by networks/convert.py first).
Text-encoder modules (`text_encoders.qwen3_06b.transformer.model.*`, `lora_te_*`) are rebuilt on the Qwen3
given as `text_encoder=`; a file without DiT modules gives a text-encoder-only network.
A module without `.alpha` gets alpha = rank, i.e. scale 1, which is what ComfyUI applies to such a file.
Only LoKr with both factors full has no rank in its tensors: its `dim` is taken from `ss_network_dim` when
that is a number (it does not change the math: ComfyUI applies such a module with scale 1).

Training-only network_args (rank/module dropout, LoRA+, network_reg_lrs, verbose) still come from the
caller; structural ones (targets, dims, layout) are the file's, and a caller's value for them is ignored with
a warning that names them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anima_trainer.networks import loha, lokr, lora
from anima_trainer.networks.base import AdapterNetwork, find_norms
from anima_trainer.networks.convert import read_comfy_named, read_network
from anima_trainer.networks.formats import (
    ALL_SUFFIXES,
    COMFY_PREFIX,
    TE_COMFY_PREFIX,
    TE_NAME_PREFIX,
    NetworkError,
    alpha_value,
    check_network_file,
)

log = logging.getLogger(__name__)

# network_args that the file decides (ignored with a warning when given together with a file)
STRUCTURAL_ARGS = ("include_patterns", "exclude_patterns", "train_llm_adapter", "train_norm", "network_reg_dims",
                   "factor", "full_matrix", "decompose_both", "dora_wd", "train_adaln", "train_final_layer",
                   "train_embedders")
LORA_NAMES = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up",
              ".lora_B.weight": "up"}


def group_modules(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}} of a ComfyUI-named state dict (DiT path, or `text_encoder.<path>`)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        suffix = next((s for s in ALL_SUFFIXES if key.endswith(s)), None)
        if suffix is not None and key.startswith(TE_COMFY_PREFIX):
            name = TE_NAME_PREFIX + key[len(TE_COMFY_PREFIX): -len(suffix)]
        elif suffix is not None and key.startswith(COMFY_PREFIX):
            name = key[len(COMFY_PREFIX): -len(suffix)]
        else:
            raise NetworkError(f"key {key} is not an adapter weight")
        out.setdefault(name, {})[suffix] = t
    return out


def _algorithm(path: str, slot: dict[str, torch.Tensor]) -> str:
    names = set(slot) - {".alpha", ".dora_scale"}
    kinds = {"lora" if s in LORA_NAMES else "loha" if s.startswith(".hada_") else
             "lokr" if s.startswith(".lokr_") else s for s in names}
    if len(kinds) != 1 or next(iter(kinds)) not in ("lora", "loha", "lokr"):
        raise NetworkError(f"module {path}: {sorted(names)} is not one LoRA, LoHa or LoKr module "
                           "(diff/set_weight/Tucker files cannot be trained further)")
    return kinds.pop()


def _alpha(slot: dict[str, torch.Tensor], rank: int, key: str = ".alpha") -> float:
    return alpha_value(slot[".alpha"], key) if ".alpha" in slot else float(rank)


def lora_spec(path: str, slot: dict[str, torch.Tensor], org: nn.Linear) -> tuple[int, float, dict[str, Any]]:
    parts = {LORA_NAMES[s]: t for s, t in slot.items() if s in LORA_NAMES}
    if set(parts) != {"down", "up"} or len(slot) - (".alpha" in slot) - (".dora_scale" in slot) != 2:
        raise NetworkError(f"module {path}: needs exactly one lora_down and one lora_up, has {sorted(slot)}")
    rank = parts["down"].shape[0]
    dora = slot.get(".dora_scale")
    if dora is not None and tuple(dora.shape) != (1, org.in_features):
        raise NetworkError(f"module {path}: dora_scale {tuple(dora.shape)} is not input-axis DoRA "
                           f"[1, {org.in_features}], the only form ComfyUI reproduces and this trainer trains")
    return rank, _alpha(slot, rank, f"{path}.alpha"), {"dora_wd": dora is not None}


def loha_spec(path: str, slot: dict[str, torch.Tensor], org: nn.Linear) -> tuple[int, float, dict[str, Any]]:
    need = {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"}
    if set(slot) - {".alpha"} != need:
        raise NetworkError(f"module {path}: a LoHa module needs exactly {sorted(need)}, has {sorted(slot)}")
    rank = slot[".hada_w1_b"].shape[0]
    if slot[".hada_w2_b"].shape[0] != rank:
        raise NetworkError(f"module {path}: hada_w1 and hada_w2 have different ranks "
                           f"({rank}, {slot['.hada_w2_b'].shape[0]}); this trainer uses one rank per module")
    return rank, _alpha(slot, rank, f"{path}.alpha"), {}


def lokr_spec(path: str, slot: dict[str, torch.Tensor], org: nn.Linear,
              full_dim: int) -> tuple[int, float, dict[str, Any]]:
    names = set(slot) - {".alpha"}
    w1_dec, w2_dec = ".lokr_w1_a" in names, ".lokr_w2_a" in names
    need = ({".lokr_w1_a", ".lokr_w1_b"} if w1_dec else {".lokr_w1"}) | (
        {".lokr_w2_a", ".lokr_w2_b"} if w2_dec else {".lokr_w2"})
    if names != need:
        raise NetworkError(f"module {path}: {sorted(names)} is not a LoKr layout this trainer builds "
                           "(lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b; no Tucker lokr_t2)")
    w1_shape = ((slot[".lokr_w1_a"].shape[0], slot[".lokr_w1_b"].shape[1]) if w1_dec
                else tuple(slot[".lokr_w1"].shape))
    w1_rank = slot[".lokr_w1_b"].shape[0] if w1_dec else 0
    rank = slot[".lokr_w2_b"].shape[0] if w2_dec else (w1_rank if w1_dec else full_dim)
    layout = (tuple(int(v) for v in w1_shape), w1_dec, w2_dec, w1_rank or rank)
    return rank, _alpha(slot, rank, f"{path}.alpha"), {"layout": layout}


def create_network_from_weights(dit: nn.Module, path: str | Path, dropout: float | None = None, *,
                                text_encoder: nn.Module | None = None, **network_args: Any) -> AdapterNetwork:
    """The network `path` describes, injected into `dit` (and `text_encoder`), with the file's weights loaded.

    A file with text-encoder modules needs `text_encoder` (the Qwen3Model); a NetworkError says so otherwise."""
    check_network_file(path)
    sd = read_comfy_named(path, dit, text_encoder, network_has_te=text_encoder is not None)
    _, meta = read_network(path)
    order = {name: i for i, (name, _) in enumerate(dit.named_modules())}  # the DiT's module order
    if text_encoder is not None:  # then the text encoder's, after every DiT module
        order.update({TE_NAME_PREFIX + name: len(order) + i for i, (name, _) in
                      enumerate(text_encoder.named_modules())})
    modules = dict(sorted(group_modules(sd).items(), key=lambda kv: order.get(kv[0], len(order))))
    norm_paths = {p for p, slot in modules.items() if ".w_norm" in slot}
    for p in norm_paths:
        if set(modules[p]) != {".w_norm"}:
            raise NetworkError(f"{path}: {p} has {sorted(modules[p])}; a norm gain carries only w_norm")
        del modules[p]
    if norm_paths and norm_paths != set(find_norms(dit)):
        raise NetworkError(f"{path}: w_norm for {len(norm_paths)} of the DiT's {len(find_norms(dit))} norm gains; "
                           "train_norm trains all of them")
    if not modules:
        raise NetworkError(f"{path}: no LoRA/LoKr/LoHa modules in the file")
    algos = {p: _algorithm(p, slot) for p, slot in modules.items()}
    if len(set(algos.values())) != 1:
        raise NetworkError(f"{path}: mixes algorithms {sorted(set(algos.values()))}; one network has one")
    algo = next(iter(algos.values()))
    full_dim = _int(meta.get("ss_network_dim")) or lokr.FULL_MATRIX_DIM_SENTINEL
    specs = {}
    for p, slot in modules.items():
        # convert_state_dict checked that the module exists
        org = (text_encoder.get_submodule(p[len(TE_NAME_PREFIX):]) if p.startswith(TE_NAME_PREFIX)
               else dit.get_submodule(p))
        try:
            if algo == "lora":
                specs[p] = lora_spec(p, slot, org)
            elif algo == "loha":
                specs[p] = loha_spec(p, slot, org)
            else:
                specs[p] = lokr_spec(p, slot, org, full_dim)
        except NetworkError as e:  # name the file too
            raise (NetworkError(f"{path}: {e}") if str(path) not in str(e) else e) from None
    ignored = sorted(k for k in network_args if k in STRUCTURAL_ARGS)
    if ignored:
        log.warning("%s: the file decides %s (dim_from_weights); the given network_args %s are ignored",
                    path, "targets, ranks and layout", ignored)
    args = {k: v for k, v in network_args.items() if k not in STRUCTURAL_ARGS}
    args["train_norm"] = bool(norm_paths)
    if algo == "lora" and any(spec[2]["dora_wd"] for spec in specs.values()):
        args["dora_wd"] = True  # recorded in ss_network_args of files this network saves
    cls = {"lora": lora.LoRAModule, "loha": loha.LoHaModule, "lokr": lokr.LoKrModule}[algo]
    extra = {"lora": ("dora_wd",), "loha": (), "lokr": lokr.EXTRA_ARGS}[algo]
    first_dim, first_alpha = next(iter(specs.values()))[:2]
    network = AdapterNetwork(dit, cls, first_dim, first_alpha, dropout, args, algo=algo, extra_known=extra,
                             module_specs=specs, text_encoder=text_encoder,
                             train_dit=any(not p.startswith(TE_NAME_PREFIX) for p in specs) or bool(norm_paths))
    network.load_weights(path)
    return network


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
