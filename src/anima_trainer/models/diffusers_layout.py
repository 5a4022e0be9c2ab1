"""The diffusers folder layout of Anima: one place that knows its folder names, files and key names.

diffusers (>= 0.42) publishes Anima as a folder (e.g. `circlestone-labs/Anima-Base-v1.0-Diffusers`) whose
`model_index.json` / `modular_model_index.json` names one subfolder per component:

| subfolder | diffusers class | here |
|---|---|---|
| `transformer/` | `CosmosTransformer3DModel` (shards + index json) | the DiT, keys renamed |
| `text_conditioner/` | `AnimaTextConditioner` | the LLM adapter: the same names as our `llm_adapter.*` |
| `text_encoder/` | transformers `Qwen3Model` | a Hugging Face Qwen3 folder |
| `tokenizer/`, `t5_tokenizer/` | Qwen2 and T5 tokenizers | the tokenizer folders |
| `vae/` | `AutoencoderKLQwenImage` (or the same-keyed `AutoencoderKLWan`) | the VAE in diffusers names |

Every model flag accepts the root folder or its own subfolder (`find_layout`).  Only facts (folder, class and
module names) come from diffusers; the mapping is checked against diffusers' own modules in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from anima_trainer.models.safetensors_file import ModelFileError, parse_json, read_header

INDEX_FILES = ("model_index.json", "modular_model_index.json")
# component -> its subfolder, in the order `inspect` lists them
COMPONENT_FOLDERS = {"dit": "transformer", "llm_adapter": "text_conditioner", "qwen3": "text_encoder",
                     "vae": "vae", "qwen_tokenizer": "tokenizer", "t5_tokenizer": "t5_tokenizer"}
TRANSFORMER_CLASS = "CosmosTransformer3DModel"
CONDITIONER_CLASS = "AnimaTextConditioner"
VAE_CLASSES = ("AutoencoderKLQwenImage", "AutoencoderKLWan")
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# diffusers CosmosTransformer3DModel module name -> our (ComfyUI) module name.  Used for weights here and for
# adapter keys by networks/convert.py; tests/support/diffusers_oracle.py checks it against diffusers' modules.
DIFFUSERS_TOP = {
    "patch_embed.proj": "x_embedder.proj.1",
    "time_embed.t_embedder.linear_1": "t_embedder.1.linear_1",
    "time_embed.t_embedder.linear_2": "t_embedder.1.linear_2",
    "time_embed.norm": "t_embedding_norm",
    "norm_out.linear_1": "final_layer.adaln_modulation.1",
    "norm_out.linear_2": "final_layer.adaln_modulation.2",
    "proj_out": "final_layer.linear",
}
DIFFUSERS_BLOCK = {  # inside `transformer_blocks.N.` -> inside `blocks.N.`
    "norm1.linear_1": "adaln_modulation_self_attn.1", "norm1.linear_2": "adaln_modulation_self_attn.2",
    "norm2.linear_1": "adaln_modulation_cross_attn.1", "norm2.linear_2": "adaln_modulation_cross_attn.2",
    "norm3.linear_1": "adaln_modulation_mlp.1", "norm3.linear_2": "adaln_modulation_mlp.2",
    "ff.net.0.proj": "mlp.layer1", "ff.net.2": "mlp.layer2",
}
for _d, _c in (("attn1", "self_attn"), ("attn2", "cross_attn")):
    DIFFUSERS_BLOCK.update({f"{_d}.to_q": f"{_c}.q_proj", f"{_d}.to_k": f"{_c}.k_proj", f"{_d}.to_v": f"{_c}.v_proj",
                            f"{_d}.to_out.0": f"{_c}.output_proj", f"{_d}.norm_q": f"{_c}.q_norm",
                            f"{_d}.norm_k": f"{_c}.k_norm"})
_BLOCK_HEAD = "transformer_blocks."
_ANIMA_TOP = {v: k for k, v in DIFFUSERS_TOP.items()}
_ANIMA_BLOCK = {v: k for k, v in DIFFUSERS_BLOCK.items()}


def diffusers_module_to_anima(path: str) -> str | None:
    """Our module name of a diffusers CosmosTransformer3DModel module name, or None when it has none."""
    if path in DIFFUSERS_TOP:
        return DIFFUSERS_TOP[path]
    if path.startswith(_BLOCK_HEAD):
        index, _, rest = path[len(_BLOCK_HEAD):].partition(".")
        if index.isdigit() and rest in DIFFUSERS_BLOCK:
            return f"blocks.{index}.{DIFFUSERS_BLOCK[rest]}"
    return None


def anima_module_to_diffusers(path: str) -> str | None:
    """The reverse of `diffusers_module_to_anima` (DiT modules only; the adapter keeps its names)."""
    if path in _ANIMA_TOP:
        return _ANIMA_TOP[path]
    if path.startswith("blocks."):
        index, _, rest = path[len("blocks."):].partition(".")
        if index.isdigit() and rest in _ANIMA_BLOCK:
            return f"{_BLOCK_HEAD}{index}.{_ANIMA_BLOCK[rest]}"
    return None


def diffusers_key_to_anima(key: str) -> str | None:
    """Our DiT key (`blocks.0.self_attn.q_proj.weight`) of a diffusers transformer key, else None."""
    module, _, leaf = key.rpartition(".")
    mapped = diffusers_module_to_anima(module)
    return f"{mapped}.{leaf}" if mapped is not None else None


def anima_key_to_diffusers(key: str) -> str | None:
    module, _, leaf = key.rpartition(".")
    mapped = anima_module_to_diffusers(module)
    return f"{mapped}.{leaf}" if mapped is not None else None


# ------------------------------------------------------------------------------------------- the folder

def read_config(folder: Path, name: str = "config.json") -> dict:
    """A folder's JSON config, {} when absent or unreadable (the folder is then simply not recognised)."""
    file = folder / name
    if not file.is_file():
        return {}
    try:
        data = parse_json(file.read_bytes(), f"{file}: bad JSON")
    except (OSError, ModelFileError):
        return {}
    return data if isinstance(data, dict) else {}


