"""Training start-up: make the configured tokenizer folders complete before the text encoder is loaded.

`ensure_tokenizers(cfg)` runs before `load_models` (it needs no GPU and no model weights, so a missing or
wrong tokenizer fails in seconds, not after the DiT has loaded):

* the T5 folder (`t5_tokenizer_path`, else `<qwen3_tokenizer_path or qwen3 folder>/t5`, else a diffusers-layout
  qwen3 folder's `t5_tokenizer/`, as the loader resolves it) must hold `tokenizer.json` or `spiece.model`;
* the Qwen folder, only when `qwen3_tokenizer_path` is set, must hold `vocab.json` + `merges.txt` (or
  `tokenizer.json`), directly or under `qwen/`;
* a folder that is not set (no `t5_tokenizer_path` and no `t5/` beside the Qwen tokenizer; no
  `qwen3_tokenizer_path` while `qwen3` is one file) is a per-user cache folder (`tokenizer_cache_dir`, else
  huggingface_hub's `$HF_HOME`, see `tokenizer_cache_root`), so a config that names only `qwen3` works; once
  filled it is used offline.  `with_tokenizer_dirs` gives the loader those folders.

What is missing is downloaded into that folder when `auto_download_t5_tokenizer` is on (the default; the one
switch covers both tokenizers): T5 from `t5_tokenizer_repo_id` / `t5_tokenizer_subfolder` (then the repo
root), falling back to `t5_tokenizer_modelscope_*` when `t5_tokenizer_modelscope_fallback`; Qwen from the
table in `sources.py`.  With auto-download off a ConfigError names the key, the folder and the missing
files.  After this the loader reads only local files.  `t5_tokenizer_validate_strict` then checks the T5
folder (see `t5.validate_t5_tokenizer`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from anima_trainer.config.errors import ConfigError
from anima_trainer.models.diffusers_layout import tokenizer_dirs
from anima_trainer.tools.download import sources, t5
from anima_trainer.tools.download.errors import SourceError
from anima_trainer.tools.download.fetch import Context, Fetched, fetch_folder, source_chain
from anima_trainer.tools.download.transfer import Options
from anima_trainer.tools.download.urls import SourceRef, parse_source

if TYPE_CHECKING:
    from anima_trainer.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TokenizerDirs:
    """The folders the text encoder will load (qwen None: taken from the Qwen3 folder by the loader)."""

    qwen: Path | None
    t5: Path
    downloaded: list[Fetched] = field(default_factory=list)


def _has_bpe(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


def _qwen_missing(folder: Path) -> list[str]:
    if _has_bpe(folder) or _has_bpe(folder / "qwen"):
        return []
    return [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]


def tokenizer_cache_root(cfg: TrainConfig, env: Mapping[str, str] | None = None) -> Path:
    """Where tokenizers go whose folder is not set: `tokenizer_cache_dir`, else huggingface_hub's per-user cache
    home (`$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`) + `anima-trainer/tokenizers`.
    Read now, not at import, so that HF_HOME set by the caller counts."""
    if cfg.tokenizer_cache_dir is not None:
        return Path(cfg.tokenizer_cache_dir).expanduser()
    env = os.environ if env is None else env
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                              "huggingface")
    return Path(home).expanduser() / "anima-trainer" / "tokenizers"


def _cache_folder(root: Path, kind: str, ref: SourceRef) -> Path:
    """One folder per tokenizer and source (`t5-hf-google--t5-v1_1-base`): another source is another folder."""
    return root / f"{kind}-{ref.provider}-{ref.repo_id.replace('/', '--')}"


def _qwen_cached(cfg: TrainConfig) -> Path | None:
    """The cache folder of the Qwen tokenizer when no folder gives one: qwen3_tokenizer_path unset and qwen3
    one file (a Hugging Face Qwen3 folder holds its own tokenizer); else None."""
    if cfg.qwen3_tokenizer_path is not None or Path(cfg.qwen3).is_dir():
        return None
    return _cache_folder(tokenizer_cache_root(cfg), "qwen", sources.primary_source(sources.QWEN_TOKENIZER))


def t5_dir_of(cfg: TrainConfig) -> Path:
    """The T5 folder the loader will use (models/text.py resolves it the same way); unset and not found beside
    the Qwen tokenizer: the tokenizer cache folder (`tokenizer_cache_root`), as kohya and huggingface_hub keep
    downloaded tokenizers in a per-user cache."""
    if cfg.t5_tokenizer_path is not None:
        return Path(cfg.t5_tokenizer_path)
    base = cfg.qwen3_tokenizer_path or (cfg.qwen3 if Path(cfg.qwen3).is_dir() else None)
    if base is not None and (Path(base) / "t5").is_dir():
        return Path(base) / "t5"
    if cfg.qwen3_tokenizer_path is None and (offered := tokenizer_dirs(cfg.qwen3)[1]) is not None:
        return offered  # a diffusers-layout folder's t5_tokenizer/
    return _cache_folder(tokenizer_cache_root(cfg), "t5", t5_sources(cfg)[0])


def with_tokenizer_dirs(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the unset tokenizer folders filled in by the folders `ensure_tokenizers` completes (the cache
    folders), so that the loader reads exactly those."""
    update: dict[str, Path] = {}
    if cfg.t5_tokenizer_path is None:
        update["t5_tokenizer_path"] = t5_dir_of(cfg)
    if (qwen := _qwen_cached(cfg)) is not None:
        update["qwen3_tokenizer_path"] = qwen
    return cfg.model_copy(update=update) if update else cfg


