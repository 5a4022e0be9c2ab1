"""Fixtures: a running fake Hub/ModelScope pair and a download context pointed at it."""

from __future__ import annotations

import socket

import pytest

from anima_trainer.tools.download.fetch import Context
from anima_trainer.tools.download.transfer import Options
from tests.tools.download.hub_server import FakeHub
from tests.tools.download.spm_writer import spm_from_tokenizer_json


@pytest.fixture
def hub():
    h = FakeHub().start()
    yield h
    h.stop()


@pytest.fixture
def ctx(hub) -> Context:
    return Context(hub.hf_url, hub.ms_url, token=False, opts=Options(timeout=5, retries=2, backoff=0,
                                                                    progress=False))


@pytest.fixture
def closed_url() -> str:
    """A URL nobody listens on (connection refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _online(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # the tokenizer cache: never the user's own
    for name in ("HF_ENDPOINT", "ANIMA_TRAINER_MODELSCOPE_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def spiece_bytes(tokenizers_dir, tmp_path_factory) -> bytes:
    """A T5 spiece.model with the real pieces, scores and normalization map (built from the real tokenizer.json)."""
    out = tmp_path_factory.mktemp("spm") / "spiece.model"
    spm_from_tokenizer_json(tokenizers_dir / "t5" / "tokenizer.json", out)
    return out.read_bytes()
