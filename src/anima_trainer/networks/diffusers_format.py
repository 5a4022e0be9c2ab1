"""The adapter layout diffusers' Anima loader reads natively (`save_format = "diffusers"`, `--to diffusers`).

diffusers (>= 0.42) runs Anima as two models, `CosmosTransformer3DModel` (pipeline component `transformer`)
and `AnimaTextConditioner` (component `text_conditioner`, our DiT's `llm_adapter`); its
`AnimaLoraLoaderMixin.load_lora_weights` takes keys `transformer.<diffusers module>.lora_A.weight` /
`.lora_B.weight` and `text_conditioner.<adapter module>.lora_A.weight` / `.lora_B.weight`, where every key must
contain "lora" (an `.alpha` key makes it refuse the whole file) and it passes no alphas to PEFT: without the
`lora_adapter_metadata` header PEFT gets lora_alpha = rank per module, i.e. scale 1.  So this layout folds
ComfyUI's scale alpha/rank into `lora_B` (in fp32, then cast to the file's dtype): every diffusers/PEFT loading
path (a file, or a state dict handed over without its header) then applies what ComfyUI applies.  The
alphas are kept in the metadata key `ALPHAS_META` so that reading the file back (`diffusers_to_comfy`) gives
alpha and lora_up back: bit-exact when alpha/rank is a power of two (then folding is exact), else within one
rounding of lora_up.

What the layout cannot carry is refused before anything is written (NetworkError naming the modules and the
alternative, save_format "comfy"): LoKr and LoHa (the Anima loader accepts only "lora" keys), DoRA
(`dora_scale`: diffusers drops it with a warning, which would change the result), norm-gain and full-weight
diffs (`w_norm`, `diff`, `set_weight`: no LoRA key), LoRA on modules that are not Linear, and text-encoder
modules (`text_encoders.*`: diffusers' Anima loader has no Qwen3 text encoder component).

Module names come from the tables in models/diffusers_layout.py (`DIFFUSERS_TOP`, `DIFFUSERS_BLOCK`; the LLM adapter
keeps its names under `text_conditioner.`), checked against diffusers' own models in
tests/networks/test_diffusers_format.py.  Facts read from diffusers 0.42.1, code ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from anima_trainer.config.rules import DIFFUSERS_ALTERNATIVE as ALTERNATIVE
from anima_trainer.config.rules import DIFFUSERS_LOADER as LOADER
from anima_trainer.config.rules import diffusers_refusal
from anima_trainer.fileio import check_writable
from anima_trainer.tensor_files import NonFiniteError, atomic_save
from anima_trainer.models.diffusers_layout import anima_module_to_diffusers, diffusers_module_to_anima
from anima_trainer.networks.formats import ALL_SUFFIXES, COMFY_PREFIX, LORA_SPELLINGS, NetworkError, alpha_value
from anima_trainer.networks.hashes import with_hashes
from anima_trainer.networks.inject import linear_paths

# diffusers' Anima pipeline components: the DiT under diffusers' names, and the LLM adapter (`llm_adapter.*`
# here) under its own names
TRANSFORMER_PREFIX, CONDITIONER_PREFIX = "transformer.", "text_conditioner."
ADAPTER_PREFIX = "llm_adapter."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# every LoRA spelling ComfyUI reads, longest first (a lora_mid core is refused)
DOWN_SUFFIXES = tuple(sorted((d for _, d, _ in LORA_SPELLINGS), key=len, reverse=True))
UP_SUFFIXES = tuple(sorted((u for u, _, _ in LORA_SPELLINGS), key=len, reverse=True))
# {diffusers key stem: alpha} of the modules whose scale alpha/rank was folded into lora_B
ALPHAS_META = "anima_trainer_diffusers_alphas"

# what a suffix means, for refusals
_KINDS = (("LoHa", (".hada_",)), ("LoKr", (".lokr_",)), ("DoRA (dora_scale)", (".dora_scale",)),
          ("norm-gain diffs (w_norm/b_norm, train_norm)", (".w_norm", ".b_norm")),
          ("full-weight diffs (diff/diff_b/set_weight)", (".diff", ".diff_b", ".set_weight")),
          ("LoCon/Tucker lora_mid or reshape_weight", (".lora_mid.weight", ".reshape_weight")))


def diffusers_stem(path: str) -> str | None:
    """diffusers key stem (`transformer.…` / `text_conditioner.…`) of a DiT module path, or None if none."""
    if path.startswith(ADAPTER_PREFIX):
        return CONDITIONER_PREFIX + path[len(ADAPTER_PREFIX):]
    mapped = anima_module_to_diffusers(path)
    return None if mapped is None else TRANSFORMER_PREFIX + mapped


def comfy_path(stem: str) -> str | None:
    """The DiT module path of a diffusers key stem (inverse of `diffusers_stem`), or None."""
    if stem.startswith(CONDITIONER_PREFIX):
        return ADAPTER_PREFIX + stem[len(CONDITIONER_PREFIX):]
    if stem.startswith(TRANSFORMER_PREFIX):
        return diffusers_module_to_anima(stem[len(TRANSFORMER_PREFIX):])
    return None


def check_diffusers_compatible(algo: str, network_args: Mapping[str, Any] | None = None, *,
                               text_encoder: bool = False, option: str = 'save_format = "diffusers"') -> None:
    """NetworkError when a network of this kind cannot be written in diffusers' layout; call it at start-up
    (train, config) so that a run does not train for hours and fail at its first save.  The rule itself is
    torch-free and lives in config/rules.py (config validation applies it too)."""
    try:
        problem = diffusers_refusal(algo, network_args, text_encoder=text_encoder, option=option)
    except ValueError as e:  # a network_args boolean that is not one
        raise NetworkError(str(e)) from None
    if problem is not None:
        raise NetworkError(problem)


def _refuse(problems: dict[str, list[str]]) -> None:
    lines = [f"{kind}: {len(names)} module(s) {sorted(names)[:4]}{' ...' if len(names) > 4 else ''}"
             for kind, names in problems.items()]
    raise NetworkError(f"diffusers' layout cannot carry {'; '.join(lines)} ({LOADER} loads only LoRA "
                       f"lora_A/lora_B on the Linear modules of its transformer and text_conditioner); "
                       f"{ALTERNATIVE}")


def comfy_to_diffusers(sd: Mapping[str, torch.Tensor], linears: Iterable[str],
                       dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata to add) in diffusers' layout for a ComfyUI-named LoRA state dict.

    lora_A = down, lora_B = up · alpha/rank (computed in fp32, cast to `dtype`, default each tensor's own); a
    module without alpha has scale 1 (ComfyUI's rule) and no entry in the ALPHAS_META record.  Anything the
    layout cannot carry is refused (NetworkError) without a partial result."""
    linears = set(linears)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    problems: dict[str, list[str]] = {}
    for key, t in sd.items():
        if not key.startswith(COMFY_PREFIX):
            if key.startswith("text_encoders."):  # one entry per module, not per tensor
                kind = "text-encoder modules (text_encoders.*: no text-encoder component)"
                name = key[: -len(next((x for x in ALL_SUFFIXES if key.endswith(x)), ""))] or key
            else:
                kind, name = "keys that are not DiT modules", key
            if name not in problems.setdefault(kind, []):
                problems[kind].append(name)
            continue
        rest = key[len(COMFY_PREFIX):]
        suffix = next((s for s in (*DOWN_SUFFIXES, *UP_SUFFIXES, ".alpha") if rest.endswith(s)), None)
        if suffix is None:
            kind = next((k for k, marks in _KINDS if any(m in rest for m in marks)), "unknown suffixes")
            problems.setdefault(kind, []).append(rest)
            continue
        modules.setdefault(rest[: -len(suffix)], {})[suffix] = t
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for path, slot in modules.items():
        down = next((slot[s] for s in DOWN_SUFFIXES if s in slot), None)
        up = next((slot[s] for s in UP_SUFFIXES if s in slot), None)
        stem = diffusers_stem(path)
        if stem is None or path not in linears:
            problems.setdefault("modules with no Linear of that name in diffusers' models", []).append(path)
            continue
        if down is None or up is None or len(slot) - (".alpha" in slot) != 2:
            problems.setdefault("incomplete LoRA modules (need one down and one up)", []).append(path)
            continue
        scale = 1.0
        if ".alpha" in slot:
            alpha = alpha_value(slot[".alpha"], COMFY_PREFIX + path + ".alpha")
            alphas[stem] = alpha
            scale = alpha / down.shape[0]
        out[stem + LORA_A] = down.to(dtype or down.dtype).contiguous()
        b = up.float() * scale if scale != 1.0 else up.float()
        out[stem + LORA_B] = b.to(dtype or up.dtype).contiguous()
    if problems:
        _refuse(problems)
    return out, ({ALPHAS_META: json.dumps(alphas, sort_keys=True)} if alphas else {})


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    """Whether every key has the form of diffusers' layout: `transformer.` / `text_conditioner.` + a module +
    `.lora_A.weight` / `.lora_B.weight` (the module names are checked by `reads_as_diffusers`)."""
    keys = list(keys)
    return bool(keys) and all(k.startswith((TRANSFORMER_PREFIX, CONDITIONER_PREFIX)) and k.endswith((LORA_A, LORA_B))
                              for k in keys)


