"""Shared fixtures: golden files, regenerated random reference models, the real tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.refweights import FIXTURES, reference_model

TOKENIZERS_ENV = "ANIMA_TEST_TOKENIZERS"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def dit_io() -> dict:
    """ComfyUI's one-call reference.  The copy here stores only the first 47 rows of `c_crossattn`
    (`c_crossattn_rows`; the rest are exactly zero in the original, checked when the copy was made) to
    stay small; `c_crossattn` is rebuilt as the [2, 512, 1024] tensor ComfyUI handed the DiT."""
    data = load_file(FIXTURES / "dit_io.safetensors")
    rows = data.pop("c_crossattn_rows")
    data["c_crossattn"] = torch.nn.functional.pad(rows, (0, 0, 0, 512 - rows.shape[1]))
    return data


@pytest.fixture(scope="session")
def dit_file(tmp_path_factory) -> Path:
    """The demo's tiny DiT (2 blocks, width 64) in the real file format, written once per session."""
    from anima_trainer.demo import write_tiny_dit

    return write_tiny_dit(tmp_path_factory.mktemp("dit") / "tiny_dit.safetensors")


@pytest.fixture
def dit(dit_file: Path):
    """A fresh fp32 tiny DiT per test (networks patch into it, levers pack its weights)."""
    from anima_trainer.models import load_dit

    return load_dit(dit_file, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_dit_path() -> Path:
    """The fixture's tiny Anima DiT (10 blocks, width 256, full LLM adapter, `net.` keys, F32)."""
    return reference_model("tiny_dit")


@pytest.fixture(scope="session")
def qwen3_path() -> Path:
    """Full-size random Qwen3-0.6B in ComfyUI's single-file layout (`model.*`, BF16)."""
    return reference_model("qwen3")


@pytest.fixture(scope="session")
def vae_path() -> Path:
    """Full-size random Qwen-Image (Wan 2.1) VAE in ComfyUI's single-file layout (BF16)."""
    return reference_model("vae")


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    """Folder with `qwen/` and `t5/` real tokenizer files; only tests needing the real vocab use it."""
    value = os.environ.get(TOKENIZERS_ENV)
    if not value:
        pytest.skip(f"{TOKENIZERS_ENV} is not set (point it at the shared tokenizers folder; .ci/run does)")
    path = Path(value)
    if not (path / "qwen" / "vocab.json").exists() or not (path / "t5" / "tokenizer.json").exists():
        raise FileNotFoundError(f"{TOKENIZERS_ENV}={value} has no qwen/vocab.json or t5/tokenizer.json")
    return path


@pytest.fixture(autouse=True, scope="session")
def _tokenizer_cache_outside_home(tmp_path_factory):
    """Unset tokenizer folders resolve to the per-user tokenizer cache under HF_HOME (download/startup.py): in
    tests that is a temporary folder, never the user's own cache."""
    old = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    yield
    if old is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = old


@pytest.fixture
def dynamo():
    """Fresh dynamo caches and counters (torch._dynamo.utils.counters, yielded); the cache limits are restored
    afterwards (tests of compiled blocks: models/compile.py, the networks' speed levers)."""
    from torch._dynamo.utils import counters

    config = torch._dynamo.config
    saved = config.cache_size_limit, config.accumulated_cache_size_limit
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    config.cache_size_limit, config.accumulated_cache_size_limit = saved
