"""CPU smoke test of bench/train_step.py: the tiny DiT, a few steps of the real training step, a full JSON row.

No timing is asserted (only that the numbers exist and are positive); the GPU table is run by hand
(bench/README.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.bench.conftest import bench_script
FIELDS = ("date", "commit", "device", "torch", "config", "resolution", "batch", "tokens", "grad_ckpt", "rank",
          "dtype", "steps", "warmup", "first_step_ms", "ms_per_step_median", "ms_per_step_mean", "samples_per_s",
          "loss_first", "loss_last", "loss_finite", "peak_memory_gib", "peak_reserved_gib", "tflop_per_step",
          "achieved_tflops", "peak_tflops", "mfu", "oom", "lora_modules", "lora_params")


@pytest.fixture
def train_step(monkeypatch):
    yield from bench_script("train_step", monkeypatch)


SMOKE = ["--config", "tiny", "--resolution", "128", "--batch", "1", "--steps", "2", "--warmup", "1",
         "--device", "cpu"]


def test_one_case_on_cpu_writes_a_complete_row(train_step, tmp_path, capsys):
    out = tmp_path / "res" / "train_step.json"
    rows = train_step.main([*SMOKE, "--grad_ckpt", "--json-out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert printed == rows == saved["results"] and len(rows) == 1
    row = rows[0]
    assert all(k in row for k in FIELDS), [k for k in FIELDS if k not in row]
    assert row["device"] == "cpu" and row["dtype"] == "fp32" and row["oom"] is False
    assert row["config"] == "tiny" and row["resolution"] == 128 and row["tokens"] == 64 and row["grad_ckpt"]
    assert row["rank"] == 32 and row["lora_modules"] > 0 and row["lora_params"] > 0
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"]) and row["loss_finite"]
    assert row["first_step_ms"] > 0 and row["ms_per_step_median"] > 0 and row["ms_per_step_mean"] > 0
    assert row["tflop_per_step"] > 0
    assert row["peak_memory_gib"] is None and row["mfu"] is None  # no memory or MFU numbers on the CPU
    assert saved["meta"]["torch"] == torch.__version__


def test_table_records_oom_and_goes_on(train_step, monkeypatch, capsys):
    """--table runs every case in one process; an out-of-memory case becomes {"oom": true} and the rest run."""
    monkeypatch.setattr(train_step, "TABLE", [(128, 1, False), (128, 2, True)])
    monkeypatch.setattr(train_step, "PEERS", [])
    real = train_step.run_config

    def run_config(args, device, dtype_name, resolution, batch, grad_ckpt, levers=None):
        if batch == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(args, device, dtype_name, resolution, batch, grad_ckpt, levers)

    monkeypatch.setattr(train_step, "run_config", run_config)
    rows = train_step.main([*SMOKE[:2], "--steps", "1", "--warmup", "0", "--device", "cpu", "--table"])
    assert [r["oom"] for r in rows] == [False, True]
    assert rows[1]["batch"] == 2 and "out of memory" in rows[1]["error"]
    table = capsys.readouterr().out.split("| date | commit | device | torch | config | ms/step | peak GiB | MFU |")[1]
    assert "tiny 128px b1 ckpt off r32 fp32" in table and "| OOM | OOM |" in table


def test_a_failing_lever_is_a_result_not_the_end(train_step, monkeypatch):
    monkeypatch.setattr(train_step, "TABLE", [(128, 1, False)])
    monkeypatch.setattr(train_step, "PEERS", [])
    monkeypatch.setattr(train_step, "LEVERS", [(128, 1, False, {"blocks_to_swap": 99})])  # more than 10 blocks
    rows = train_step.main([*SMOKE[:2], "--steps", "1", "--warmup", "0", "--device", "cpu", "--table", "--levers"])
    assert rows[0]["oom"] is False and "failed" not in rows[0]
    assert rows[1]["failed"] and "blocks_to_swap" in rows[1]["error"]


def test_preservation_flag_runs_the_step_with_the_preservation_term(train_step):
    """--preservation_loss_weight: the same step with the preservation term (its cost per step); the term
    changes the update from the second step on, so the losses part from a plain run's."""
    plain = train_step.main([*SMOKE, "--steps", "3"])[0]
    dop = train_step.main([*SMOKE, "--steps", "3", "--preservation_loss_weight", "1.0"])[0]
    assert plain["levers"] == {} and dop["levers"]["preservation_loss_weight"] == 1.0
    assert dop["loss_finite"] and dop["loss_first"] == plain["loss_first"]  # step 1: the fresh LoRA = the base
    assert dop["loss_last"] != plain["loss_last"]
    with pytest.raises(SystemExit):
        train_step.main([*SMOKE, "--preservation_loss_weight", "-1"])


