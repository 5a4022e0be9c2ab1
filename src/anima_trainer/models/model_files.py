"""Model files: what a file (or folder) is, which prefix it uses, the DiT config its shapes imply, and its tensors.

Only safetensors are ever deserialised (headers are JSON, data is mmapped; safetensors_file.py checks the header),
so a malicious file can't run code.  Everything here works from the header alone except `load_state_dict`, which
reads tensors one at a time straight into the requested dtype/device (float8 weights dequantised), so a file is
never held twice in RAM.  Folders in diffusers' layout are described by diffusers_layout.py.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable

import torch
from safetensors import SafetensorError, safe_open

from anima_trainer.models.diffusers_layout import (
    COMPONENT_FOLDERS,
    INDEX_FILES,
    anima_dit_shapes,
    diffusers_key_to_anima,
    find_layout,
    read_config,
    weight_files,
)
from anima_trainer.models.safetensors_file import (  # noqa: F401 (re-exported: the names callers import from here)
    DTYPE_SIZES,
    ModelFileError,
    WrongModelFileError,
    parse_json,
    read_header,
)

log = logging.getLogger(__name__)

# Prefixes that wrap the DiT inside real files, most specific first.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net.")
QWEN_BUNDLE_PREFIX = "text_encoders.qwen3_06b.transformer."
VAE_BUNDLE_PREFIX = "vae."
# Known non-weight extras that exports and merges carry; never an error, never loaded (each load logs them): RoPE
# tables, Cosmos-Predict2's training counters and loss-weighting net (`logvar.*`, used by its training loss only),
# TransformerEngine's `_extra_state` (fp8 bookkeeping).  diffusers' Cosmos converter drops the same keys.
IGNORED_KEY_PATTERNS = (re.compile(r"^pos_embedder\."), re.compile(r"^logvar\."), re.compile(r"(^|\.)_extra_state$"),
                        re.compile(r"^accum_(video_sample_counter|image_sample_counter|iteration|train_in_hours)$"))
# ComfyUI's scaled-fp8 files (comfy/utils.py convert_old_quants, comfy/ops.py mixed_precision_ops): a float8 weight
# `L.weight` whose value is weight.float() * `L.weight_scale` (older files: `L.scale_weight`, plus a top-level
# `scaled_fp8` marker tensor); per-layer `L.comfy_quant` (uint8 bytes of JSON {"format": ...}) or the metadata entry
# `_quantization_metadata` ({"layers": {L: {...}}}) name the format; `L.input_scale` / `L.scale_input` only scale
# activations for fp8 matmuls and do not change the weight.
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")
QUANT_CONF_SUFFIX = ".comfy_quant"
QUANT_MARKER = "scaled_fp8"
QUANT_METADATA = "_quantization_metadata"
UNSUPPORTED_QUANT_SUFFIXES = (".weight_scale_2",)  # NVFP4's second-level scale: block-quantised weights
FP8_FORMATS = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
QUANT_KEY_SUFFIXES = (*SCALE_SUFFIXES, *INPUT_SCALE_SUFFIXES, QUANT_CONF_SUFFIX, *UNSUPPORTED_QUANT_SUFFIXES)
_DEQUANT_FIX = "use the bf16/fp16 release of the model, or a file with one per-tensor scale per float8 weight"

# What the DiT flag accepts: single files, all-in-one bundles and diffusers-layout folders.
DIT_KINDS = ("anima_dit", "anima_bundle", "anima_diffusers", "diffusers_dit")

KIND_DESCRIPTIONS = {
    "anima_dit": "an Anima DiT (MiniTrainDIT) checkpoint",
    "llm_adapter": "a separate Anima LLM-adapter file",
    "qwen3": "a Qwen3-0.6B text encoder",
    "qwen_image_vae": "a Qwen-Image / Wan 2.1 VAE",
    "network": "a LoRA/LoKr/LoHa network file",
    "anima_bundle": "an all-in-one ComfyUI checkpoint (DiT + text encoder + VAE)",
    "sdxl": "a Stable Diffusion XL checkpoint",
    "sd1": "a Stable Diffusion 1.x/2.x checkpoint",
    "flux": "a Flux checkpoint",
    "wan22_vae": "a Wan 2.2 VAE (48 latent channels; Anima needs the 16-channel Qwen-Image VAE)",
    "diffusers_dit": "an Anima DiT in diffusers names (a CosmosTransformer3DModel weights file)",
    "anima_diffusers": "a diffusers-layout Anima folder (transformer/, text_conditioner/, text_encoder/, vae/)",
    "diffusers_folder": "a diffusers model folder (not Anima's layout)",
    "hf_qwen3_folder": "a Hugging Face Qwen3 folder",
    "unknown": "an unrecognised file",
}


@dataclass(frozen=True)
class DitConfig:
    """MiniTrainDIT hyper-parameters, all inferred from tensor shapes."""

    num_blocks: int = 28
    model_channels: int = 2048
    num_heads: int = 16
    head_dim: int = 128
    mlp_dim: int = 8192
    adaln_lora_dim: int = 256
    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    crossattn_dim: int = 1024
    has_llm_adapter: bool = True
    llm_adapter_blocks: int = 6
    llm_adapter_dim: int = 1024
    llm_adapter_heads: int = 16
    llm_adapter_mlp_dim: int = 4096
    llm_adapter_vocab: int = 32128
    llm_adapter_source_dim: int = 1024

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FileInfo:
    """What `inspect_file` learned from a header: kind, prefix, config, dtypes, parameter count."""

    path: Path
    kind: str
    prefix: str = ""
    num_tensors: int = 0
    num_params: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    dit_config: DitConfig | None = None
    network_types: list[str] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)  # component -> key prefix (bundles)
    metadata: dict[str, str] = field(default_factory=dict)
    ignored_keys: int = 0
    fp8_scaled_weights: int = 0
    dit_error: str = ""  # a diffusers-layout folder whose transformer/ cannot be read: an error for the DiT flag only

    @property
    def description(self) -> str:
        text = KIND_DESCRIPTIONS.get(self.kind, self.kind)
        if self.kind == "anima_dit" and self.dit_config is not None:
            c = self.dit_config
            text += f" ({c.num_blocks} blocks, width {c.model_channels}, " + (
                "with LLM adapter)" if c.has_llm_adapter else "without LLM adapter)")
        if self.kind == "anima_diffusers":
            text = "a diffusers-layout Anima folder (has " + ", ".join(
                COMPONENT_FOLDERS[c] + "/" for c in self.components) + ")"
        if self.kind == "network" and self.network_types:
            text += f" ({', '.join(self.network_types)})"
        return text

    def summary(self) -> dict:
        """JSON-ready description, used by `anima-trainer inspect`."""
        out = {"file": str(self.path), "kind": self.kind, "description": self.description,
               "key_prefix": self.prefix, "tensors": self.num_tensors, "parameters": self.num_params,
               "dtypes": self.dtypes}
        if self.dit_config is not None:
            out["dit_config"] = self.dit_config.as_dict()
        if self.network_types:
            out["network_types"] = self.network_types
        if self.components:
            out["components"] = self.components
        if self.ignored_keys:
            out["ignored_non_weight_keys"] = self.ignored_keys
        if self.fp8_scaled_weights:
            out["fp8_scaled_weights"] = self.fp8_scaled_weights  # dequantised with their scales when loaded
        if self.dit_error:
            out["dit_error"] = self.dit_error
        if self.kind == "unknown" and self.path.is_file():
            out["first_keys"] = sorted(read_header(self.path)[0])[:8]
        return out


def is_ignored_key(key: str) -> bool:
    return any(p.search(key) for p in IGNORED_KEY_PATTERNS)


@dataclass
class QuantPlan:
    """What a file's quantisation keys mean for loading: which float8 weights are multiplied by which scale,
    and which keys are bookkeeping only (markers, layer configs, activation scales), skipped and counted."""

    scales: dict[str, str] = field(default_factory=dict)  # weight key -> its per-tensor scale key
    skipped: set[str] = field(default_factory=set)


def quant_plan(path: Path, header: dict[str, tuple[str, tuple[int, ...]]], meta: dict[str, str], prefix: str = "",
               read_conf: Callable[[str], torch.Tensor] | None = None) -> QuantPlan:
    """Check the scaled-fp8 keys under `prefix` (see SCALE_SUFFIXES) and plan their use; anything anima-trainer
    cannot dequantise exactly (NVFP4, int8, per-channel or non-float8 scaled weights, an unknown format) is
    refused here, so a quantised file is either dequantised exactly or not loaded.  `read_conf` reads the
    `.comfy_quant` tensors (loading); without it only the header is checked (inspect)."""
    plan = QuantPlan()
    confs: dict[str, object] = {}
    if QUANT_METADATA in meta:
        data = parse_json(meta[QUANT_METADATA], f"{path}: bad {QUANT_METADATA} metadata")
        layers = data.get("layers") if isinstance(data, dict) else None
        if not isinstance(layers, dict):
            raise ModelFileError(f"{path}: bad {QUANT_METADATA} metadata (no \"layers\" object); {_DEQUANT_FIX}")
        confs.update(layers)  # every layer's format is checked: some exporters name them without the prefix
    for key in header:
        if key.startswith(prefix) and key.endswith(UNSUPPORTED_QUANT_SUFFIXES):  # named first: the clearest reason
            raise ModelFileError(f"{path}: {key!r} belongs to a block-quantised (NVFP4) weight, which anima-trainer "
                                 f"cannot dequantise; {_DEQUANT_FIX}")
    for key, (dtype, shape) in header.items():
        if not key.startswith(prefix):
            continue
        if key[len(prefix):] == QUANT_MARKER or key.endswith("." + QUANT_MARKER):
            plan.skipped.add(key)
        elif key.endswith(QUANT_CONF_SUFFIX):
            plan.skipped.add(key)
            if read_conf is not None:
                raw = read_conf(key)
                if raw.dtype != torch.uint8 or raw.dim() != 1:
                    raise ModelFileError(f"{path}: {key!r} is not a ComfyUI layer config (uint8 JSON bytes); "
                                         f"{_DEQUANT_FIX}")
                confs[key[:-len(QUANT_CONF_SUFFIX)]] = parse_json(bytes(raw.tolist()), f"{path}: bad layer config "
                                                                                       f"{key!r}")
        elif key.endswith(INPUT_SCALE_SUFFIXES):
            plan.skipped.add(key)
        elif key.endswith(SCALE_SUFFIXES):
            weight = key.rsplit(".", 1)[0] + ".weight"
            if weight not in header:
                raise ModelFileError(f"{path}: {key!r} scales {weight!r}, which the file does not have; the file is "
                                     "damaged or of an unknown layout")
            if header[weight][0] not in FP8_FORMATS:
                raise ModelFileError(f"{path}: {key!r} scales a {header[weight][0]} weight {weight!r}; only float8 "
                                     f"weights with a scale are understood; {_DEQUANT_FIX}")
            if math.prod(shape) != 1 or dtype not in ("F32", "F16", "BF16"):
                raise ModelFileError(f"{path}: {key!r} is not one per-tensor scale ({dtype}, shape {list(shape)}); "
                                     f"{_DEQUANT_FIX}")
            plan.scales[weight] = key
    for layer, conf in confs.items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt not in FP8_FORMATS.values():
            raise ModelFileError(f"{path}: layer {layer!r} is quantised as {str(fmt)[:40]!r}; anima-trainer only "
                                 f"dequantises float8 (e4m3fn/e5m2) weights; {_DEQUANT_FIX}")
        weight = header.get(layer + ".weight") or header.get(prefix + layer + ".weight")
        if weight is not None and FP8_FORMATS.get(weight[0]) != fmt:
            raise ModelFileError(f"{path}: layer {layer!r} says {fmt} but its weight is stored as {weight[0]}; the "
                                 "file is damaged")
    return plan


def detect_prefix(keys: Iterable[str], candidates: Iterable[str] = DIT_PREFIXES, marker: str = "blocks.0.") -> str:
    """The DiT prefix most keys carry (ComfyUI's rule: the most frequent known prefix), else ''."""
    keys = list(keys)
    counts = Counter()
    for k in keys:
        for p in candidates:
            if k.startswith(p):
                counts[p] += 1
                break
    for p, _ in counts.most_common():
        if any(k.startswith(p + marker) for k in keys):
            return p
    return ""


def _strip(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def infer_dit_config(shapes: dict[str, tuple[int, ...]]) -> DitConfig:
    """DiT config from prefix-stripped key shapes; raises ModelFileError naming a missing key."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ModelFileError(f"the Anima DiT key {key!r} is missing (the file is incomplete or damaged; get it "
                                 "again)")
        return shapes[key]

    width, in_feats = shape("x_embedder.proj.1.weight")
    out_feats = shape("final_layer.linear.weight")[0]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ModelFileError(f"not an Anima DiT: block indices {sorted(blocks)[:5]}... are not 0..N-1")
    head_dim = shape("blocks.0.self_attn.q_norm.weight")[0]
    patch = 2
    out_channels = out_feats // (patch * patch)
    cfg = dict(num_blocks=len(blocks), model_channels=width, head_dim=head_dim, num_heads=width // head_dim,
               mlp_dim=shape("blocks.0.mlp.layer1.weight")[0],
               adaln_lora_dim=shape("blocks.0.adaln_modulation_self_attn.1.weight")[0],
               in_channels=in_feats // (patch * patch) - 1, out_channels=out_channels,
               crossattn_dim=shape("blocks.0.cross_attn.k_proj.weight")[1])
    llm_adapter = _strip(shapes, "llm_adapter.")
    cfg["has_llm_adapter"] = bool(llm_adapter)
    if llm_adapter:
        cfg.update(_infer_llm_adapter_config(llm_adapter))
    return DitConfig(**cfg)


def _infer_llm_adapter_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    try:
        vocab, dim = shapes["embed.weight"]
        head_dim = shapes["blocks.0.self_attn.q_norm.weight"][0]
        mlp = shapes["blocks.0.mlp.0.weight"][0]
        source_dim = shapes["blocks.0.cross_attn.k_proj.weight"][1]
    except KeyError as e:
        raise ModelFileError(f"not an Anima LLM adapter: key {e.args[0]!r} is missing") from None
    n = len({int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))})
    return dict(llm_adapter_blocks=n, llm_adapter_dim=dim, llm_adapter_heads=dim // head_dim, llm_adapter_mlp_dim=mlp,
                llm_adapter_vocab=vocab, llm_adapter_source_dim=source_dim)


_NETWORK_SUFFIXES = {
    "lora": (".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight", ".lora.up.weight",
             "_lora.up.weight", ".lora_linear_layer.up.weight", ".lora_B.default.weight"),
    "lokr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a", ".lokr_w1_b", ".lokr_w2_b", ".lokr_t2"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"),
    "diff": (".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight"),
}


def _network_types(keys: list[str]) -> list[str]:
    return [name for name, suffixes in _NETWORK_SUFFIXES.items() if any(k.endswith(suffixes) for k in keys)]


# Keys only a MiniTrainDIT has (an LLM-adapter file has none of them); two of these make a file a DiT, so one
# missing key is reported by name instead of the file being taken for something else.
_DIT_MARKERS = ("x_embedder.proj.1.weight", "blocks.0.mlp.layer1.weight", "t_embedder.1.linear_1.weight",
                "final_layer.linear.weight", "blocks.0.adaln_modulation_self_attn.1.weight")


def _classify(shapes: dict[str, tuple[int, ...]]) -> tuple[str, str, dict[str, str]]:
    """(kind, prefix, components) from the key set."""
    keys = list(shapes)
    has = lambda fragment: any(fragment in k for k in keys)  # noqa: E731
    nets = _network_types(keys)
    if nets and (has("lora_unet_") or has("lora_te") or all(_network_types([k]) or k.endswith(".alpha")
                                                             or k.endswith(".dora_scale") for k in keys)):
        return "network", "", {}
    components: dict[str, str] = {}
    dit_prefix = detect_prefix(keys)
    if sum(f"{dit_prefix}{k}" in shapes for k in _DIT_MARKERS) >= 2:  # a DiT missing a key is still a DiT
        components["dit"] = dit_prefix
    if f"{QWEN_BUNDLE_PREFIX}model.layers.0.post_attention_layernorm.weight" in shapes:
        components["qwen3"] = QWEN_BUNDLE_PREFIX
    if f"{VAE_BUNDLE_PREFIX}decoder.upsamples.0.residual.0.gamma" in shapes:
        components["vae"] = VAE_BUNDLE_PREFIX
    if len(components) > 1:
        return "anima_bundle", components.get("dit", ""), components
    if set(components) == {"vae"}:  # a VAE saved alone with its bundle prefix
        z2 = shapes.get(f"{VAE_BUNDLE_PREFIX}conv1.weight", (32,))[0]
        return ("qwen_image_vae" if z2 == 32 else "wan22_vae"), VAE_BUNDLE_PREFIX, {}
    if "dit" in components:
        return "anima_dit", dit_prefix, components
    if "patch_embed.proj.weight" in shapes and "transformer_blocks.0.attn1.to_q.weight" in shapes:
        return "diffusers_dit", "", {}
    for p in ("llm_adapter.", dit_prefix + "llm_adapter.", ""):
        if f"{p}embed.weight" in shapes and f"{p}blocks.0.cross_attn.q_proj.weight" in shapes \
                and f"{p}out_proj.weight" in shapes:
            return "llm_adapter", p, {}
    if "model.layers.0.post_attention_layernorm.weight" in shapes and has("self_attn.q_norm"):
        return "qwen3", "model.", {}
    if "decoder.upsamples.0.residual.0.gamma" in shapes or "decoder.up_blocks.0.resnets.0.norm1.gamma" in shapes:
        z2 = shapes.get("conv1.weight", shapes.get("quant_conv.weight", (32,)))[0]
        return ("qwen_image_vae" if z2 == 32 else "wan22_vae"), "", {}
    if has("double_blocks.") and has("single_blocks."):
        return "flux", "", {}
    if has("conditioner.embedders.") or has("input_blocks.") and has("label_emb."):
        return "sdxl", "", {}
    if has("cond_stage_model.") or has("input_blocks."):
        return "sd1", "", {}
    return "unknown", "", {}


def inspect_file(path: str | Path) -> FileInfo:
    """Recognise a model file (or folder) from its keys alone."""
    path = Path(path)
    if path.is_dir():
        return _inspect_folder(path)
    shapes_dt, meta = read_header(path)
    shapes = {k: s for k, (_, s) in shapes_dt.items()}
    kind, prefix, components = _classify(shapes)
    info = FileInfo(path=path, kind=kind, prefix=prefix, metadata=meta, components=components,
                    num_tensors=len(shapes))
    plan = quant_plan(path, shapes_dt, meta)
    info.fp8_scaled_weights = len(plan.scales)
    ignored = 0
    for k, (dt, s) in shapes_dt.items():
        if k in plan.skipped or is_ignored_key(k[len(prefix):] if k.startswith(prefix) else k):
            ignored += 1
            continue
        if k in plan.scales.values():
            continue
        info.dtypes[dt] = info.dtypes.get(dt, 0) + 1
        n = 1
        for d in s:
            n *= d
        info.num_params += n
    info.ignored_keys = ignored
    if kind in ("anima_dit", "anima_bundle") and "dit" in components:
        try:
            info.dit_config = infer_dit_config(_strip(shapes, components["dit"]))
        except ModelFileError as e:
            raise ModelFileError(f"{path}: {e}") from None
    if kind == "diffusers_dit":
        try:
            info.dit_config = infer_dit_config({n: s for k, s in shapes.items()
                                                if (n := diffusers_key_to_anima(k)) is not None})
        except ModelFileError as e:
            raise ModelFileError(f"{path}: {e}") from None
    if kind == "network":
        info.network_types = _network_types(list(shapes))
    return info


def _inspect_folder(path: Path) -> FileInfo:
    """A diffusers-layout Anima folder or one of its component folders, a Hugging Face Qwen3 folder, another
    diffusers folder, or nothing recognised."""
    found = find_layout(path)
    if found is not None:
        return _inspect_layout(path, *found)
    data = read_config(path)
    if data.get("model_type") == "qwen3":
        return FileInfo(path=path, kind="hf_qwen3_folder")
    if data.get("_class_name") or any((path / n).is_file() for n in INDEX_FILES):
        return FileInfo(path=path, kind="diffusers_folder")
    return FileInfo(path=path, kind="unknown")


def _inspect_layout(path: Path, layout, component: str | None) -> FileInfo:  # layout: DiffusersLayout
    """FileInfo of a diffusers-layout folder: the root offers every component it has; a component folder is
    that component (the DiT with its sibling text_conditioner/, the text encoder with the tokenizers)."""
    folders = dict(layout.folders)
    if component == "dit":
        folders = {c: f for c, f in folders.items() if c in ("dit", "llm_adapter")}
    elif component == "qwen3":
        folders = {c: f for c, f in folders.items() if c in ("qwen3", "qwen_tokenizer", "t5_tokenizer")}
    elif component is not None:
        folders = {component: folders[component]}
    kind = {None: "anima_diffusers", "dit": "anima_diffusers", "qwen3": "hf_qwen3_folder",
            "llm_adapter": "llm_adapter", "vae": "qwen_image_vae"}.get(component, "diffusers_folder")
    info = FileInfo(path=path, kind=kind, components={c: str(f) for c, f in folders.items()})
    flag = "inspect"
    for c, folder in folders.items():
        if c in ("qwen_tokenizer", "t5_tokenizer"):
            continue
        try:
            files = weight_files(folder, flag)
        except ModelFileError:
            continue  # reported by the loader of that part, with its flag
        for f in files:
            header, meta = read_header(f)
            info.num_tensors += len(header)
            for dt, s in header.values():
                info.dtypes[dt] = info.dtypes.get(dt, 0) + 1
                info.num_params += math.prod(s)
    if kind == "qwen_image_vae" and read_config(folders["vae"]).get("z_dim", 16) != 16:
        info.kind = "wan22_vae"
    if "dit" in folders:
        try:
            info.dit_config = infer_dit_config(anima_dit_shapes(layout, flag))
        except ModelFileError as e:  # the VAE and text encoder of the folder may still be fine
            info.dit_error = f"{path}: {COMPONENT_FOLDERS['dit']}/: {e}".replace("inspect: ", "")
    return info


def expect_kind(path: str | Path, flag: str, accepted: Iterable[str]) -> FileInfo:
    """Inspect `path` and stop with a message naming the flag and what the file is, if it is not accepted."""
    accepted = tuple(accepted)
    try:
        info = inspect_file(path)
    except ModelFileError as e:
        raise WrongModelFileError(f"{flag}: {e}") from None
    if info.dit_error and info.kind in accepted and "anima_dit" in accepted:
        raise WrongModelFileError(f"{flag}: {info.dit_error}")
    if info.kind not in accepted:
        wanted = " or ".join(KIND_DESCRIPTIONS.get(a, a) for a in accepted)
        if info.kind == "unknown" and Path(path).is_dir():
            raise WrongModelFileError(f"{flag} expects {wanted}, but {path} is a folder with no recognised model "
                                      "in it; pass the .safetensors file")
        keys = list(read_header(path)[0]) if info.kind == "unknown" else []
        raise WrongModelFileError(
            f"{flag} expects {wanted}, but {path} looks like {info.description}"
            + (f" (keys such as {keys[0]!r})" if keys else " (no tensors)" if info.kind == "unknown" else ""))
    return info


def load_state_dict(path: str | Path, *, prefix: str = "", dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", drop_ignored: bool = True,
                    names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors under `prefix` (stripped), each cast straight to dtype/device as it is read from the mmap; with
    `names` only those (stripped names: a few tensors read without the rest of the file).

    The header is checked first (read_header: dtypes, offsets) and scaled-fp8 weights are dequantised as ComfyUI
    does (float8 weight × its per-tensor scale, see SCALE_SUFFIXES); quantisation bookkeeping keys are skipped
    and counted in the log; a quantisation anima-trainer cannot dequantise exactly is refused (quant_plan)."""
    path = Path(path)
    header, meta = read_header(path)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            plan = quant_plan(path, header, meta, prefix, read_conf=f.get_tensor)
            scale_keys = set(plan.scales.values())
            ignored, extras = 0, []
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if not key.startswith(prefix) or key in scale_keys:
                    continue
                name = key[len(prefix):]
                if names is not None and name not in names:
                    continue
                if key in plan.skipped or drop_ignored and is_ignored_key(name):
                    ignored += 1
                    if key not in plan.skipped:
                        extras.append(name)
                    continue
                t = f.get_tensor(key)
                if key in plan.scales:  # ComfyUI's rule: the float8 weight times its per-tensor scale
                    t = t.float() * f.get_tensor(plan.scales[key]).float().reshape(())
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype=dtype)
                out[name] = t.to(device) if str(device) != "cpu" else t
    except SafetensorError as e:  # a file that changed or broke after its header was checked
        raise ModelFileError(f"{path} cannot be read as safetensors ({e}); get the file again") from None
    if plan.scales:
        log.info("%s: dequantised %d scaled float8 weights (weight × weight_scale)", path, len(plan.scales))
    if ignored:
        log.info("%s: skipped %d non-weight keys (%d quantisation keys such as .comfy_quant / input_scale / "
                 "scaled_fp8%s)", path, ignored, len(plan.skipped),
                 f"; {len(extras)} RoPE tables, training counters or _extra_state such as "
                 + ", ".join(repr(k) for k in sorted(extras)[:3]) if extras else "")
    return out
