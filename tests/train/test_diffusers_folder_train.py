"""Issue 15 item 4: a run whose three model flags all name one diffusers-layout Anima folder (no tokenizer
paths: they are found in its tokenizer/ and t5_tokenizer/) trains and saves a network that applies to the
single-file base exactly as to the trained model."""

from __future__ import annotations

import re

from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs
from anima_trainer.train.loop import run_training
from tests.support.diffusers_folder import write_diffusers_anima
from tests.train.conftest import check_saved_file_reproduces


def test_a_run_on_a_diffusers_folder_trains_and_saves(setup, tmp_path):
    folder = write_diffusers_anima(tmp_path / "Anima-Diffusers", setup["models"])
    toml = write_demo_configs(tmp_path / "run", setup["models"], setup["images"], 2, seed=5)
    text = toml.read_text()
    model = re.search(r"\[model\]\n(.*?)\n\n", text, re.S)
    assert model is not None
    path = str(folder).replace("\\", "/")
    toml.write_text(text.replace(model.group(1), f'pretrained_model_name_or_path = "{path}"\nqwen3 = "{path}"\n'
                                                 f'vae = "{path}"\nauto_download_t5_tokenizer = false'))
    cfg = parse_train_args(["--config_file", str(toml)])
    assert cfg.qwen3_tokenizer_path is None and cfg.t5_tokenizer_path is None
    run = run_training(cfg)
    assert run.steps == 2 and run.final_path.is_file()
    # the network trained on the folder's DiT is the single file's DiT's network, bit for bit
    check_saved_file_reproduces(run, setup["models"]["dit"], "lora", dim=8, alpha=8.0)
