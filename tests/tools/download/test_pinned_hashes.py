"""Issue 13 item 12: the SHA-256 values pinned in tools/download/sources.py are authoritative.

A Hub (or a fake endpoint) reporting another hash, bytes with another hash, or a ModelScope fallback delivering
other bytes is an error: exit 2, a message naming the file, both hashes, the source and the fix, and nothing
installed under the final name (no partial left either).  A source without a pin still has to deliver a valid
safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from anima_trainer.tools.download import sources
from anima_trainer.tools.download.errors import SourceError
from anima_trainer.tools.download.command import RECORD
from tests.crash.test_write_path import fsyncs  # noqa: F401 (fixture)
from tests.tools.download.test_command import ANIMA, _run, model_bytes, test_pins  # noqa: F401 (fixture)

DIT_FILE = sources.DIT.path.rsplit("/", 1)[-1]


def _nothing_installed(dest) -> None:
    folder = dest / "diffusion_models"
    assert not folder.exists() or list(folder.iterdir()) == [], list(folder.iterdir())


def test_fake_endpoint_with_another_9mb_file_installs_nothing(hub, tmp_path, capsys):
    """The real pins: a fake HF_ENDPOINT serving a 9 MB file under the DiT's name is refused before download."""
    fake = os.urandom(9 * 1024 * 1024)
    hub.add_hf(sources.ANIMA_REPO, sources.DIT.path, fake, lfs=True)
    stale = tmp_path / "diffusion_models" / f"{DIT_FILE}.part"  # left by an earlier, interrupted run
    stale.parent.mkdir(parents=True)
    stale.write_bytes(fake[:1000])
    assert _run(hub, tmp_path, "--only", "dit", "--no-modelscope-fallback") == 2
    err = capsys.readouterr().err
    sha = hashlib.sha256(fake).hexdigest()
    assert f"error: could not download the Anima DiT ({DIT_FILE}):" in err
    assert f"reports SHA-256 {sha}, but anima-trainer pins {sources.DIT.sha256}" in err
    assert f"{hub.hf_url}/{sources.ANIMA_REPO}/resolve/main/{sources.DIT.path}" in err
    assert "check the endpoint" in err and f"--source (…/blob/<commit>/{sources.DIT.path})" in err
    assert hub.requests("hf", "GET", "/cdn/") == []  # not one byte of it was fetched
    _nothing_installed(tmp_path)


def test_endpoint_reporting_the_pin_but_serving_other_bytes_installs_nothing(hub, tmp_path, capsys, test_pins):  # noqa: F811
    hub.add_hf(sources.ANIMA_REPO, sources.DIT.path, ANIMA["dit"], lfs=True)
    other = bytes(len(ANIMA["dit"]))
    hub.corrupt[(sources.ANIMA_REPO, "main", sources.DIT.path)] = other
    assert _run(hub, tmp_path, "--only", "dit", "--no-modelscope-fallback") == 2
    err = capsys.readouterr().err
    assert f"SHA-256 {hashlib.sha256(other).hexdigest()}, expected {hashlib.sha256(ANIMA['dit']).hexdigest()}" in err
    assert "the downloaded file was deleted (it came from http://localhost:" in err
    _nothing_installed(tmp_path)


def test_modelscope_fallback_must_deliver_the_pinned_bytes(hub, tmp_path, capsys, test_pins):  # noqa: F811
    """Whatever the mirror calls the file, it stands in for the pinned one: wrong bytes are refused."""
    hub.status[sources.ANIMA_REPO] = (403, "GatedRepo")
    wrong = model_bytes("some other model")  # a valid safetensors file, just not the DiT
    hub.add_ms("ms/anima", "dit.safetensors", wrong)
    spec = "dit=https://www.modelscope.cn/models/ms/anima/resolve/master/dit.safetensors"
    assert _run(hub, tmp_path, "--only", "dit", "--modelscope-source", spec) == 2
    err = capsys.readouterr().err
    assert "gated repo (HTTP 403)" in err
    assert (f"ModelScope ms/anima@master dit.safetensors: SHA-256 {hashlib.sha256(wrong).hexdigest()}, expected "
            f"{hashlib.sha256(ANIMA['dit']).hexdigest()}") in err
    assert f"it came from {hub.ms_url}/models/ms/anima/resolve/master/dit.safetensors" in err
    _nothing_installed(tmp_path)


