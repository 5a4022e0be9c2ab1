"""The one table of where anima-trainer downloads things from: repo ids, file names, hashes, fallbacks.

Everything else in the package takes these values from here, so a moved file is a one-line change.  Each
entry can be overridden without editing code: `anima-trainer download --source NAME=SPEC` /
`--modelscope-source NAME=SPEC`, or the environment variables `ANIMA_TRAINER_SOURCE_<NAME>` /
`ANIMA_TRAINER_MODELSCOPE_<NAME>` (NAME upper-case, e.g. `ANIMA_TRAINER_SOURCE_DIT`); SPEC is anything
`urls.parse_source` accepts.  Endpoints: `HF_ENDPOINT` (huggingface_hub's own variable) and
`ANIMA_TRAINER_MODELSCOPE_ENDPOINT`.

Facts (checked on the Hub's file pages, 2026): the Anima repo `circlestone-labs/Anima` ships ComfyUI's
split files under `split_files/{diffusion_models,text_encoders,vae}/` (anima_arch.md §4.3/§6 name the text
encoder and VAE files; the DiT file is the one docs/models.md names).  The SHA-256 values are the LFS hashes
the Hub shows for those files and are authoritative: a Hub reporting another hash, a download with another
hash, or a ModelScope fallback (no hash metadata) delivering other bytes is an error, and nothing is
installed.  No ModelScope mirror of the Anima files is known, so they have no default fallback (pass
`--modelscope-source dit=...` if you know one).  The T5 defaults are sd-scripts-anima's (seed_system.md §3.1):
`google/t5-v1_1-base` (its files are at the repo root, so the `tokenizer` subfolder is tried first and then
the root), falling back to ModelScope `nv-community/Cosmos-Predict2-2B-Text2Image` @ `master`, `tokenizer/`.
The Qwen tokenizer comes from the Qwen3-0.6B-Base repo (same vocab/merges as ComfyUI's bundled Qwen2.5
tokenizer, identical ids for ordinary text; anima_arch.md §4.3); Qwen publishes the same repo on ModelScope.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from anima_trainer.tools.download.urls import SourceRef, parse_source

HF_ENDPOINT = "https://huggingface.co"
MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"
MODELSCOPE_ENDPOINT_ENV = "ANIMA_TRAINER_MODELSCOPE_ENDPOINT"
SOURCE_ENV = "ANIMA_TRAINER_SOURCE_"
MODELSCOPE_ENV = "ANIMA_TRAINER_MODELSCOPE_"


@dataclass(frozen=True)
class FileEntry:
    """A single model file (ComfyUI layout) placed in `<dest>/<dest_subdir>/`."""

    name: str
    title: str
    hf_repo: str
    path: str  # file path inside the repo
    sha256: str | None
    dest_subdir: str
    train_key: str  # the train.toml key that takes this file
    revision: str = "main"
    modelscope_repo: str | None = None
    modelscope_revision: str = "master"
    modelscope_path: str | None = None  # default: `path`


@dataclass(frozen=True)
class FolderEntry:
    """A tokenizer folder: `required` is a tuple of groups, each group "at least one of these files"."""

    name: str
    title: str
    hf_repo: str
    subfolder: str  # tried first; then the repo root when `root_fallback`
    required: tuple[tuple[str, ...], ...]
    optional: tuple[str, ...]
    dest_subdir: str
    train_key: str
    revision: str = "main"
    root_fallback: bool = False
    modelscope_repo: str | None = None
    modelscope_revision: str = "master"
    modelscope_subfolder: str = ""


ANIMA_REPO = "circlestone-labs/Anima"

DIT = FileEntry("dit", "Anima DiT", ANIMA_REPO, "split_files/diffusion_models/anima-base-v1.0.safetensors",
                "bd43b7cffe1ed1153d9c41e7beb2f18cb1273eafbaa3af3edd6a173dc90a006e", "diffusion_models",
                "pretrained_model_name_or_path")
QWEN3 = FileEntry("qwen3", "Qwen3-0.6B text encoder", ANIMA_REPO,
                  "split_files/text_encoders/qwen_3_06b_base.safetensors",
                  "cd2a512003e2f9f3cd3c32a9c3573f820bb28c940f73c57b1ddaa983d9223eba", "text_encoders", "qwen3")
VAE = FileEntry("vae", "Qwen-Image VAE", ANIMA_REPO, "split_files/vae/qwen_image_vae.safetensors",
                "a70580f0213e67967ee9c95f05bb400e8fb08307e017a924bf3441223e023d1f", "vae", "vae")
QWEN_TOKENIZER = FolderEntry(
    "qwen_tokenizer", "Qwen tokenizer", "Qwen/Qwen3-0.6B-Base", "", (("vocab.json",), ("merges.txt",)),
    ("tokenizer_config.json",), "tokenizers/qwen", "qwen3_tokenizer_path",
    modelscope_repo="Qwen/Qwen3-0.6B-Base")
T5_TOKENIZER = FolderEntry(
    "t5_tokenizer", "T5 tokenizer", "google/t5-v1_1-base", "tokenizer", (("tokenizer.json", "spiece.model"),),
    ("tokenizer_config.json", "special_tokens_map.json", "config.json"), "tokenizers/t5", "t5_tokenizer_path",
    root_fallback=True, modelscope_repo="nv-community/Cosmos-Predict2-2B-Text2Image",
    modelscope_subfolder="tokenizer")

ENTRIES: dict[str, FileEntry | FolderEntry] = {e.name: e for e in (DIT, QWEN3, VAE, QWEN_TOKENIZER, T5_TOKENIZER)}
GROUPS: dict[str, tuple[str, ...]] = {"tokenizers": ("qwen_tokenizer", "t5_tokenizer")}


def hf_endpoint(env: Mapping[str, str] | None = None) -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    return ((env if env is not None else os.environ).get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def modelscope_endpoint(env: Mapping[str, str] | None = None) -> str:
    return ((env if env is not None else os.environ).get(MODELSCOPE_ENDPOINT_ENV) or MODELSCOPE_ENDPOINT).rstrip("/")


def _defaults(entry: FileEntry | FolderEntry, provider: str) -> dict:
    if isinstance(entry, FileEntry):
        path = entry.path if provider == "hf" else (entry.modelscope_path or entry.path)
        return {"default_path": path, "default_is_file": True}
    return {"default_path": entry.subfolder if provider == "hf" else entry.modelscope_subfolder}


def primary_source(entry: FileEntry | FolderEntry, spec: str | None = None,
                   env: Mapping[str, str] | None = None) -> SourceRef:
    """Where `entry` comes from: `spec`, else `ANIMA_TRAINER_SOURCE_<NAME>`, else the table (Hugging Face)."""
    env = os.environ if env is None else env
    spec = spec or env.get(SOURCE_ENV + entry.name.upper()) or f"hf:{entry.hf_repo}"
    revision = entry.revision if spec == f"hf:{entry.hf_repo}" else None
    ref = parse_source(spec, default_revision=revision, **_defaults(entry, "hf"))
    if ref.provider == "modelscope" and not ref.path_given:  # ModelScope repo id: its own defaults
        ref = parse_source(spec, default_provider="modelscope", **_defaults(entry, "modelscope"))
    return ref


def fallback_source(entry: FileEntry | FolderEntry, spec: str | None = None,
                    env: Mapping[str, str] | None = None) -> SourceRef | None:
    """The ModelScope fallback: `spec`, else `ANIMA_TRAINER_MODELSCOPE_<NAME>`, else the table (may be None)."""
    env = os.environ if env is None else env
    spec = spec or env.get(MODELSCOPE_ENV + entry.name.upper())
    revision = None
    if not spec:
        if not entry.modelscope_repo:
            return None
        spec, revision = entry.modelscope_repo, entry.modelscope_revision
    ref = parse_source(spec, default_provider="modelscope", default_revision=revision,
                       **_defaults(entry, "modelscope"))
    if ref.provider != "modelscope":
        raise ValueError(f"'{spec}': the fallback must be a ModelScope repo id or modelscope.cn URL")
    return ref


def is_default_file(entry: FileEntry, ref: SourceRef) -> bool:
    """True when `entry.sha256` applies to `ref` (and is then authoritative: another hash is an error): the
    table's own Hugging Face file at the table's revision, or on ModelScope (which has no hash metadata) any file
    with the same, versioned, name (`anima-base-v1.0.safetensors` is one release).  Naming another revision
    (`--source dit=https://huggingface.co/<repo>/blob/<commit>/<path>`) or another repo is choosing another
    file on purpose: it is checked against the Hub's own hash instead."""
    if ref.provider == "hf":
        return (ref.repo_id, ref.path, ref.revision) == (entry.hf_repo, entry.path, entry.revision)
    return ref.path.rsplit("/", 1)[-1] == (entry.modelscope_path or entry.path).rsplit("/", 1)[-1]