def reads_as_diffusers(keys: Iterable[str], meta: Mapping[str, str], linears: Iterable[str]) -> bool:
    """Whether a file is read as diffusers' layout (`diffusers_to_comfy`): a file this trainer wrote (the
    ALPHAS_META record), or every key a LoRA key of a Linear of diffusers' models.  Other PEFT-style files
    (e.g. `transformer.<our module path>`) keep the generic reading of networks/convert.py."""
    keys = list(keys)
    return ALPHAS_META in meta or (is_diffusers_layout(keys) and not unmatched_diffusers_keys(keys, linears))


def diffusers_to_comfy(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                       linears: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers-layout LoRA back in ComfyUI names (`.lora_down.weight`, `.lora_up.weight`, `.alpha`).

    With the ALPHAS_META record (files this trainer wrote) each module gets its alpha back and lora_up = lora_B /
    (alpha/rank) in fp32, cast to the file's dtype; without it alpha = rank (scale 1: what diffusers applies).
    The record is removed from the returned metadata."""
    bad = unmatched_diffusers_keys(sd, linears)
    if bad:
        raise NetworkError(f"{len(bad)} key(s) are not LoRA weights of a module of diffusers' Anima models: "
                           f"{bad[:8]}{' ...' if len(bad) > 8 else ''}")
    meta = dict(meta)
    try:
        alphas = json.loads(meta.pop(ALPHAS_META, "{}"))
    except json.JSONDecodeError as e:
        raise NetworkError(f"metadata {ALPHAS_META} is not JSON ({e}); a damaged file") from None
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.endswith(LORA_A):
            continue
        stem = key[: -len(LORA_A)]
        down, b = t, sd[stem + LORA_B]
        name = COMFY_PREFIX + comfy_path(stem)
        rank = down.shape[0]
        alpha = float(alphas.get(stem, rank))
        scale = alpha / rank
        out[name + ".lora_down.weight"] = down
        out[name + ".lora_up.weight"] = b if scale == 1.0 else (b.float() / scale).to(b.dtype)
        out[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out, meta


def unmatched_diffusers_keys(keys: Iterable[str], linears: Iterable[str]) -> list[str]:
    """Keys diffusers' Anima loader would not inject: not `<stem>.lora_A.weight` / `.lora_B.weight` of a Linear
    module of its transformer / text_conditioner, or without the other half of the pair."""
    keys = set(keys)
    linears = set(linears)
    bad = []
    for k in keys:
        suffix = LORA_A if k.endswith(LORA_A) else LORA_B if k.endswith(LORA_B) else None
        path = comfy_path(k[: -len(suffix)]) if suffix else None
        other = (k[: -len(suffix)] + (LORA_B if suffix == LORA_A else LORA_A)) if suffix else None
        if path is None or path not in linears or other not in keys:
            bad.append(k)
    return sorted(bad)


def check_diffusers_keys(keys: Iterable[str] | str | Path, dit: nn.Module) -> None:
    """The save-time check of a diffusers-layout file (ComfyUI's key rules do not apply to it)."""
    if isinstance(keys, (str, Path)):
        with safe_open(str(keys), "pt") as f:
            keys = list(f.keys())
    bad = unmatched_diffusers_keys(keys, linear_paths(dit))
    if bad:
        raise NetworkError(f"{len(bad)} key(s) would not be loaded by {LOADER}: {bad[:10]}")


# ------------------------------------------------------------------------------------- network files --

def _dit(network: Any) -> nn.Module:
    dit = getattr(network, "dit", None)
    return dit if isinstance(dit, nn.Module) else network._dit[0]


def diffusers_tensors(network: Any, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, str]]:
    """(tensors, metadata to add) of an AdapterNetwork in diffusers' layout; refused for what it cannot carry."""
    check_diffusers_compatible(network.algo, network.network_args)
    return comfy_to_diffusers(network.state_tensors(None, "comfy"), linear_paths(_dit(network)), dtype)


def check_network_diffusers(network: Any) -> None:
    """Start-up check of a built network (also one rebuilt from a file with dim_from_weights) for
    save_format = "diffusers": what the layout cannot carry fails before training, not at the first save."""
    te = [m for m in network.lora_modules if getattr(m, "model", "dit") == "text_encoder"]
    args = dict(network.network_args)
    if len(network.norm_modules):
        args["train_norm"] = "true"
    if any(getattr(m, "dora_wd", False) for m in network.lora_modules):
        args["dora_wd"] = "true"
    check_diffusers_compatible(network.algo, args, text_encoder=bool(te))
    linears = linear_paths(_dit(network))
    bad = sorted(m.path for m in network.lora_modules if m not in te
                 and (diffusers_stem(m.path) is None or m.path not in linears))
    if bad:
        _refuse({"modules with no Linear of that name in diffusers' models": bad})


def save_diffusers(network: Any, path: str | Path, *, metadata: dict[str, str] | None = None,
                   dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """AdapterNetwork.save for save_format "diffusers": refused before anything is written when the network
    has parts the layout cannot carry; atomic write; the written file's keys checked against diffusers' models."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise NetworkError(f"{path}: network files are .safetensors")
    check_writable(path, overwrite)
    tensors, extra = diffusers_tensors(network, dtype)
    dit = _dit(network)

    def check(tmp: Path) -> None:
        check_diffusers_keys(tmp, dit)
        check_writable(path, overwrite)

    try:
        return atomic_save(tensors, path, with_hashes(tensors, {**network.metadata(metadata), **extra}),
                           what="network file ", check=check)
    except NonFiniteError as e:
        if dtype not in (None, torch.float32):
            name = str(dtype).removeprefix("torch.")
            raise NonFiniteError(f"{e} (lora_B includes the scale alpha/rank in this layout; if the fp32 file is "
                                 f"finite, {name}'s range is exceeded: set save_precision to fp32 or bf16)") from None
        raise
