"""Save names and retention (train/save_plan.py): step/epoch file names, keep_last_n_steps, refusal to overwrite."""

from __future__ import annotations

import pytest

from anima_trainer.train.save_plan import SavePlan


def test_save_plan_names_retention_and_refusal(tmp_path):
    plan = SavePlan(tmp_path, "mylora", every_n_steps=10, keep_last_n_steps=20)
    assert plan.step_path(10).name == "mylora-step00000010.safetensors"
    assert plan.epoch_path(3).name == "mylora-000003.safetensors"
    stranger = tmp_path / "mylora-step00000001.safetensors"
    stranger.write_bytes(b"user file")
    for step in (10, 20, 30, 40):
        plan.step_path(step).write_bytes(b"x")
        removed = plan.record_step(step, plan.step_path(step))
    assert [p.name for p in removed] == ["mylora-step00000020.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mylora-step00000001.safetensors",
                                                         "mylora-step00000030.safetensors",
                                                         "mylora-step00000040.safetensors"]
    plan.final_path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"):
        plan.check_start()
    SavePlan(tmp_path, "mylora", overwrite=True).check_start()
