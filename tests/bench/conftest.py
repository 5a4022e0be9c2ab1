"""The bench scripts imported as each sees itself (bench/ first on sys.path), on one CPU thread: the tiny cases
need no more, and a busy machine makes 2 threads much slower."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_script(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Yield bench/<name>.py freshly imported, with torch on one thread for the test's duration."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)
