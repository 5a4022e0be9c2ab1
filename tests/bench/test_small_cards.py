"""bench/small_cards.py on the CPU: the plans alone (no cap, nothing run), the plan's settings applied to the
step, and one real run of the parent with its per-budget subprocesses at tiny size (plumbing, not numbers)."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture
def small_cards(monkeypatch):
    yield from bench_script("small_cards", monkeypatch)


def test_plan_only_plans_every_budget_for_the_2b_model_and_runs_nothing(small_cards, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(small_cards, "run_case", lambda *a: pytest.fail("--plan-only must not run a case"))
    out = tmp_path / "plans.json"
    result = small_cards.main(["--plan-only", "--device", "cpu", "--json-out", str(out)])
    rows = result["results"]
    assert [r["budget_gib"] for r in rows] == [8.0, 12.0, 16.0, 24.0]
    assert json.loads(out.read_text(encoding="utf-8"))["results"] == rows
    assert all(r["estimated_peak_gib"] <= r["budget_gib"] for r in rows)
    assert rows[0]["plan"]["gradient_checkpointing"] and rows[-1]["plan"]["gradient_checkpointing"] is False
    times = [r["expected_ms_h200"] for r in rows]
    assert times == sorted(times, reverse=True)  # a bigger card never plans a slower step
    assert result["meta"]["resolution"] == 1024 and result["meta"]["config"] == "2b"
    printed = capsys.readouterr().out
    assert printed.count("vram_budget_gb ") == 4 and "an estimate for an H200" in printed


def test_a_budget_worker_applies_the_plan_to_the_step(small_cards, monkeypatch):
    seen = {}

    def measure(args, device, dtype_name, resolution, batch, grad_ckpt, catch_oom, levers):
        seen.update(grad_ckpt=grad_ckpt, levers=levers, resolution=resolution, batch=batch, catch_oom=catch_oom)
        return {"ms_per_step_median": 1.0}

    monkeypatch.setattr(small_cards.train_step, "measure", measure)
    args = small_cards.parse_args(["--device", "cpu", "--dtype", "bf16", "--resolution", "832x1216"])
    row = small_cards.worker(args, 8.0)
    applied = {k: seen["levers"][k] for k in ("checkpoint_blocks", "cpu_offload_checkpointing", "blocks_to_swap")}
    assert row["plan"] == {**applied, "gradient_checkpointing": seen["grad_ckpt"]}
    assert seen["grad_ckpt"] is True and seen["resolution"] == (832, 1216) and seen["catch_oom"]
    assert seen["levers"]["cache_latents"] and seen["levers"]["network_train_unet_only"]
    assert row["cap_fraction"] is None  # no cap on the CPU
    unconstrained = small_cards.worker(args, None)
    assert unconstrained["budget_gib"] is None and seen["grad_ckpt"] is False
    assert small_cards.worker(args, 0.5)["error"].startswith("vram_budget_gb 0.5: no memory setting fits")


def test_the_cpu_smoke_run_measures_each_budget_in_its_own_process(small_cards, tmp_path, capsys):
    out = tmp_path / "small.json"
    result = small_cards.main(["--config", "tiny", "--resolution", "64", "--budgets", "8", "--steps", "1",
                               "--warmup", "0", "--device", "cpu", "--threads", "1", "--json-out", str(out)])
    base, (row,) = result["baseline"], result["results"]
    assert base["budget_gib"] is None and base["measured"]["loss_finite"], base
    assert row["plan_candidate"] == "no checkpointing" and row["measured"]["loss_finite"], row
    assert row["ratio_to_unconstrained"] > 0 and row["target_8gib_2x"] is None  # no memory numbers on the CPU
    assert json.loads(out.read_text(encoding="utf-8"))["results"][0]["budget_gib"] == 8.0
    assert "| 8 | no checkpointing |" in capsys.readouterr().out
