"""CPU smoke test of bench/fp8_compute.py: the tiny DiT's width, two blocks with LoRA, bf16 vs fp8 compute.

No timing is asserted (only that the numbers exist and are positive); the errors are checked for what they must
be on any machine (fp8 adds error, bf16 vs fp32 is small), and the script must run without pydantic (the lent GPU
machine's image lacks it).  The GPU numbers are run by hand (bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.conftest import BENCH, bench_script

ERROR_KEYS = tuple(f"{what}_{pair}" for what in ("update", "lora_grad")
                   for pair in ("fp8_vs_bf16", "bf16_vs_fp32", "fp8_vs_fp32"))


@pytest.fixture
def fp8_compute(monkeypatch):
    yield from bench_script("fp8_compute", monkeypatch)


def test_tiny_blocks_on_cpu_report_speed_and_error(fp8_compute, monkeypatch, tmp_path, capsys):
    from anima_trainer.models import fp8_compute as module

    calls = []
    original = module.fp8_linear
    monkeypatch.setattr(module, "fp8_linear", lambda *a: calls.append(1) or original(*a))
    out = tmp_path / "fp8_compute.json"
    report = fp8_compute.main(["--config", "tiny", "--blocks", "2", "--tokens", "16", "--batch", "1", "2",
                               "--steps", "2", "--warmup", "1", "--device", "cpu", "--json-out", str(out)])
    assert report == json.loads(out.read_text(encoding="utf-8"))
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == [*report["errors"], *report["results"]]
    meta = report["meta"]
    assert (meta["device"], meta["width"], meta["blocks"], meta["rank"]) == ("cpu", 256, 2, 32)
    assert meta["weight_mib_per_block"]["fp8"] < meta["weight_mib_per_block"]["bf16"]
    assert [(r["tokens"], r["batch"]) for r in report["results"]] == [(16, 1), (16, 2)]
    assert all(r["block_ms_bf16"] > 0 and r["block_ms_fp8"] > 0 and r["speedup"] > 0 for r in report["results"])
    (errors,) = report["errors"]
    assert errors["tokens"] == 16 and all(0 < errors[k] < 0.2 for k in ERROR_KEYS)
    assert errors["update_bf16_vs_fp32"] < errors["update_fp8_vs_bf16"]  # e4m3 (3 bits) is coarser than bf16 (7)
    assert errors["lora_grad_bf16_vs_fp32"] < errors["lora_grad_fp8_vs_bf16"]
    assert report["default_ok"] is None  # the rule is decided on a GPU only
    # the fp8 GEMM ran: 10 Linears per block, 2 blocks, in the error step and every timed fp8 step
    assert len(calls) == 10 * 2 * (1 + 2 * (1 + 2))


def test_the_rule_needs_speed_and_error_both(fp8_compute):
    import torch

    errors = [{"update_fp8_vs_bf16": 0.01, "update_bf16_vs_fp32": 0.02, "lora_grad_fp8_vs_bf16": 0.01,
               "lora_grad_bf16_vs_fp32": 0.02}]
    report = {"errors": errors, "results": [{"speedup": 1.3}, {"speedup": 1.1}]}
    cuda = torch.device("cuda")
    assert fp8_compute.default_ok(report, cuda) is True
    assert fp8_compute.default_ok(report, torch.device("cpu")) is None
    assert fp8_compute.default_ok({**report, "results": [{"speedup": 1.3}, {"speedup": 0.99}]}, cuda) is False
    worse = [{**errors[0], "lora_grad_fp8_vs_bf16": 0.03}]
    assert fp8_compute.default_ok({**report, "errors": worse}, cuda) is False


def test_runs_without_pydantic():
    """The lent GPU machine has torch and safetensors but no pydantic: the script must not import it."""
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'pydantic': raise ImportError('no pydantic here')\n"
               "sys.meta_path.insert(0, Block())\n"
               f"sys.path.insert(0, {str(BENCH)!r})\n"
               "import fp8_compute\n"
               "print('imported', 'pydantic' in sys.modules)\n")
    root = Path(BENCH).parent
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=root,
                          env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported False"
