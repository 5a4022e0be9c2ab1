"""A local imitation of the Hugging Face and ModelScope download endpoints (http.server on 127.0.0.1).

Hugging Face, as huggingface_hub's `get_hf_file_metadata` reads it (file_download.py):
* `HEAD|GET /<owner>/<name>/resolve/<rev>/<path>` of a git file → 200 with `ETag: "<git blob sha1>"`,
  `X-Repo-Commit`, `Content-Length`;
* of an LFS file → 302 to the "CDN" on another origin (`localhost` instead of `127.0.0.1`, so huggingface_hub
  does not follow it) with `X-Linked-Etag: "<sha256>"`, `X-Linked-Size`, `X-Repo-Commit`;
* errors carry `X-Error-Code` (`EntryNotFound`, `RepoNotFound`, `GatedRepo`), which huggingface_hub turns into
  its typed exceptions.
ModelScope: `GET /models/<owner>/<name>/resolve/<rev>/<path>`.  Both serve `Range: bytes=N-` (206/416).

Faults for the tests: `cut[key] = [n, ...]` ends the next responses for that file after n body bytes (the
Content-Length still announces the whole file); `corrupt[key] = bytes` serves other bytes than the metadata
describes; `status[repo] = (code, x_error_code)` fails a whole repo; `head_delay` stalls HEAD requests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Seen:
    server: str
    method: str
    path: str
    headers: dict


@dataclass
class FakeHub:
    hf: dict = field(default_factory=dict)  # (repo, rev, path) -> bytes
    lfs: set = field(default_factory=set)  # keys served through the CDN redirect
    ms: dict = field(default_factory=dict)  # (repo, rev, path) -> bytes
    status: dict = field(default_factory=dict)  # repo -> (HTTP code, X-Error-Code or None)
    cut: dict = field(default_factory=dict)  # key -> list of byte counts, one per next response
    corrupt: dict = field(default_factory=dict)  # key -> bytes served instead
    head_delay: float = 0.0
    seen: list = field(default_factory=list)

    def add_hf(self, repo: str, path: str, data: bytes, *, lfs: bool = False, rev: str = "main") -> None:
        self.hf[(repo, rev, path)] = data
        if lfs:
            self.lfs.add((repo, rev, path))

    def add_ms(self, repo: str, path: str, data: bytes, *, rev: str = "master") -> None:
        self.ms[(repo, rev, path)] = data

    def requests(self, server: str, method: str = "GET", contains: str = "") -> list[Seen]:
        return [s for s in self.seen if s.server == server and s.method == method and contains in s.path]

    # ------------------------------------------------------------------------------------------- serving
    def start(self) -> "FakeHub":
        self._servers = []
        for name in ("hf", "ms"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, name))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
            self._servers.append(server)
        self.hf_url = f"http://127.0.0.1:{self._servers[0].server_port}"
        self.ms_url = f"http://127.0.0.1:{self._servers[1].server_port}"
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()


def _handler(hub: FakeHub, name: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _error(self, code: int, error_code: str | None = None) -> None:
            self.send_response(code)
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.seen.append(Seen(name, self.command, path, dict(self.headers)))
            if self.command == "HEAD" and hub.head_delay:
                time.sleep(hub.head_delay)
            parts = [unquote(p) for p in path.split("/") if p]
            if name == "hf" and parts[:1] == ["cdn"]:
                key = next((k for k in hub.lfs if hashlib.sha256(hub.hf[k]).hexdigest() == parts[1]), None)
                return self._bytes(key, hub.hf[key], body) if key else self._error(404)
            if name == "ms":
                if parts[:1] != ["models"] or len(parts) < 6 or parts[3] != "resolve":
                    return self._error(404)
                repo, rev, file = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
                files, repos = hub.ms, {k[0] for k in hub.ms}
            else:
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404)
                repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                files, repos = hub.hf, {k[0] for k in hub.hf}
            if repo in hub.status:
                return self._error(*hub.status[repo])
            if repo not in repos:
                return self._error(404 if name == "ms" else 401, "RepoNotFound")
            key = (repo, rev, file)
            if key not in files:
                return self._error(404, "EntryNotFound")
            data = files[key]
            if name == "hf" and key in hub.lfs:
                sha = hashlib.sha256(data).hexdigest()
                port = self.server.server_port
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/cdn/{sha}")
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._bytes(key, data, body, etag=git_sha1(data) if name == "hf" else None)

        def _bytes(self, key, data: bytes, body: bool, etag: str | None = None) -> None:
            served = hub.corrupt.get(key, data)
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
                if start >= len(served):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(served)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(served) - 1}/{len(served)}")
            if etag:
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(served) - start))
            self.end_headers()
            if not body:
                return
            chunk = served[start:]
            cuts = hub.cut.get(key)
            if cuts:
                chunk = chunk[:cuts.pop(0)]
            self.wfile.write(chunk)
            self.wfile.flush()
            self.close_connection = True

    return Handler
