"""Downloads against the local fake Hub / ModelScope: success, fallback, failures, resume, verification."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from anima_trainer.tools.download import sources
from anima_trainer.tools.download.errors import DownloadError, NotFoundError
from anima_trainer.tools.download.fetch import Context, fetch_file, fetch_folder, hf_file, source_chain
from anima_trainer.tools.download.urls import SourceRef

REPO = "test/anima"
FILE = "split_files/vae/model.safetensors"
DATA = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(DATA).hexdigest()
HF = SourceRef("hf", REPO, "main", FILE, True)
MS = SourceRef("modelscope", "ms/anima", "master", FILE, True)


def _file(hub, ctx, dest, chain=None):
    chain = chain or [(HF, FILE, None)]
    return fetch_file("the test file", chain, dest, ctx)


def test_lfs_file_is_verified_and_auth_stays_on_the_hub(hub, ctx, tmp_path):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    ctx.token = "hf_secret"
    got = _file(hub, ctx, tmp_path / "m.safetensors")
    assert got.path.read_bytes() == DATA and got.sha256 == SHA
    assert got.source == f"Hugging Face {REPO}@main {FILE}"
    assert not list(tmp_path.glob("*.part*"))
    head = hub.requests("hf", "HEAD", "/resolve/")[0]
    assert head.headers.get("authorization") == "Bearer hf_secret"
    cdn = hub.requests("hf", "GET", "/cdn/")
    assert len(cdn) == 1 and "authorization" not in {k.lower() for k in cdn[0].headers}  # other host


def test_git_file_checked_against_its_blob_sha1(hub, ctx, tmp_path):
    hub.add_hf(REPO, "config.json", b'{"a": 1}')
    assert hf_file(HF, "config.json", tmp_path / "config.json", ctx).path.read_bytes() == b'{"a": 1}'
    hub.corrupt[(REPO, "main", "config.json")] = b'{"a": 2}'
    with pytest.raises(DownloadError, match="git blob SHA-1 .*, expected "):
        _file(hub, ctx, tmp_path / "again.json", [(HF, "config.json", None)])
    assert not (tmp_path / "again.json").exists()


def test_sha256_mismatch_is_deleted_and_reported(hub, ctx, tmp_path):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    hub.corrupt[(REPO, "main", FILE)] = bytes(len(DATA))  # right size, wrong bytes
    with pytest.raises(DownloadError) as e:
        _file(hub, ctx, tmp_path / "m.safetensors")
    assert f"SHA-256 {hashlib.sha256(bytes(len(DATA))).hexdigest()}, expected {SHA}" in str(e.value)
    assert "the downloaded file was deleted" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_response_is_resumed_with_range(hub, ctx, tmp_path):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    hub.cut[(REPO, "main", FILE)] = [3000, 2000]  # two dropped connections, then the rest
    got = _file(hub, ctx, tmp_path / "m.safetensors")
    assert got.path.read_bytes() == DATA
    ranges = [r.headers.get("Range") for r in hub.requests("hf", "GET", "/cdn/")]
    assert ranges == [None, "bytes=3000-", "bytes=5000-"]


def test_corrupt_partial_from_an_earlier_run_is_redownloaded(hub, ctx, tmp_path, caplog):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    dest = tmp_path / "m.safetensors"
    hub.cut[(REPO, "main", FILE)] = [4096]
    ctx.opts.retries = 0
    with pytest.raises(DownloadError, match="connection closed after 4096 of 10240 bytes .*partial file is kept"):
        _file(hub, ctx, dest)
    part = tmp_path / "m.safetensors.part"
    assert part.stat().st_size == 4096
    part.write_bytes(b"\xff" * 4096)  # the earlier bytes got damaged
    with caplog.at_level(logging.WARNING):
        got = _file(hub, ctx, dest)
    assert got.path.read_bytes() == DATA and not part.exists()
    ranges = [r.headers.get("Range") for r in hub.requests("hf", "GET", "/cdn/")]
    assert ranges == [None, "bytes=4096-", None]  # resumed, failed verification, downloaded from scratch
    assert "downloading it again from the start" in caplog.text


def test_partial_of_another_version_is_discarded(hub, ctx, tmp_path):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    dest = tmp_path / "m.safetensors"
    (tmp_path / "m.safetensors.part").write_bytes(b"x" * 100)
    (tmp_path / "m.safetensors.part.json").write_text('{"identity": "hf|test/anima|old|etag|1"}')
    assert _file(hub, ctx, dest).path.read_bytes() == DATA
    assert [r.headers.get("Range") for r in hub.requests("hf", "GET", "/cdn/")] == [None]


def test_gated_hf_falls_back_to_modelscope(hub, ctx, tmp_path, caplog):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    hub.status[REPO] = (403, "GatedRepo")
    hub.add_ms("ms/anima", FILE, DATA)
    with caplog.at_level(logging.WARNING):
        got = _file(hub, ctx, tmp_path / "m.safetensors", [(HF, FILE, None), (MS, FILE, SHA)])
    assert got.path.read_bytes() == DATA and got.source == f"ModelScope ms/anima@master {FILE}"
    assert "gated repo (HTTP 403)" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("status, reason", [
    ((403, None), "HTTP 403 (access denied)"),
    ((500, None), "HTTP 500"),
    ((401, "RepoNotFound"), "repo not found, or private/gated without a valid token (HTTP 401)"),
    ((404, "EntryNotFound"), "no such file in the repo"),
])
def test_both_sources_failing_names_both(hub, ctx, tmp_path, status, reason):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    hub.status[REPO] = status
    hub.add_ms("ms/other", "x", b"")  # the repo exists on ModelScope, the file does not
    ms = SourceRef("modelscope", "ms/other", "master", FILE, True)
    with pytest.raises(DownloadError) as e:
        _file(hub, ctx, tmp_path / "m.safetensors", [(HF, FILE, None), (ms, FILE, None)])
    lines = str(e.value).splitlines()
    assert list(tmp_path.iterdir()) == []  # no stray .part / .part.json
    assert lines[0] == "could not download the test file:"
    assert lines[1] == f"  - Hugging Face {REPO}@main {FILE}: {reason}"
    assert lines[2] == f"  - ModelScope ms/other@master {FILE}: HTTP 404 Not Found"


def test_unreachable_and_silent_hub(hub, ctx, tmp_path, closed_url):
    hub.add_ms("ms/anima", FILE, DATA)
    down = Context(closed_url, hub.ms_url, token=False, opts=ctx.opts)
    got = _file(hub, down, tmp_path / "a", [(HF, FILE, None), (MS, FILE, None)])
    assert got.path.read_bytes() == DATA
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    hub.head_delay = 1.0
    ctx.opts.timeout = 0.2
    with pytest.raises(DownloadError, match=r"no answer from http://127\.0\.0\.1:\d+ within 0\.2 s"):
        _file(hub, ctx, tmp_path / "b")
    with pytest.raises(DownloadError, match="cannot reach http://127.0.0.1:"):
        _file(hub, down, tmp_path / "c")


def test_modelscope_partial_resumes_and_is_checked_against_the_pin(hub, ctx, tmp_path):
    hub.add_ms("ms/anima", FILE, DATA)
    hub.cut[("ms/anima", "master", FILE)] = [6000]
    ctx.opts.retries = 0
    dest = tmp_path / "m.safetensors"
    with pytest.raises(DownloadError, match="connection closed after 6000 of 10240 bytes"):
        _file(hub, ctx, dest, [(MS, FILE, SHA)])
    got = _file(hub, ctx, dest, [(MS, FILE, SHA)])
    assert got.path.read_bytes() == DATA
    assert [r.headers.get("Range") for r in hub.requests("ms")] == [None, "bytes=6000-"]
    # a wrong file on the mirror is caught by the pin
    hub.corrupt[("ms/anima", "master", FILE)] = DATA[::-1]
    with pytest.raises(DownloadError, match=f"SHA-256 .*, expected {SHA}"):
        _file(hub, ctx, tmp_path / "other", [(MS, FILE, SHA)])


def test_unverifiable_partial_is_not_resumed_across_runs(hub, ctx, tmp_path):
    hub.add_ms("ms/anima", "tok.json", b"{}" * 100)
    dest = tmp_path / "tok.json"
    (tmp_path / "tok.json.part").write_bytes(b"{}" * 10)
    assert _file(hub, ctx, dest, [(SourceRef("modelscope", "ms/anima", "master"), "tok.json", None)]).path \
        .read_bytes() == b"{}" * 100
    assert [r.headers.get("Range") for r in hub.requests("ms")] == [None]


def test_offline_mode_downloads_nothing(hub, ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set"):
        _file(hub, ctx, tmp_path / "m")
    assert hub.seen == []


def test_folder_tries_subfolder_then_root_and_keeps_existing_files(hub, ctx, tmp_path):
    repo = "google/t5-v1_1-base"
    hub.add_hf(repo, "spiece.model", b"spm")
    hub.add_hf(repo, "tokenizer_config.json", b"{}")
    ref = SourceRef("hf", repo, "main", "tokenizer")  # default subfolder (not given): the root is tried next
    target = tmp_path / "t5"
    target.mkdir()
    (target / "tokenizer_config.json").write_text("mine")
    got = fetch_folder("t5", [ref], target, ctx, required=(("tokenizer.json", "spiece.model"),),
                       optional=("tokenizer_config.json", "config.json"), root_fallback=True)
    assert [f.path.name for f in got] == ["spiece.model"]
    assert (target / "spiece.model").read_bytes() == b"spm" and (target / "tokenizer_config.json").read_text() == \
        "mine"
    assert not (tmp_path / ".t5.download").exists()
    given = SourceRef("hf", repo, "main", "tokenizer", path_given=True)  # an explicit folder: no root fallback
    with pytest.raises(DownloadError, match="'tokenizer/' has no tokenizer.json or spiece.model"):
        fetch_folder("t5", [given], tmp_path / "t5b", ctx, required=(("tokenizer.json", "spiece.model"),),
                     optional=(), root_fallback=True)


def test_folder_check_failure_moves_on_to_the_fallback(hub, ctx, tmp_path):
    from anima_trainer.tools.download.errors import SourceError

    hub.add_hf("a/b", "vocab.json", b"<html>error page</html>")
    hub.add_ms("c/d", "vocab.json", b"{}")

    def check(folder: Path) -> None:
        if not (folder / "vocab.json").read_bytes().startswith(b"{"):
            raise SourceError("vocab.json is not JSON")

    chain = source_chain(SourceRef("hf", "a/b", "main"), SourceRef("modelscope", "c/d", "master"))
    got = fetch_folder("qwen", chain, tmp_path / "q", ctx, required=(("vocab.json",),), optional=(), check=check)
    assert got[0].source == "ModelScope c/d@master vocab.json"
    assert (tmp_path / "q" / "vocab.json").read_bytes() == b"{}"


def test_not_found_is_typed(hub, ctx, tmp_path):
    hub.add_hf(REPO, "a", b"a")
    with pytest.raises(NotFoundError):
        hf_file(HF, "missing.json", tmp_path / "x", ctx)


def test_pin_differing_from_the_hub_is_an_error_before_any_byte(hub, ctx, tmp_path):
    hub.add_hf(REPO, FILE, DATA, lfs=True)
    with pytest.raises(DownloadError) as e:
        _file(hub, ctx, tmp_path / "m", [(HF, FILE, "0" * 64)])
    assert f"reports SHA-256 {SHA}, but anima-trainer pins {'0' * 64}" in str(e.value)
    assert f"{hub.hf_url}/{REPO}/resolve/main/{FILE}" in str(e.value) and "/blob/<commit>/" in str(e.value)
    assert hub.requests("hf", "GET", "/cdn/") == [] and list(tmp_path.iterdir()) == []
    assert sources.DIT.sha256 and replace(sources.DIT).sha256 == sources.DIT.sha256  # the table keeps its pins