def _missing_message(key: str, folder: Path, missing: list[str]) -> str:
    state = f"does not exist (needed: {', '.join(missing)})" if not folder.exists() else f"lacks {', '.join(missing)}"
    return (f"{key}: the folder {folder} {state}; turn auto_download_t5_tokenizer on (the default) to download "
            f"it, or point {key} at a complete tokenizer folder (`anima-trainer download --only tokenizers` "
            "fetches both)")


def t5_sources(cfg: TrainConfig):
    """(primary, ModelScope fallback or None) from the t5_tokenizer_* settings."""
    primary = parse_source(cfg.t5_tokenizer_repo_id, default_path=cfg.t5_tokenizer_subfolder)
    if primary.provider == "modelscope" and not primary.path_given:
        primary = parse_source(cfg.t5_tokenizer_repo_id, default_provider="modelscope",
                               default_revision=cfg.t5_tokenizer_modelscope_revision,
                               default_path=cfg.t5_tokenizer_modelscope_subfolder)
    fallback = None
    if cfg.t5_tokenizer_modelscope_fallback:
        fallback = parse_source(cfg.t5_tokenizer_modelscope_repo_id, default_provider="modelscope",
                                default_revision=cfg.t5_tokenizer_modelscope_revision,
                                default_path=cfg.t5_tokenizer_modelscope_subfolder)
    return primary, fallback


def _qwen_check(folder: Path) -> None:
    import json

    try:
        json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise SourceError(f"the downloaded vocab.json is broken: {e}") from None


def ensure_tokenizers(cfg: TrainConfig, *, ctx: Context | None = None) -> TokenizerDirs:
    """Complete (download) the tokenizer folders `cfg` names; ConfigError / DownloadError otherwise."""
    ctx = ctx or Context(sources.hf_endpoint(), sources.modelscope_endpoint(), opts=Options())
    t5_dir = t5_dir_of(cfg)
    qwen_cache = _qwen_cached(cfg)
    result = TokenizerDirs(Path(cfg.qwen3_tokenizer_path) if cfg.qwen3_tokenizer_path else qwen_cache, t5_dir)
    if t5.missing_files(t5_dir):
        if not cfg.auto_download_t5_tokenizer:
            if cfg.t5_tokenizer_path is None:
                raise ConfigError(f"t5_tokenizer_path: not set, and the tokenizer cache folder {t5_dir} is not filled; "
                                  "set it to the T5 tokenizer folder, or turn auto_download_t5_tokenizer on (the "
                                  "default) to download it into the cache")
            raise ConfigError(_missing_message("t5_tokenizer_path", t5_dir, t5.missing_files(t5_dir)))
        primary, fallback = t5_sources(cfg)
        log.warning("T5 tokenizer files missing in %s; downloading them from %s", t5_dir, primary.describe())
        note = "" if fallback else ("(the ModelScope fallback is off: t5_tokenizer_modelscope_fallback = false)"
                                    if primary.provider == "hf" else "")
        e = sources.T5_TOKENIZER
        result.downloaded += fetch_folder(f"the T5 tokenizer into {t5_dir}", source_chain(primary, fallback),
                                          t5_dir, ctx, required=e.required, optional=e.optional,
                                          root_fallback=e.root_fallback, check=t5.check_downloaded, note=note)
    else:
        try:
            if t5.make_loadable(t5_dir):
                log.info("wrote %s from spiece.model", t5_dir / "tokenizer.json")
        except Exception as err:  # noqa: BLE001 - unwritable folder, a broken spiece.model (protobuf / tokenizers errors)
            raise ConfigError(f"t5_tokenizer_path: {t5_dir} has only spiece.model, and tokenizer.json could not be "
                              f"made from it ({err}); install `sentencepiece` or add tokenizer.json") from None
    qwen_dir = result.qwen
    if qwen_dir is not None and (missing := _qwen_missing(qwen_dir)):
        if not cfg.auto_download_t5_tokenizer and qwen_cache is not None:
            raise ConfigError(f"qwen3_tokenizer_path: not set, qwen3 is one file, and the tokenizer cache folder "
                              f"{qwen_dir} is not filled; set it to the Qwen tokenizer folder, or turn "
                              "auto_download_t5_tokenizer on (the default) to download it into the cache")
        if not cfg.auto_download_t5_tokenizer:
            raise ConfigError(_missing_message("qwen3_tokenizer_path", qwen_dir, missing))
        e = sources.QWEN_TOKENIZER
        primary = sources.primary_source(e)
        fallback = sources.fallback_source(e) if cfg.t5_tokenizer_modelscope_fallback else None
        log.warning("Qwen tokenizer files missing in %s; downloading them from %s", qwen_dir, primary.describe())
        result.downloaded += fetch_folder(f"the Qwen tokenizer into {qwen_dir}", source_chain(primary, fallback),
                                          qwen_dir, ctx, required=e.required, optional=e.optional,
                                          root_fallback=e.root_fallback, check=_qwen_check)
    if cfg.t5_tokenizer_validate_strict:
        try:
            t5.validate_t5_tokenizer(t5_dir)
        except t5.TokenizerCheckError as err:
            raise ConfigError(f"t5_tokenizer_validate_strict: {err}") from None
    return result
