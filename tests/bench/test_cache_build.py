"""CPU smoke test of bench/cache_build.py at tiny size: every stage writes its row, and the pipeline rows come from
the real latent-cache build (workers and in process).  No timing is asserted beyond the numbers being positive; the
GPU numbers are run by hand (bench/README.md)."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import bench_script

CASES = ["decode", "qwen3", "llm_adapter", "vae_encode", "pipeline", "pipeline_serial"]
FIELDS = ("case", "device", "dtype", "torch", "size", "images", "seconds", "images_per_s", "projected_s")


@pytest.fixture
def cache_build(monkeypatch):
    yield from bench_script("cache_build", monkeypatch)


def test_tiny_run_on_cpu_measures_every_stage_and_compares_with_the_step_rate(cache_build, monkeypatch, tmp_path,
                                                                              capsys):
    from anima_trainer.cache import build

    built = []
    original = build.cache_latents
    monkeypatch.setattr(build, "cache_latents", lambda *a, **kw: built.append(kw["workers"]) or original(*a, **kw))
    out = tmp_path / "cache_build.json"
    result = cache_build.main(["--device", "cpu", "--tiny", "--images", "5", "--size", "64", "--batch", "2",
                               "--workers", "2", "--json-out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rows = result["results"]
    assert printed == rows == json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["case"] for r in rows] == CASES
    for row in rows:
        assert all(k in row for k in FIELDS), [k for k in FIELDS if k not in row]
        assert row["device"] == "cpu" and row["dtype"] == "fp32" and row["size"] == 64
        assert row["images"] > 0 and row["images_per_s"] > 0
    by_case = {r["case"]: r for r in rows}
    assert by_case["qwen3"]["images"] == by_case["llm_adapter"]["images"] == 5  # one caption per image
    assert by_case["qwen3"]["tokens"] == "synthetic ids"  # --tiny: the tiny Qwen3's vocabulary
    assert (by_case["pipeline"]["workers"], by_case["pipeline_serial"]["workers"]) == (2, 0)
    assert by_case["pipeline"]["images"] == by_case["pipeline_serial"]["images"] == 5
    assert built == [0, 2, 0, 0]  # per pipeline case: the in-process warm-up, then the measured build
    steps = result["step_rates"]
    assert [s["ms_per_step"] for s in steps] == [115.9, 184.4, 400.9] and all("H200" in s["source"] for s in steps)
    assert steps[0]["images_per_s"] == pytest.approx(1000 / 115.9, abs=0.01)
    ratio = by_case["pipeline"]["images_per_s"] / steps[0]["images_per_s"]
    assert steps[0]["pipeline_over_step"] == pytest.approx(ratio, rel=1e-2)