# ------------------------------------------------------------------------------------- issue 18: peers --
def test_peers_shapes_run_in_the_table_once_each_with_lokr_and_non_square_images(train_step, monkeypatch, capsys):
    """--table = TABLE then PEERS (a shape already in the table runs once): LoKr factor 8 full-matrix and
    decomposed, LoRA on a square and a portrait image; at tiny size (rank 4: below the tiny width's
    decomposition threshold of 16, so "decomposed" really is)."""
    lokr = train_step.LOKR_F8
    assert train_step.PEERS[0][3] == {"network_module": "lokr", "network_args": {"factor": "8", "full_matrix": "true"}}
    assert train_step.PEERS[1][3] == lokr and train_step.PEERS[3][0] == (832, 1216)
    monkeypatch.setattr(train_step, "TABLE", [(128, 1, False)])
    monkeypatch.setattr(train_step, "PEERS", [
        (128, 2, True, {**lokr, "network_args": {"factor": "8", "full_matrix": "true"}}), (128, 2, True, lokr),
        (128, 1, False, {}), ((96, 160), 1, False, {})])
    rows = train_step.main([*SMOKE[:2], "--rank", "4", "--steps", "1", "--warmup", "0", "--device", "cpu",
                            "--table"])
    assert [(r["resolution"], r["batch"], r["network_module"]) for r in rows] == [
        (128, 1, "lora"), (128, 2, "lokr"), (128, 2, "lokr"), ("96x160", 1, "lora")]
    full, decomposed, portrait = rows[1], rows[2], rows[3]
    assert all(r["oom"] is False and "failed" not in r and r["loss_finite"] for r in rows)
    assert full["network_args"] == {"factor": "8", "full_matrix": "true"}
    assert decomposed["network_args"] == {"factor": "8"}
    assert decomposed["lora_params"] < full["lora_params"]  # w2 = rank-4 product instead of a full 32×32
    assert (portrait["image_width"], portrait["image_height"], portrait["tokens"]) == (96, 160, 6 * 10)
    from anima_trainer.train.step_time import lora_step_flops
    assert portrait["tflop_per_step"] == round(lora_step_flops(train_step.CONFIGS["tiny"], 60, 1) / 1e12, 4)
    table = capsys.readouterr().out
    assert "| tiny 128px b2 ckpt on lokr r4 factor=8,full_matrix=true fp32 [eager, attn " in table
    assert "| tiny 96x160px b1 ckpt off r4 fp32 [eager, attn " in table
    only_table = train_step.main([*SMOKE[:2], "--rank", "4", "--steps", "1", "--warmup", "0", "--device", "cpu",
                                  "--cases", "table"])
    assert [(r["resolution"], r["batch"]) for r in only_table] == [(128, 1)]
    with pytest.raises(SystemExit):
        train_step.main([*SMOKE, "--cases", "table,nonsense"])


def test_levers_on_are_read_from_the_prepared_dit_and_set_changes_any_field(train_step):
    """Each row says which levers ran (compiled or not, attention kernel, fused q/k/v layers), read from the DiT
    after the loop's setup; --set changes a TrainConfig field or one network argument in every case."""
    plain = train_step.main(SMOKE)[0]
    assert plain["levers_on"]["compiled"] is False  # CPU: eager by default
    assert plain["levers_on"]["fused_qkv"] == plain["levers_on"]["self_attention_layers"] == 10
    assert plain["levers_on"]["attention_kernel"] == plain["attention_kernel"]
    assert plain["speed_settings"]["fuse_qkv"] is True and "max_data_loader_n_workers" not in plain["speed_settings"]
    row = train_step.main([*SMOKE, "--set", "fuse_qkv=false", "--set", "compile_blocks=true",
                           "--set", "compile_backend=eager", "--set", "network_module=lokr",
                           "--set", "network_args.factor=4", "--set", "network_args.full_matrix=true"])[0]
    assert row["levers"] == {"fuse_qkv": False, "compile_blocks": True, "compile_backend": "eager",
                             "network_module": "lokr", "network_args": {"factor": "4", "full_matrix": "true"}}
    assert row["levers_on"]["compiled"] is True and row["levers_on"]["fused_qkv"] == 0
    assert row["speed_settings"]["compile_backend"] == "eager" and row["network_module"] == "lokr"
    assert row["loss_finite"] and row["lora_params"] != plain["lora_params"]
    for bad in ("nonsense=1", "fuse_qkv", "optimizer_args.x=1"):
        with pytest.raises(SystemExit):
            train_step.main([*SMOKE, "--set", bad])
    assert train_step.parse_setting("attention_backend=auto") == ("attention_backend", "auto")
    assert train_step.parse_resolution("832x1216") == (832, 1216) and train_step.parse_resolution("64") == (64, 64)
