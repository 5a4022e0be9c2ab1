"""Providers and fallback: a file or a tokenizer folder from Hugging Face, else from ModelScope.

Hugging Face: `huggingface_hub` resolves the file (`hf_hub_url` + `get_hf_file_metadata`: token handling,
the typed gated / not-found / auth errors, the LFS SHA-256 or git SHA-1, the size and the CDN location);
`transfer.download` then fetches the bytes resumably.  ModelScope: a plain GET of
`<endpoint>/models/<repo>/resolve/<rev>/<path>` (no hash metadata).  A SHA-256 pinned in `sources.py` is
authoritative for both: a Hub reporting another hash, or bytes with another hash, is an error and nothing is
installed.  A file with no pin is checked against the Hub's hash (Hugging Face), its announced size, and the
caller's `check` (model files: a valid safetensors header whose tensors fill the file exactly; tokenizers:
parsed).

Fallback rule (as sd-scripts-anima): a Hugging Face primary falls back to ModelScope on *any* failure
(unreachable, timeout, gated, 401/403/404, wrong hash); a ModelScope primary has no fallback.  When every
source fails, one DownloadError names each source and its error.  Offline (`HF_HUB_OFFLINE=1`) nothing is
downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from anima_trainer.fileio import fsync_dir
from anima_trainer.tools.download.errors import DownloadError, NotFoundError, SourceError, VerificationError
from anima_trainer.tools.download.transfer import SHA1_RE, SHA256_RE, Expected, Options, discard_partial, download
from anima_trainer.tools.download.urls import SourceRef

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Endpoints, credentials and transfer options for one run."""

    hf_endpoint: str
    modelscope_endpoint: str
    token: str | bool | None = None  # None: huggingface_hub's own (HF_TOKEN / `hf auth login`)
    opts: Options = field(default_factory=Options)


@dataclass
class Fetched:
    path: Path
    source: str  # e.g. "Hugging Face circlestone-labs/Anima@main split_files/vae/qwen_image_vae.safetensors"
    sha256: str


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_reason(e: Exception, endpoint: str, timeout: float) -> str:
    names = {c.__name__ for c in type(e).__mro__}
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if "GatedRepoError" in names:
        return (f"gated repo (HTTP {status}): accept its terms on the Hub and log in (`hf auth login` or "
                "HF_TOKEN)")
    if "RepositoryNotFoundError" in names:
        return f"repo not found, or private/gated without a valid token (HTTP {status})"
    if "RevisionNotFoundError" in names:
        return "revision not found"
    if status is not None:
        message = response.headers.get("X-Error-Message")
        return f"HTTP {status}" + (f": {message}" if message else " (access denied)" if status == 403 else "")
    if "timeout" in type(e).__name__.lower() or isinstance(e, TimeoutError):
        return f"no answer from {endpoint} within {timeout:g} s ({type(e).__name__})"
    return f"cannot reach {endpoint}: {type(e).__name__}: {first}"


def _is_entry_not_found(e: Exception) -> bool:
    return any(c.__name__ == "EntryNotFoundError" for c in type(e).__mro__)


