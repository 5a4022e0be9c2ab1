"""masked_loss with conditioning_data_dir through the training loop: an all-black mask (red 0) zeroes every
step's loss, an all-white one (red 255) gives exactly the unmasked losses (kohya: loss × mask, plain mean)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_configs
from anima_trainer.train.loop import run_training


def _masked_run(setup: dict, out: Path, red: int | None, masked_loss: bool = True, steps: int = 2):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=4)
    if red is not None:
        masks = out / "masks"
        masks.mkdir()
        for image in sorted(Path(setup["images"]).glob("*.png")):
            with Image.open(image) as im:
                Image.new("RGB", im.size, (red, 255 - red, 0)).save(masks / image.name)
        ds = out / "dataset.toml"
        ds.write_text(ds.read_text() + f"  conditioning_data_dir = '{masks}'\n")
    cfg = parse_train_args(["--config_file", str(toml)]).model_copy(update={"masked_loss": masked_loss})
    return run_training(cfg)


def test_mask_folder_masks_the_training_loss(setup, tmp_path):
    plain = _masked_run(setup, tmp_path / "plain", None)
    white = _masked_run(setup, tmp_path / "white", 255)
    black = _masked_run(setup, tmp_path / "black", 0)
    assert len(plain.losses) == 2 and all(loss > 0 for loss in plain.losses)
    torch.testing.assert_close(torch.tensor(white.losses), torch.tensor(plain.losses), rtol=1e-6, atol=0)
    assert black.losses == [0.0, 0.0]
    with pytest.raises(ConfigError, match="^masked_loss: the dataset_config has conditioning_data_dir"):
        _masked_run(setup, tmp_path / "off", 255, masked_loss=False)