def test_unpinned_source_must_deliver_a_safetensors_file(hub, tmp_path, capsys):
    """A source the user chose (no pin applies) is checked against what it reports and its header."""
    hub.add_ms("ms/mirror", "finetune.safetensors", b"<html>rate limited</html>" * 100)
    spec = "dit=https://www.modelscope.cn/models/ms/mirror/resolve/master/finetune.safetensors"
    assert _run(hub, tmp_path, "--only", "dit", "--source", spec) == 2
    err = capsys.readouterr().err
    assert "ModelScope ms/mirror@master finetune.safetensors" in err
    assert "the downloaded file is not a usable model:" in err and "is not a safetensors file" in err
    _nothing_installed(tmp_path)
    hub.add_ms("ms/mirror", "finetune.safetensors", model_bytes("a fine-tune"))
    assert _run(hub, tmp_path, "--only", "dit", "--source", spec) == 0
    assert (tmp_path / "diffusion_models" / "finetune.safetensors").read_bytes() == model_bytes("a fine-tune")


def test_present_file_recorded_with_another_hash_is_not_taken_for_the_pinned_one(hub, tmp_path, capsys):
    newer = model_bytes("a newer DiT")
    hub.add_hf(sources.ANIMA_REPO, sources.DIT.path, newer, lfs=True, rev="abc123")
    source = f"dit=https://huggingface.co/{sources.ANIMA_REPO}/blob/abc123/{sources.DIT.path}"
    assert _run(hub, tmp_path, "--only", "dit", "--source", source) == 0  # chosen on purpose: Hub hash checked
    record = json.loads((tmp_path / RECORD).read_text())
    assert record[f"diffusion_models/{DIT_FILE}"]["sha256"] == hashlib.sha256(newer).hexdigest()
    capsys.readouterr()
    assert _run(hub, tmp_path, "--only", "dit") == 2  # the default (pinned) source: that file is not the pinned one
    err = capsys.readouterr().err
    assert f"exists but its SHA-256 (recorded when it was downloaded from Hugging Face {sources.ANIMA_REPO}@abc123" \
           in err and f"while anima-trainer pins {sources.DIT.sha256}" in err and "pass --force" in err


DEEP = "[" * 100_000


def test_deeply_nested_json_in_download_bookkeeping_and_tokenizers_is_no_traceback(hub, tmp_path, test_pins,  # noqa: F811
                                                                                  tokenizers_dir):
    """Issue 13 item 15: every JSON the download code reads (its record, a partial's note, tokenizer files)."""
    from anima_trainer.tools.download import t5
    from anima_trainer.tools.download.transfer import _prepare_partial

    hub.add_hf(sources.ANIMA_REPO, sources.VAE.path, ANIMA["vae"], lfs=True)
    (tmp_path / RECORD).write_text(DEEP)
    assert _run(hub, tmp_path, "--only", "vae") == 0  # a damaged record costs a re-check, nothing more
    (tmp_path / "x.part.json").write_text(DEEP)
    assert _prepare_partial(tmp_path / "x", "id") == tmp_path / "x.part"

    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(DEEP)
    with pytest.raises(t5.TokenizerCheckError, match=r"tokenizer\.json: not a tokenizers file \(RecursionError"):
        t5.validate_t5_tokenizer(folder)
    with pytest.raises(SourceError, match=r"tokenizer\.json is not JSON \(RecursionError"):
        t5.check_downloaded(folder)
    folder.joinpath("tokenizer.json").write_bytes((tokenizers_dir / "t5" / "tokenizer.json").read_bytes())
    (folder / "config.json").write_text(DEEP)
    with pytest.raises(t5.TokenizerCheckError, match=r"config\.json: not a JSON file \(RecursionError"):
        t5.validate_t5_tokenizer(folder)


def test_a_downloaded_model_file_is_fsynced_before_and_after_its_rename(hub, tmp_path, test_pins, fsyncs):  # noqa: F811
    """Issue 13 item 7: a finished download survives a power loss like every other final file."""
    hub.add_hf(sources.ANIMA_REPO, sources.DIT.path, ANIMA["dit"], lfs=True)
    assert _run(hub, tmp_path, "--only", "dit", "--no-modelscope-fallback") == 0
    path = tmp_path / "diffusion_models" / DIT_FILE
    assert path.read_bytes() == ANIMA["dit"]
    assert (path.stat().st_ino, False) in fsyncs and (path.parent.stat().st_ino, True) in fsyncs
    assert fsyncs.index((path.stat().st_ino, False)) < fsyncs.index((path.parent.stat().st_ino, True))