def hf_file(ref: SourceRef, path: str, dest: Path, ctx: Context, pin: str | None = None,
            check: Callable[[Path], None] | None = None) -> Fetched:
    """One file from a Hugging Face repo.  `pin` = the SHA-256 anima-trainer pins for it: authoritative, a Hub
    reporting another hash is an error before a byte is downloaded; without a pin the Hub's own SHA-256 (or git
    SHA-1) is checked, and `check(partial)` (e.g. a safetensors header check) before the file is installed."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    label = ref.describe(path)
    url = hf_hub_url(ref.repo_id, path, revision=ref.revision, endpoint=ctx.hf_endpoint)
    try:
        meta = get_hf_file_metadata(url, token=ctx.token, timeout=ctx.opts.timeout)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's typed HTTP errors and whatever its HTTP client raises
        if _is_entry_not_found(e):
            raise NotFoundError(f"{label}: no such file in the repo") from None
        raise SourceError(f"{label}: {_hf_reason(e, ctx.hf_endpoint, ctx.opts.timeout)}") from None
    etag = (meta.etag or "").lower()
    sha = etag if SHA256_RE.fullmatch(etag) else None
    if pin and sha and sha != pin:
        discard_partial(dest)  # a partial of it from an earlier run is no more trustworthy
        raise VerificationError(
            f"{label}: {url} reports SHA-256 {sha}, but anima-trainer pins {pin} for this file; nothing was "
            f"downloaded.  The file there is not the one anima-trainer was made for (changed upstream, or "
            f"{ctx.hf_endpoint} is not the real Hub): check the endpoint; to use the new file on purpose, name its "
            f"revision in --source (…/blob/<commit>/{path}), which checks it against the Hub's hash instead")
    expected = Expected(size=meta.size, sha256=pin or sha, git_sha1=etag if SHA1_RE.fullmatch(etag) else None,
                        check=None if pin else check)
    location = urljoin(url, meta.location or url)
    headers = dict(build_hf_headers(token=ctx.token, user_agent=ctx.opts.user_agent))
    if urlsplit(location).netloc != urlsplit(ctx.hf_endpoint).netloc:
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}  # signed CDN URL
    identity = f"hf|{ref.repo_id}|{path}|{etag}|{meta.size}"
    digest = download(location, dest, headers=headers, expected=expected, identity=identity, label=label,
                      opts=ctx.opts)
    return Fetched(dest, label, digest)


def modelscope_file(ref: SourceRef, path: str, dest: Path, ctx: Context, pin: str | None = None,
                    check: Callable[[Path], None] | None = None) -> Fetched:
    """One file from a ModelScope repo (resolve URL, Range resume).  ModelScope reports no hash: with a `pin` the
    bytes must have that SHA-256; without one only the announced size and `check(partial)` are verified."""
    label = ref.describe(path)
    url = (f"{ctx.modelscope_endpoint}/models/{quote(ref.repo_id)}/resolve/{quote(ref.revision, safe='')}/"
           f"{quote(path)}")
    identity = f"ms|{ref.repo_id}|{ref.revision}|{path}|{pin}"
    digest = download(url, dest, headers={}, expected=Expected(sha256=pin, check=None if pin else check),
                      identity=identity, label=label, opts=ctx.opts)
    return Fetched(dest, label, digest)


def file_from(ref: SourceRef, path: str, dest: Path, ctx: Context, pin: str | None = None,
              check: Callable[[Path], None] | None = None) -> Fetched:
    return (hf_file if ref.provider == "hf" else modelscope_file)(ref, path, dest, ctx, pin, check)


def source_chain(primary: SourceRef, fallback: SourceRef | None) -> list[SourceRef]:
    """Hugging Face primary → [primary, ModelScope fallback]; a ModelScope primary is used alone."""
    return [primary] + ([fallback] if fallback is not None and primary.provider == "hf" else [])


def _fail(what: str, failures: Sequence[tuple[SourceRef, Exception]], note: str = "") -> DownloadError:
    lines = [f"could not download {what}:"] + [f"  - {e}" for _, e in failures]
    if note:
        lines.append(note)
    return DownloadError("\n".join(lines))


def _check_online(what: str) -> None:
    if offline():
        raise DownloadError(f"could not download {what}: HF_HUB_OFFLINE is set (offline mode); put the files there "
                            "yourself or unset HF_HUB_OFFLINE")


def fetch_file(what: str, chain: Sequence[tuple[SourceRef, str, str | None]], dest: Path, ctx: Context,
               note: str = "", check: Callable[[Path], None] | None = None) -> Fetched:
    """Try (source, file path, pinned SHA-256) in order; the first success wins.  `check` validates a file that
    no pin covers before it is installed."""
    _check_online(what)
    failures: list[tuple[SourceRef, Exception]] = []
    for i, (ref, path, pin) in enumerate(chain):
        try:
            fetched = file_from(ref, path, dest, ctx, pin, check)
            if i:
                log.warning("%s; downloaded %s from %s instead", failures[-1][1], what, fetched.source)
            return fetched
        except SourceError as e:
            failures.append((ref, e))
    raise _fail(what, failures, note)


def _folder_once(ref: SourceRef, required: Sequence[Sequence[str]], optional: Sequence[str], staging: Path,
                 ctx: Context, root_fallback: bool) -> list[Fetched]:
    """The folder's files from one source into `staging` (emptied first): its subfolder, then (Hugging Face, when
    the subfolder was only the default) the repo root, as sd-scripts-anima does."""
    subfolders = [ref.folder()]
    if root_fallback and ref.provider == "hf" and not ref.path_given and ref.folder():
        subfolders.append("")
    misses = []
    for sub in subfolders:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        got: list[Fetched] = []
        missing: list[str] = []
        for group in required:
            found = [f for f in (_maybe(ref, sub, name, staging, ctx) for name in group) if f is not None]
            if not found:
                missing.append(" or ".join(group))
            got += found
        if missing:
            where = f"'{sub}/'" if sub else "the repo root"
            misses.append(f"{where} has no {', '.join(missing)}")
            continue
        return got + [f for f in (_maybe(ref, sub, name, staging, ctx) for name in optional) if f is not None]
    raise SourceError(f"{ref.describe('')}: " + "; ".join(misses))


def _maybe(ref: SourceRef, sub: str, name: str, staging: Path, ctx: Context) -> Fetched | None:
    try:
        return file_from(ref, f"{sub}/{name}" if sub else name, staging / name, ctx)
    except NotFoundError:
        return None


def fetch_folder(what: str, chain: Sequence[SourceRef], target: Path, ctx: Context, *,
                 required: Sequence[Sequence[str]], optional: Sequence[str], root_fallback: bool = False,
                 check: Callable[[Path], None] | None = None, note: str = "") -> list[Fetched]:
    """Download a tokenizer folder into `target`: each source is staged in `.<target>.download/`, checked by
    `check(staging)` (raises SourceError), and only then are its files moved into `target`.  Files already
    in `target` are kept (never overwritten)."""
    _check_online(what)
    staging = target.parent / f".{target.name}.download"
    failures: list[tuple[SourceRef, Exception]] = []
    for ref in chain:
        try:
            fetched = _folder_once(ref, required, optional, staging, ctx, root_fallback)
            if check is not None:
                check(staging)
        except SourceError as e:
            failures.append((ref, e))
            continue
        target.mkdir(parents=True, exist_ok=True)
        placed = []
        for f in sorted(staging.iterdir()):
            final = target / f.name
            if final.exists():
                log.info("%s: keeping the existing %s", what, final)
                continue
            os.replace(f, final)
            placed.append(final)
        fsync_dir(target)
        shutil.rmtree(staging, ignore_errors=True)
        if failures:
            log.warning("%s; downloaded %s from %s instead", failures[-1][1], what, ref.describe())
        by_name = {f.path.name: f for f in fetched}
        made = f"made from the files of {ref.describe()}"
        return [Fetched(p, by_name[p.name].source, by_name[p.name].sha256) if p.name in by_name
                else Fetched(p, made, "") for p in placed]
    shutil.rmtree(staging, ignore_errors=True)
    raise _fail(what, failures, note)