def _class_name(folder: Path) -> str:
    name = read_config(folder).get("_class_name")
    return name if isinstance(name, str) else ""


@dataclass
class DiffusersLayout:
    """A diffusers-layout Anima folder: its root (None: a component folder found alone) and the component
    subfolders that exist (component name -> folder)."""

    root: Path | None
    folders: dict[str, Path] = field(default_factory=dict)

    def folder(self, component: str, flag: str) -> Path:
        """The component's folder; ModelFileError naming the folder and the missing subfolder otherwise."""
        if component in self.folders:
            return self.folders[component]
        where = self.root if self.root is not None else "this folder"
        has = ", ".join(f.name + "/" for f in self.folders.values()) or "none of them"
        raise ModelFileError(f"{flag}: {where} is a diffusers-layout Anima folder without "
                             f"{COMPONENT_FOLDERS[component]}/ (it has: {has}); add that subfolder or pass the "
                             "component's own file")


def _components(root: Path) -> dict[str, Path]:
    return {c: root / sub for c, sub in COMPONENT_FOLDERS.items() if (root / sub).is_dir()}


def _is_anima_root(root: Path) -> bool:
    """A pipeline folder is Anima when its index names an Anima pipeline or it has a text conditioner with a
    Cosmos transformer (Cosmos-Predict2's own folders have a T5 text encoder and no conditioner)."""
    index = next((read_config(root, n) for n in INDEX_FILES if (root / n).is_file()), {})
    if "anima" in str(index.get("_class_name", "")).lower() or "text_conditioner" in index:
        return True
    return (root / "text_conditioner").is_dir() and (_class_name(root / "transformer") in ("", TRANSFORMER_CLASS))


def find_layout(path: str | Path) -> tuple[DiffusersLayout, str | None] | None:
    """(layout, which component `path` itself is: None for the root) when `path` is a diffusers-layout Anima
    folder or one of its component subfolders; None otherwise."""
    path = Path(path)
    if not path.is_dir():
        return None
    if any((path / n).is_file() for n in INDEX_FILES) or (path / "transformer").is_dir():
        return (DiffusersLayout(path, _components(path)), None) if _is_anima_root(path) else None
    parent = path.parent
    component = next((c for c, sub in COMPONENT_FOLDERS.items() if sub == path.name), None)
    if component is not None and parent != path and _is_anima_root(parent) \
            and (any((parent / n).is_file() for n in INDEX_FILES) or (parent / "transformer").is_dir()):
        return DiffusersLayout(parent, _components(parent)), component
    cls = _class_name(path)  # a component folder copied out of its pipeline
    alone = {TRANSFORMER_CLASS: "dit", CONDITIONER_CLASS: "llm_adapter", **{v: "vae" for v in VAE_CLASSES}}
    if cls in alone:
        return DiffusersLayout(None, {alone[cls]: path}), alone[cls]
    return None


