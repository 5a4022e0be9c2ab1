"""Shared fixtures for network tests: the tiny demo DiT (2 blocks, width 64) in the real file format."""

import pytest
import torch

from anima_trainer.demo import write_tiny_dit
from anima_trainer.models import load_dit


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("dit") / "tiny_dit.safetensors")


@pytest.fixture
def dit(dit_file):
    """A fresh fp32 tiny DiT per test (networks hook into it)."""
    return load_dit(dit_file, dtype=torch.float32)
