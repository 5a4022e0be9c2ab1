"""bucket_free_fit (beautifulrem/sd-scripts fork key, issue 14): the trained file says so in that fork's
`ss_bucket_free_fit` metadata key ("True" / "False", kohya's str(bool))."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.train.loop import run_training


@pytest.mark.parametrize(("extra", "expected"), [("bucket_free_fit = true", "True"), ("", "False")])
def test_ss_bucket_free_fit_is_written(setup, tmp_path, extra, expected):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 1, seed=5)
    write_demo_dataset_toml(tmp_path / "dataset.toml", setup["images"], extra=extra)
    run = run_training(parse_train_args(["--config_file", str(toml), "--max_train_steps", "1"]))
    with safe_open(str(run.final_path), "pt") as f:
        assert f.metadata()["ss_bucket_free_fit"] == expected