def tokenizer_dirs(path: str | Path) -> tuple[Path | None, Path | None]:
    """(Qwen tokenizer folder, T5 tokenizer folder) a diffusers-layout folder offers when `path` (its root or
    `text_encoder/`) is the text-encoder flag: the root's `tokenizer/` (else `text_encoder/`) and `t5_tokenizer/`
    (None where absent)."""
    found = find_layout(path)
    if found is None or found[1] not in (None, "qwen3"):
        return None, None
    folders = found[0].folders  # without tokenizer/, a Hugging Face text_encoder/ may hold the Qwen tokenizer
    return folders.get("qwen_tokenizer", folders.get("qwen3")), folders.get("t5_tokenizer")


def weight_files(folder: Path, flag: str) -> list[Path]:
    """The .safetensors files of one component folder: the shards its `*.safetensors.index.json` names, else
    every `*.safetensors` in it.  A folder with only pickled weights (.bin/.pt) is refused by name."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(i.name for i in indexes)
        raise ModelFileError(f"{flag}: {folder} has {len(indexes)} shard indexes ({names}); keep the one of the "
                             "weights in use")
    if indexes:
        index = indexes[0]
        bad = f"{flag}: {index} is not a valid safetensors index"
        try:
            data = parse_json(index.read_bytes(), bad)
        except OSError as e:
            raise ModelFileError(f"{flag}: {index} cannot be read: {e.strerror or e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v and Path(v).name == v
                                                       for v in weight_map.values()):
            raise ModelFileError(f"{bad} (needs a \"weight_map\" of tensor name → file name in this folder)")
        files = [folder / n for n in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"{flag}: {index} names shards missing from {folder}: {', '.join(missing[:5])}; "
                                 "the download is incomplete")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        hint = f" (only {', '.join(found)}, which are never unpickled; convert them)" if found else ""
        raise ModelFileError(f"{flag}: {folder} has no .safetensors weights{hint}")
    return files


# Settings of a component's config.json that its weight shapes cannot show, with Anima's values (ComfyUI fixes
# them in code): another value would build another model, so it is refused by name instead of ignored.
FIXED_CONFIG = {TRANSFORMER_CLASS: {"patch_size": [1, 2, 2], "rope_scale": [1.0, 4.0, 4.0],
                                    "extra_pos_embed_type": None},
                CONDITIONER_CLASS: {"min_sequence_length": 512},
                **{v: {"z_dim": 16, "is_residual": False} for v in VAE_CLASSES}}


def check_component_config(folder: Path, flag: str) -> None:
    """Refuse a component whose config.json sets one of `FIXED_CONFIG` to a value Anima does not use."""
    config = read_config(folder)
    for key, want in FIXED_CONFIG.get(config.get("_class_name", ""), {}).items():
        if key not in config:
            continue
        got = config[key]
        same = [float(g) for g in got] == [float(w) for w in want] if isinstance(want, list) and isinstance(
            got, list) and len(got) == len(want) else got == want or (want is None and got in ("none", "None"))
        if not same:
            raise ModelFileError(f"{flag}: {folder / 'config.json'} sets {key} = {got!r}; Anima's "
                                 f"{config['_class_name']} uses {want!r} (another model in Anima's folder layout?)")


def folder_shapes(folder: Path, flag: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} over all of a component folder's weight files (headers only)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in weight_files(folder, flag):
        out.update(read_header(f)[0])
    return out


def anima_dit_shapes(layout: DiffusersLayout, flag: str, with_llm_adapter: bool = True) -> dict[str, tuple[int, ...]]:
    """Our DiT key -> shape for the layout's transformer (+ text conditioner as `llm_adapter.*`): what
    `infer_dit_config` reads.  A transformer key with no DiT name is an error naming it."""
    shapes: dict[str, tuple[int, ...]] = {}
    dit = layout.folder("dit", flag)  # a folder, or one weights file of it
    for key, (_, shape) in (read_header(dit)[0] if dit.is_file() else folder_shapes(dit, flag)).items():
        name = diffusers_key_to_anima(key)
        if name is not None:
            shapes[name] = shape
    if with_llm_adapter and "llm_adapter" in layout.folders:
        for key, (_, shape) in folder_shapes(layout.folders["llm_adapter"], flag).items():
            shapes["llm_adapter." + key] = shape
    return shapes
