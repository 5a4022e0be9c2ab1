"""One file over HTTP(S): resumable `.part` download, size and hash verification, atomic rename.

Why our own transfer instead of `hf_hub_download`: the huggingface_hub version this project runs with (2.x)
downloads into a process-unique temporary file and deletes it when the process stops, so an interrupted 4 GB
download starts over; and ModelScope has no client here.  This module gives both providers the same
behaviour:

* bytes go to `<file>.part` next to the destination, with `<file>.part.json` saying which remote file (and
  which expected hash/size) the partial belongs to — a partial of another version is discarded;
* a later run (or a retry after a dropped connection) asks for the rest with `Range: bytes=N-`; a server that
  ignores the range (200) restarts the file, a 416 means "already complete".  A later run resumes only files
  whose hash is known (anything else could silently mix two versions of a changed remote file);
* the finished file must have the expected size and SHA-256 (or the Hub's git blob SHA-1 for small non-LFS
  files).  On a mismatch the partial is deleted; if the file had been resumed it is downloaded once more from
  scratch (the old partial may have been corrupt), otherwise it is an error;
* only then is it renamed onto the destination (fileio.move_into_place: fsync, rename, fsync of the folder).

`Authorization` headers are never forwarded to another host on a redirect (signed CDN URLs).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from anima_trainer.console import progress_disabled
from anima_trainer.fileio import move_into_place
from anima_trainer.tools.download.errors import NotFoundError, SourceError, VerificationError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}")
SHA1_RE = re.compile(r"[0-9a-f]{40}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass
class Options:
    """Knobs shared by every download of one run (tests shorten the timeout and the back-off)."""

    timeout: float = 60.0
    retries: int = 4  # extra attempts after a dropped connection / timeout / 5xx
    backoff: float = 2.0  # seconds before retry k is backoff * k
    progress: bool = True
    user_agent: str = "anima-trainer"


@dataclass
class Expected:
    """What the finished file must be; None = unknown (not checked)."""

    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None  # the Hub's ETag of a file stored in git (not LFS)
    check: Callable[[Path], None] | None = None  # validates the finished bytes (raises VerificationError)


class _Transient(Exception):
    """Worth another attempt (connection dropped, timeout, server error)."""


class _NoForeignAuth(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            for name in list(new.headers):
                if name.lower() == "authorization":
                    del new.headers[name]
        return new


def _ssl_context() -> ssl.SSLContext:
    try:  # certifi ships with httpx/requests (huggingface_hub's dependencies); the OS store is the fallback
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


_OPENER: urllib.request.OpenerDirector | None = None


def _opener() -> urllib.request.OpenerDirector:
    global _OPENER
    if _OPENER is None:
        _OPENER = urllib.request.build_opener(_NoForeignAuth(), urllib.request.HTTPSHandler(context=_ssl_context()))
    return _OPENER


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with _bar(path.stat().st_size, f"verify {path.name}", progress) as bar, path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def git_sha1_file(path: Path) -> str:
    """The git blob id of a file (what the Hub reports as ETag for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _bar(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=progress_disabled(not enabled), leave=False)


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def discard_partial(dest: Path) -> None:
    for p in _part_paths(dest):
        p.unlink(missing_ok=True)


def _drop_empty(dest: Path) -> None:
    """After a failure: leave nothing behind unless there are bytes worth resuming."""
    part, _ = _part_paths(dest)
    if not part.exists() or part.stat().st_size == 0:
        discard_partial(dest)


def _prepare_partial(dest: Path, identity: str) -> Path:
    """The `.part` to continue, emptied when it belongs to another remote file."""
    part, meta = _part_paths(dest)
    try:
        same = json.loads(meta.read_text(encoding="utf-8")).get("identity") == identity
    except (OSError, ValueError, AttributeError, RecursionError):  # missing, damaged or not ours: start over
        same = False
    if part.exists() and not same:
        log.info("discarding %s: it belongs to another version of the file", part)
        part.unlink()
    meta.write_text(json.dumps({"identity": identity}), encoding="utf-8")  # bookkeeping: a torn one restarts
    return part


def _response_total(resp, start: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (+ start)."""
    rng = resp.headers.get("Content-Range")
    if rng and (m := _CONTENT_RANGE.fullmatch(rng.strip())) and m.group(3) != "*":
        return int(m.group(3))
    length = resp.headers.get("Content-Length")
    if length is not None and resp.headers.get("Content-Encoding", "identity") == "identity":
        return start + int(length)
    return None


def _attempt(url: str, part: Path, headers: dict[str, str], expected: Expected, opts: Options, label: str) -> None:
    """One GET continuing `part`; returns when the part holds the whole file, else raises."""
    have = part.stat().st_size if part.exists() else 0
    if expected.size is not None and have > expected.size:
        part.unlink()
        have = 0
    if expected.size is not None and have == expected.size and have > 0:
        return
    req = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})})
    try:
        resp = _opener().open(req, timeout=opts.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: complete, or a stale partial (verification decides)
            return
        if e.code == 404:
            raise NotFoundError(f"{label}: HTTP 404 Not Found") from None
        if e.code >= 500 or e.code in (408, 429):
            raise _Transient(f"{label}: HTTP {e.code} {e.reason}") from None
        raise SourceError(f"{label}: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused/reset connections
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise SourceError(f"{label}: {reason}") from None
        raise _Transient(f"{label}: {type(reason).__name__}: {reason}") from None
    with resp:
        start = have if resp.status == 206 else 0  # 200: the server ignored the range → start over
        m = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
        if resp.status == 206 and (not m or int(m.group(1)) != have):
            part.unlink(missing_ok=True)
            raise _Transient(f"{label}: the server answered another range ({resp.headers.get('Content-Range')})")
        total = _response_total(resp, start)
        if expected.size is not None and total is not None and total != expected.size:
            raise SourceError(f"{label}: the server sends {total} bytes, expected {expected.size}")
        mode = "ab" if start else "wb"
        with part.open(mode) as f, _bar(total, label.rsplit("/", 1)[-1], opts.progress) as bar:
            if start:
                f.truncate(start)
            bar.update(start)
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise _Transient(f"{label}: connection lost after {f.tell()} bytes ({e})") from None
            got = f.tell()
    if total is not None and got < total:
        raise _Transient(f"{label}: connection closed after {got} of {total} bytes")


def _verify(part: Path, expected: Expected, label: str, progress: bool) -> str:
    """Check the finished partial; returns its SHA-256."""
    size = part.stat().st_size
    if expected.size is not None and size != expected.size:
        raise VerificationError(f"{label}: size {size} bytes, expected {expected.size}")
    digest = sha256_file(part, progress and size > 64 * CHUNK)
    if expected.sha256 and digest != expected.sha256.lower():
        raise VerificationError(f"{label}: SHA-256 {digest}, expected {expected.sha256.lower()}")
    if expected.git_sha1 and (blob := git_sha1_file(part)) != expected.git_sha1.lower():
        raise VerificationError(f"{label}: git blob SHA-1 {blob}, expected {expected.git_sha1.lower()}")
    if expected.check is not None:
        try:
            expected.check(part)
        except VerificationError as e:
            raise VerificationError(f"{label}: {e}") from None
    return digest


def download(url: str, dest: Path, *, headers: dict[str, str], expected: Expected, identity: str, label: str,
             opts: Options) -> str:
    """Download `url` to `dest` (see module docstring); returns the SHA-256.  Raises NotFoundError,
    VerificationError or SourceError (with `label`, e.g. "Hugging Face owner/name@main path")."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    headers = {"User-Agent": opts.user_agent, **headers, "Accept-Encoding": "identity"}
    if not (expected.sha256 or expected.git_sha1):
        discard_partial(dest)  # nothing could catch a stale partial of a changed remote file: start clean
    part = _prepare_partial(dest, identity)
    kept = ("the partial file is kept and the next run resumes it" if expected.sha256 or expected.git_sha1
            else "the next run starts over: nothing could verify a resumed file")
    restarted = False
    while True:
        resumed = part.exists() and part.stat().st_size > 0
        for attempt in range(opts.retries + 1):
            try:
                _attempt(url, part, headers, expected, opts, label)
                break
            except _Transient as e:
                if attempt == opts.retries:
                    _drop_empty(dest)
                    raise SourceError(f"{e} (gave up after {attempt + 1} attempts; {kept})") from None
                log.warning("%s; retrying", e)
                time.sleep(opts.backoff * (attempt + 1))
            except SourceError:
                _drop_empty(dest)
                raise
        try:
            digest = _verify(part, expected, label, opts.progress)
        except VerificationError as e:
            discard_partial(dest)
            if resumed and not restarted:
                log.warning("%s; it had been resumed from an earlier partial file: downloading it again from the "
                            "start", e)
                restarted = True
                part = _prepare_partial(dest, identity)
                continue
            raise VerificationError(f"{e}; the downloaded file was deleted (it came from {url}: check the endpoint "
                                    "and the source, HF_ENDPOINT / --hf-endpoint / --source / --modelscope-source)"
                                    ) from None
        move_into_place(part, dest)  # a resumable .part is written in place: the write path's last steps here
        _part_paths(dest)[1].unlink(missing_ok=True)
        return digest
