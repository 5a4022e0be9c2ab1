"""Adapter key names: reading a file in any naming and renaming its keys to ComfyUI-native or kohya names.

* `read_comfy_named(path, dit)`: what training's `network_weights` and `dim_from_weights` read — any file,
  keys renamed to ComfyUI names.  ComfyUI names are `diffusion_model.<module path>.<suffix>`, kohya names
  `lora_unet_<module path with . → _>.<suffix>`; text-encoder modules `text_encoders.qwen3_06b.transformer.
  model.<Qwen3 path>.<suffix>` (ComfyUI) and `lora_te_<Qwen3 path with _>.<suffix>` (kohya), PEFT-style
  `text_encoder.<Qwen3 path>` read too.  Since `_` is ambiguous, module paths are recovered from the
  structure of an AnimaDiT and a Qwen3-0.6B built on the meta device (`ModuleTable`), the same reasoning as
  `comfy_key_map`.
  PEFT / diffusers inputs (`lora_A`/`lora_B`, optional `.default`, prefixes `transformer.`,
  `base_model.model.`, `diffusion_model.`, `net.`, diffusers' Cosmos module names) are read too.
* `convert_state_dict(sd, meta, to)`: the renaming itself, used by the file tools (tools/convert.py: the
  `convert-network` command; tools/merge.py: `merge`).

Suffix policy (documented in docs/formats.md):
* `--to comfy` keeps every suffix; PEFT spellings (`.lora_A.default.weight`, bare `.lora_A`) become
  `.lora_A.weight` / `.lora_B.weight`; a PEFT-named LoRA module without `.alpha` gets `.alpha = rank` (scale 1,
  what ComfyUI applies to it anyway) so that every loader reads it the same way.
* `--to kohya` writes `lora_down` / `lora_up` for `lora_A` / `lora_B` (what kohya's loaders read) and remembers
  which modules were spelt `lora_A/B` in the metadata key `LORA_AB_META`, so `--to comfy` restores them and a
  comfy → kohya → comfy round trip is bit-identical.  Keys that have no kohya spelling (ComfyUI accepts only
  `diffusion_model.M.bias.<suffix>` for biases) keep their ComfyUI name.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from anima_trainer.tensor_files import NonFiniteError, nonfinite_tensors
from anima_trainer.models.model_files import DIT_KINDS, DitConfig, expect_kind, read_header
from anima_trainer.models.diffusers_layout import diffusers_module_to_anima as diffusers_to_comfy_path
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.models.text import weight_sources, qwen3_config_from_shapes
from anima_trainer.networks import diffusers_format as dfmt
from anima_trainer.networks.diffusers_format import CONDITIONER_PREFIX, TRANSFORMER_PREFIX
from anima_trainer.networks.formats import (
    ALL_SUFFIXES,
    COMFY_PREFIX,
    KOHYA_PREFIX,
    KOHYA_TE_PREFIX,
    TE_COMFY_PREFIX,
    TE_NAME_PREFIX,
    NetworkError,
    is_text_encoder_key,
)
from anima_trainer.networks.inject import linear_paths

__all__ = ["CONDITIONER_PREFIX", "LORA_AB_META", "TRANSFORMER_PREFIX", "ModuleTable", "build_meta_dit",
           "build_meta_qwen3", "check_finite_network", "comfy_named_file", "convert_state_dict", "linear_paths",
           "parse_key", "qwen3_shapes", "read_comfy_named", "read_network"]

LORA_AB_META = "anima_trainer_lora_AB_modules"
# PEFT spellings → what we write for ComfyUI (ComfyUI reads all of them; one spelling keeps files uniform)
PEFT_SUFFIXES = {".lora_A.default.weight": ".lora_A.weight", ".lora_B.default.weight": ".lora_B.weight",
                 ".lora_A": ".lora_A.weight", ".lora_B": ".lora_B.weight"}
KOHYA_LORA = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
SOURCE_SUFFIXES = tuple(sorted(set(ALL_SUFFIXES) | set(PEFT_SUFFIXES), key=len, reverse=True))
# outer prefixes of PEFT / diffusers / checkpoint-style names, stripped in this order (each at most once)
OUTER_PREFIXES = ("base_model.model.",)
INNER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "net.")


def build_meta_dit(dit_file: str | Path | None = None) -> nn.Module:
    """An AnimaDiT on the meta device (names and shapes only): the 2B config, or the config of `dit_file`."""
    if dit_file is None:
        config = DitConfig()
    else:
        config = expect_kind(dit_file, "--dit", DIT_KINDS).dit_config
    with torch.device("meta"):
        return AnimaDiT(config)


def build_meta_qwen3(qwen3_file: str | Path | None = None) -> nn.Module:
    """A transformers Qwen3Model on the meta device (names and shapes only): Qwen3-0.6B (Anima's text encoder),
    or the config implied by the shapes of `qwen3_file` (a single file, bundle or HF folder)."""
    if qwen3_file is None:  # Qwen3-0.6B's published config (the shapes ComfyUI's Anima Qwen3 has)
        config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             tie_word_embeddings=True)
    else:
        config = qwen3_config_from_shapes(qwen3_shapes(qwen3_file))
    with torch.device("meta"):
        return Qwen3Model(config)


def qwen3_shapes(qwen3_file: str | Path) -> dict[str, tuple[int, ...]]:
    """{Qwen3Model parameter name: shape} from the header(s) of a Qwen3 file, bundle or HF folder."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, prefix in weight_sources(Path(qwen3_file))[0]:
        header, _ = read_header(file)
        shapes.update({k[len(prefix):]: tuple(s) for k, (_, s) in header.items() if k.startswith(prefix)})
    return shapes


def _kohya_names(modules: frozenset[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in modules:
        flat = m.replace(".", "_")
        if flat in out:  # cannot happen for AnimaDiT / Qwen3; guards against a future ambiguous name
            raise NetworkError(f"{what} modules {out[flat]} and {m} have the same kohya name {flat}")
        out[flat] = m
    return out


@dataclass(frozen=True)
class ModuleTable:
    """Name tables of one DiT (and optionally its Qwen3 text encoder): weight modules (`M` of `M.weight`) and
    other parameters (`M.bias`, …)."""

    modules: frozenset[str]
    others: frozenset[str]
    kohya: dict[str, str]  # `M` with `_` → `M`
    linears: frozenset[str] = frozenset()  # the `M` that are nn.Linear (diffusers' layout has LoRA only there)
    te_modules: frozenset[str] | None = None  # None: no text encoder to resolve text-encoder keys against
    te_kohya: dict[str, str] | None = None

    @classmethod
    def from_dit(cls, dit: nn.Module, text_encoder: nn.Module | None = None) -> ModuleTable:
        names = list(dit.state_dict(keep_vars=True))
        modules = frozenset(n[: -len(".weight")] for n in names if n.endswith(".weight"))
        others = frozenset(n for n in names if not n.endswith(".weight"))
        te_modules = te_kohya = None
        if text_encoder is not None:  # ComfyUI's CLIP map has weights only (no bias names)
            te_modules = frozenset(n[: -len(".weight")] for n in text_encoder.state_dict(keep_vars=True)
                                   if n.endswith(".weight"))
            te_kohya = _kohya_names(te_modules, "text-encoder")
        return cls(modules, others, _kohya_names(modules, "DiT"), linear_paths(dit), te_modules, te_kohya)

    def resolve_te(self, stem: str) -> tuple[str, str] | None:
        """(Qwen3 path, style) of a text-encoder key stem (ComfyUI, kohya `lora_te_`, PEFT `text_encoder.`)."""
        if self.te_modules is None:
            return None
        if stem.startswith(KOHYA_TE_PREFIX):
            m = self.te_kohya.get(stem[len(KOHYA_TE_PREFIX):])
            return (m, "kohya") if m else None
        # PEFT on a Qwen3ForCausalLM names the Qwen3Model part `model.`: `text_encoder.model.layers.0...`
        for prefix, style in ((TE_COMFY_PREFIX, "comfy"), (TE_NAME_PREFIX, "peft"), (TE_NAME_PREFIX + "model.",
                                                                                   "peft")):
            if stem.startswith(prefix) and stem[len(prefix):] in self.te_modules:
                return stem[len(prefix):], style
        return None

    def resolve(self, stem: str) -> tuple[str, str] | None:
        """(ComfyUI path, source style 'comfy'|'kohya'|'peft') of a DiT key stem, or None."""
        if stem.startswith(KOHYA_PREFIX):
            m = self.kohya.get(stem[len(KOHYA_PREFIX):])
            return (m, "kohya") if m else None
        rest, style, outer = stem, "peft", False
        if rest.startswith(CONDITIONER_PREFIX):  # diffusers' AnimaTextConditioner = the DiT's llm_adapter
            path = "llm_adapter." + rest[len(CONDITIONER_PREFIX):]
            return (path, "peft") if path in self.modules or path in self.others else None
        for p in OUTER_PREFIXES:
            if rest.startswith(p):
                rest, outer = rest[len(p):], True
        for p in INNER_PREFIXES:
            if rest.startswith(p):
                if p == COMFY_PREFIX and not outer:
                    style = "comfy"
                rest = rest[len(p):]
                break
        if rest in self.modules or rest in self.others:
            return rest, style
        mapped = diffusers_to_comfy_path(rest)
        if mapped is not None and mapped in self.modules:
            return mapped, "peft"
        return None


def parse_key(key: str, table: ModuleTable) -> tuple[str, str, str, str] | None:
    """(model "dit"|"text_encoder", path in that model, suffix as in the file, source style) of one adapter
    key, or None if unknown."""
    te = is_text_encoder_key(key)
    for suffix in SOURCE_SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            hit = table.resolve_te(stem) if te else table.resolve(stem)
            if hit is not None:
                return ("text_encoder" if te else "dit"), hit[0], suffix, hit[1]
    return None


def read_network(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise NetworkError(f"network file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as e:  # any parse failure means a bad file
        raise NetworkError(f"{path} is not a readable .safetensors file: {e}") from e


def convert_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str], to: str,
                       table: ModuleTable) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename every key of an adapter state dict to ComfyUI (`to="comfy"`), kohya (`to="kohya"`) or diffusers'
    layout (`to="diffusers"`: networks/diffusers_format.py, the scale folded into lora_B)."""
    if to not in ("comfy", "kohya", "diffusers"):
        raise NetworkError(f"--to must be 'comfy', 'kohya' or 'diffusers', got {to!r}")
    if to == "diffusers":
        comfy, meta = convert_state_dict(sd, meta, "comfy", table)
        out, extra = dfmt.comfy_to_diffusers(comfy, table.linears)
        return out, {**{k: v for k, v in meta.items() if k != LORA_AB_META}, **extra}
    if dfmt.reads_as_diffusers(sd, meta, table.linears):  # diffusers' layout: alphas from our record, else 1
        sd, meta = dfmt.diffusers_to_comfy(sd, meta, table.linears)
    parsed, unknown = {}, []
    for key in sd:
        hit = parse_key(key, table)
        if hit is None:
            unknown.append(key)
        else:
            parsed[key] = hit
    te_unknown = [k for k in unknown if is_text_encoder_key(k)]
    if te_unknown and table.te_modules is None:
        raise NetworkError(f"{len(te_unknown)} key(s) are text-encoder (Qwen3) keys, e.g. {sorted(te_unknown)[:3]}, "
                           "but no text encoder was given to resolve them against")
    if te_unknown:
        raise NetworkError(f"{len(te_unknown)} text-encoder key(s) name no Linear/weight of this Qwen3 (or an "
                           f"unknown suffix): {sorted(te_unknown)[:10]} (a different text encoder? pass --qwen3 "
                           "with its file)")
    if unknown:
        raise NetworkError(f"{len(unknown)} key(s) name no module of this DiT (or an unknown suffix): "
                           f"{sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''} "
                           "(a different model size? pass --dit with the base checkpoint)")
    meta = dict(meta)
    ab_modules = set(json.loads(meta.pop(LORA_AB_META, "[]"))) if to == "comfy" else set()
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    # PEFT-named LoRA modules → their down tensor (for a missing alpha); keyed by (model, path)
    lora_peft: dict[tuple[str, str], torch.Tensor] = {}
    has_alpha: set[tuple[str, str]] = set()
    renamed_ab: set[str] = set()
    for key, (model, path, suffix, style) in parsed.items():
        suffix = PEFT_SUFFIXES.get(suffix, suffix)
        te = model == "text_encoder"
        comfy_prefix, kohya_prefix = (TE_COMFY_PREFIX, KOHYA_TE_PREFIX) if te else (COMFY_PREFIX, KOHYA_PREFIX)
        ab_name = TE_NAME_PREFIX + path if te else path  # how LORA_AB_META names the module
        is_module = te or path in table.modules
        if to == "comfy":
            if style == "kohya" and ab_name in ab_modules:
                suffix = {v: k for k, v in KOHYA_LORA.items()}.get(suffix, suffix)
            new = comfy_prefix + path + suffix
            if style == "peft" and suffix == ".lora_A.weight":
                lora_peft[(model, path)] = sd[key]
        elif is_module:
            if suffix in KOHYA_LORA:
                renamed_ab.add(ab_name)
                suffix = KOHYA_LORA[suffix]
            new = kohya_prefix + path.replace(".", "_") + suffix
        else:  # a bias/buffer: ComfyUI has no kohya name for it, keep the ComfyUI one
            new = COMFY_PREFIX + path + suffix
        if suffix == ".alpha":
            has_alpha.add((model, path))
        if new in out:
            raise NetworkError(f"{origin[new]} and {key} both become {new} (the same module under two names)")
        out[new], origin[new] = sd[key], key
    for (model, path), down in lora_peft.items():
        if (model, path) not in has_alpha:  # scale = alpha / rank = 1, as ComfyUI applies an alpha-less file
            prefix = TE_COMFY_PREFIX if model == "text_encoder" else COMFY_PREFIX
            out[prefix + path + ".alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    if renamed_ab:
        meta[LORA_AB_META] = json.dumps(sorted(renamed_ab))
    return out, meta


def read_comfy_named(path: str | Path, dit: nn.Module, text_encoder: nn.Module | None = None, *,
                     network_has_te: bool | None = None, network_has_dit: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file in any supported naming, renamed to ComfyUI names for `dit` (and
    `text_encoder`).  `network_has_te` / `network_has_dit` (the loading network's sides; None: whether a text
    encoder is given) turn a file for the other side into a NetworkError that says what to change."""
    sd, meta = read_network(path)
    has_te = text_encoder is not None if network_has_te is None else network_has_te
    te_keys = sorted(k for k in sd if is_text_encoder_key(k))
    if te_keys and not has_te:
        raise NetworkError(f"{path}: the file has {len(te_keys)} text-encoder (Qwen3) key(s), e.g. {te_keys[:2]}, "
                           "but this network has no text-encoder modules; train the text encoder too (kohya: leave "
                           "network_train_unet_only off and cache_text_encoder_outputs off) to load it, or use a "
                           "DiT-only file")
    if not network_has_dit and len(te_keys) < len(sd):
        dit_keys = sorted(k for k in sd if not is_text_encoder_key(k))
        raise NetworkError(f"{path}: the file has {len(dit_keys)} DiT key(s), e.g. {dit_keys[:2]}, but this network "
                           "trains the text encoder only (network_train_text_encoder_only); turn that off to load it")
    try:
        return convert_state_dict(sd, meta, "comfy", ModuleTable.from_dit(dit, text_encoder))[0]
    except NetworkError as e:
        raise NetworkError(f"{path}: {e}") from e


def check_finite_network(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """A network holding NaN/Inf is broken (a diverged run): refuse to convert or merge it, naming the tensors."""
    bad = nonfinite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{path}: {len(bad)} tensor(s) hold NaN/Inf ({shown}); a broken network, "
                             "nothing written (use an earlier step's file)")


@contextlib.contextmanager
def comfy_named_file(path: str | Path, dit: nn.Module) -> Iterator[Path]:
    """`path`, or for a file in diffusers' layout (which ComfyUI's rules, i.e. `apply_network_file`, do not
    read) a ComfyUI-named copy with its alphas restored, in a scratch folder removed on exit.  For the tools that
    apply files (merge, sample, base_weights)."""
    sd, meta = read_network(path)
    if not dfmt.reads_as_diffusers(sd, meta, linear_paths(dit)):
        yield Path(path)
        return
    try:
        out, _ = convert_state_dict(sd, meta, "comfy", ModuleTable.from_dit(dit))
    except NetworkError as e:
        raise NetworkError(f"{path}: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(path).name
        save_file({k: v.contiguous() for k, v in out.items()}, str(copy))
        yield copy
