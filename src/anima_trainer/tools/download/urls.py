"""Parse where to download from: a repo id, a Hugging Face URL or a ModelScope URL → `SourceRef`.

Accepted forms (the same for every `--source`, `t5_tokenizer_repo_id` and `t5_tokenizer_modelscope_repo_id`):

* `owner/name` (or a legacy one-part HF id such as `t5-base`) — the caller's default provider, revision and path;
  `hf:owner/name` / `modelscope:owner/name` (or `ms:`) pick the provider explicitly.
* `https://huggingface.co/owner/name[/tree|blob|resolve/<rev>/<path>]` (also `hf.co`).  `tree` names a folder
  (no path = the repo root), `blob`/`resolve` name one file.  A revision with `/` is written URL-encoded
  (`refs%2Fpr%2F3`), as the Hub itself does.
* `https://www.modelscope.cn/models/owner/name[/tree|blob|resolve/<rev>/<path>]`, `.../file/view/<rev>/<path>`
  and the API form `.../api/v1/models/owner/name/repo?Revision=<rev>&FilePath=<path>`.  A `Revision=` query
  overrides the revision of any form; `FilePath=` names one file.

Differences from sd-scripts-anima's parser (seed_system.md §3.3, pitfall 26), on purpose:
* a bare ModelScope URL defaults to ModelScope's branch `master` (sd-scripts-anima gave it HF's `main`);
* a `blob`/`resolve` URL or a `FilePath=` query is a *file* (sd-scripts-anima turned a blob URL's file path into
  a "subfolder" and `FilePath=` into its parent); folder downloads use the file's folder, file downloads the file;
* datasets/spaces URLs, URLs without a repo, a `/tree/` without revision and unknown hosts are errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

Provider = Literal["hf", "modelscope"]
DEFAULT_REVISIONS: dict[str, str] = {"hf": "main", "modelscope": "master"}
PROVIDER_NAMES: dict[str, str] = {"hf": "Hugging Face", "modelscope": "ModelScope"}
_PREFIXES = {"hf:": "hf", "huggingface:": "hf", "ms:": "modelscope", "modelscope:": "modelscope"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SourceRef:
    """One place to download from.  `path` is a folder (`is_file` False; "" = repo root) or one file."""

    provider: Provider
    repo_id: str
    revision: str
    path: str = ""
    is_file: bool = False
    path_given: bool = False  # the spec named the folder/file itself (not the caller's default)

    def describe(self, path: str | None = None) -> str:
        where = path if path is not None else self.path
        return f"{PROVIDER_NAMES[self.provider]} {self.repo_id}@{self.revision}" + (f" {where}" if where else "")

    def folder(self) -> str:
        """The folder to take files from: the path, or for a file its parent."""
        return self.path.rpartition("/")[0] if self.is_file else self.path


def _check_repo(parts: list[str], spec: str) -> str:
    if not 1 <= len(parts) <= 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"'{spec}' is not a repo id (expected owner/name)")
    return "/".join(parts)


def _clean_path(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"path '{path}' must not contain '.' or '..'")
    return "/".join(parts)


def parse_source(spec: str, *, default_provider: Provider = "hf", default_revision: str | None = None,
                 default_path: str = "", default_is_file: bool = False) -> SourceRef:
    """`spec` → SourceRef; the defaults fill in what the spec does not say.  Raises ValueError with the reason."""
    text = (spec or "").strip()
    if not text:
        raise ValueError("the source is empty (give a repo id or a huggingface.co / modelscope.cn URL)")
    lower = text.lower()
    for prefix, provider in _PREFIXES.items():
        if lower.startswith(prefix) and "://" not in lower:
            default_provider, text = provider, text[len(prefix):].strip()  # type: ignore[assignment]
            break
    if "://" not in text:
        repo = _check_repo(text.strip("/").split("/"), spec)
        return SourceRef(default_provider, repo, default_revision or DEFAULT_REVISIONS[default_provider],
                         _clean_path(default_path), default_is_file, False)
    url = urlsplit(text)
    host = (url.hostname or "").lower()
    if url.scheme not in ("http", "https"):
        raise ValueError(f"'{spec}': only http(s) URLs are accepted")
    raw_parts = [p for p in url.path.split("/") if p]
    parts = [unquote(p) for p in raw_parts]
    query = {k.lower(): v for k, v in parse_qsl(url.query)}
    if host == "hf.co" or host.endswith("huggingface.co"):
        return _parse_hf(parts, spec, default_revision, default_path, default_is_file)
    if host.endswith("modelscope.cn"):
        return _parse_modelscope(parts, query, spec, default_revision, default_path, default_is_file)
    raise ValueError(f"'{spec}': unsupported host '{host}' (expected huggingface.co or modelscope.cn)")


def _split_rest(provider: Provider, repo: str, rest: list[str], spec: str, default_revision: str | None,
                default_path: str, default_is_file: bool) -> SourceRef:
    """The part of a URL after the repo: nothing, or tree|blob|resolve/<rev>/<path...>."""
    revision = default_revision or DEFAULT_REVISIONS[provider]
    if not rest:
        return SourceRef(provider, repo, revision, _clean_path(default_path), default_is_file, False)
    kind = rest[0]
    if kind == "file" and len(rest) > 1 and rest[1] == "view":  # ModelScope's file page
        kind, rest = "blob", ["blob", *rest[2:]]
    if kind not in ("tree", "blob", "resolve"):
        raise ValueError(f"'{spec}': expected /tree/, /blob/ or /resolve/ after the repo, got '/{kind}/'")
    if len(rest) < 2:
        raise ValueError(f"'{spec}': no revision after '/{kind}/'")
    path = _clean_path("/".join(rest[2:]))
    if kind == "tree":
        return SourceRef(provider, repo, rest[1], path, False, True)
    if not path:
        raise ValueError(f"'{spec}': a /{kind}/ URL must name a file")
    return SourceRef(provider, repo, rest[1], path, True, True)


def _parse_hf(parts: list[str], spec: str, default_revision: str | None, default_path: str,
              default_is_file: bool) -> SourceRef:
    if parts and parts[0] in ("datasets", "spaces", "buckets"):
        raise ValueError(f"'{spec}': only model repos can be downloaded, not {parts[0]}")
    if len(parts) >= 2 and parts[1] in ("tree", "blob", "resolve"):
        repo_parts, rest = parts[:1], parts[1:]  # legacy one-part repo (huggingface.co/t5-base/tree/main)
    else:
        repo_parts, rest = parts[:2], parts[2:]
    if not repo_parts:
        raise ValueError(f"'{spec}': the URL names no repo (expected https://huggingface.co/owner/name...)")
    return _split_rest("hf", _check_repo(repo_parts, spec), rest, spec, default_revision, default_path,
                       default_is_file)


def _parse_modelscope(parts: list[str], query: dict[str, str], spec: str, default_revision: str | None,
                      default_path: str, default_is_file: bool) -> SourceRef:
    api = parts[:3] == ["api", "v1", "models"]
    start = 3 if api else 1
    if not (api or parts[:1] == ["models"]) or len(parts) < start + 2:
        raise ValueError(f"'{spec}': expected https://www.modelscope.cn/models/<owner>/<name>...")
    repo = _check_repo(parts[start:start + 2], spec)
    rest = parts[start + 2:]
    if api or rest[:1] in (["files"], ["summary"], ["repo"]):
        rest = []
    ref = _split_rest("modelscope", repo, rest, spec, default_revision, default_path, default_is_file)
    revision = query.get("revision") or ref.revision
    file_path = query.get("filepath")
    if file_path:
        return SourceRef("modelscope", repo, revision, _clean_path(file_path), True, True)
    return SourceRef("modelscope", repo, revision, ref.path, ref.is_file, ref.path_given)
