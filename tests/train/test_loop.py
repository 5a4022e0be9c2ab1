"""End-to-end training on the tiny model: overfitting, exact reload, intermediate saves, metadata, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anima_trainer.cli import main
from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_shapes_dataset
from anima_trainer.models import load_dit, load_text_encoder
from anima_trainer.networks import create_network
from anima_trainer.train.loop import run_training
from tests.train.conftest import check_saved_file_reproduces, fixed_sigma_loss


def _config(setup: dict, out: Path, *extra: str, steps: int = 150):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    return parse_train_args(["--config_file", str(toml), *extra])


def test_lora_overfits_and_reloads_exactly(setup):
    cfg = _config(setup, setup["root"] / "run", "--learning_rate", "5e-3", steps=200)
    base = load_dit(setup["models"]["dit"], dtype=torch.float32)
    before = fixed_sigma_loss(base, setup["models"], setup["root"] / "run" / "dataset.toml")
    run = run_training(cfg)
    after = fixed_sigma_loss(run.dit, setup["models"], setup["root"] / "run" / "dataset.toml")
    assert after < before / 1.5, (before, after)  # stated factor ≥ 1.5 (observed 1.60 → 0.90, 1.78×)
    assert run.steps == 200 and len(run.losses) == 200
    # the file reloaded onto a fresh base reproduces the trained model exactly, and ComfyUI's merge agrees
    _, report = check_saved_file_reproduces(run, setup["models"]["dit"], "lora", dim=8, alpha=8.0)
    assert len(report["patched"]) == 20 and not report["not_loaded"]


def test_file_keys_metadata_and_intermediate_saves(setup, tmp_path):
    cfg = _config(setup, tmp_path, "--save_every_n_steps", "4", "--save_last_n_steps", "4",
                  "--save_precision", "bf16", "--output_name", "shapes", "--gradient_checkpointing", steps=12)
    run = run_training(cfg)
    out = tmp_path / "output"
    assert sorted(p.name for p in out.iterdir()) == ["logs", "shapes-step00000008.safetensors", "shapes.events.jsonl",
                                                     "shapes.safetensors"]  # TensorBoard by default
    assert list((out / "logs").glob("shapes_*/network_train/events.out.tfevents.*"))
    events = [json.loads(line)["type"] for line in (out / "shapes.events.jsonl").read_text().splitlines()]
    assert events[:2] == ["config", "start"] and events.count("save") == 3 and events[-1] == "end"  # steps 4, 8, final
    with safe_open(run.final_path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q_proj.lora_up.weight").dtype == torch.bfloat16
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q_proj.alpha").dtype == torch.float32
    targets = [f"blocks.{b}.{m}" for b in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj", "cross_attn.q_proj",
        "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.output_proj", "mlp.layer1", "mlp.layer2")]
    assert keys == {f"diffusion_model.{t}.{s}" for t in targets for s in ("lora_down.weight", "lora_up.weight",
                                                                             "alpha")}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_steps"] == "12" and meta["ss_base_model_version"] == "anima"
    assert meta["ss_output_name"] == "shapes" and meta["ss_num_train_images"] == "4"
    assert json.loads(meta["ss_bucket_info"])["buckets"] and "anima_trainer_version" in meta


def test_train_command_refuses_to_overwrite(setup, tmp_path, capsys):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=1)
    text = toml.read_text().replace("overwrite = true\n", "")
    toml.write_text(text)
    assert main(["train", "--config_file", str(toml)]) == 0
    final = tmp_path / "output" / "demo_lora.safetensors"
    stamp = final.stat().st_mtime_ns
    assert main(["train", "--config_file", str(toml)]) == 2
    assert "already exists" in capsys.readouterr().err and final.stat().st_mtime_ns == stamp
    assert main(["train", "--config_file", str(toml), "--learning_rat", "1"]) == 2
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_lora_fp32(setup, tmp_path, precision):
    cfg = _config(setup, tmp_path, "--mixed_precision", precision, steps=3)
    run = run_training(cfg)
    assert run.dit.x_embedder.proj[1].weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert {p.dtype for p in run.network.trainable_parameters()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(run.losses)))
    ups = [m for m in run.network.trainable_parameters() if m.abs().sum() > 0]
    assert len(ups) == len(run.network.trainable_parameters())  # zero-initialised ups have moved


def test_tensorboard_logging_and_continuing_from_network_weights(setup, tmp_path, capsys):
    first = run_training(_config(setup, tmp_path / "a", "--log_with", "tensorboard", "--logging_dir",
                                 str(tmp_path / "logs"), steps=3))
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    resumed = _config(setup, tmp_path / "b", "--network_weights", str(first.final_path), steps=1)
    fresh = load_dit(setup["models"]["dit"], dtype=torch.float32)
    net = create_network(fresh, algo="lora", dim=8, alpha=8.0)
    net.load_weights(first.final_path)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    run = run_training(resumed)
    moved = [k for k, v in run.network.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and all(torch.allclose(v, start[k], atol=0.05) for k, v in run.network.state_dict().items())
    toml = write_demo_configs(tmp_path / "c", setup["models"], setup["images"], 1, seed=1)
    code = main(["train", "--config_file", str(toml), "--network_weights", str(first.final_path),
                 "--network_dim", "4"])
    assert code == 2 and "file has dim (rank) 8, network has dim 4" in capsys.readouterr().err


def test_caption_processing_reaches_training_also_with_a_text_cache(setup, tmp_path):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=1)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(dataset.read_text().replace("batch_size = 4\n", "batch_size = 4\nshuffle_caption = true\n"
                                                   "caption_prefix = \"shapes\"\n"))
    seen: list[list[str]] = []
    from anima_trainer.train import loop

    original = loop.TextConditioner.context

    def spy(self, captions):
        seen.append(list(captions))
        return original(self, captions)

    loop.TextConditioner.context = spy
    try:
        run_training(parse_train_args(["--config_file", str(toml), "--cache_latents"]))
    finally:
        loop.TextConditioner.context = original
    assert len(seen) == 2 and all(any("shapes" in c for c in batch) for batch in seen)
    raw = {p.read_text() for p in setup["images"].glob("*.txt")}
    assert any(c not in raw for batch in seen for c in batch)  # processed, not the raw caption files
    # with a text cache the captions come from the pre-encoded variants (never the raw caption files)
    seen.clear()
    loop.TextConditioner.context = spy
    try:
        run_training(parse_train_args(["--config_file", str(toml), "--cache_text_encoder_outputs",
                                       "--caption_variants", "3", "--output_name", "x"]))
    finally:
        loop.TextConditioner.context = original
    assert len(seen) == 2 and all(c not in raw and "shapes" in c for batch in seen for c in batch)
    warm = tmp_path / "dataset.toml"
    warm.write_text(warm.read_text().replace("shuffle_caption = true\n", "token_warmup_step = 5\n"))
    with pytest.raises(ValueError, match="token_warmup_step changes captions every step"):
        run_training(parse_train_args(["--config_file", str(toml), "--cache_text_encoder_outputs",
                                       "--output_name", "y"]))


def test_long_captions_are_reported_not_truncated(setup, tmp_path, caplog):
    import logging

    from anima_trainer.data import build_dataset, load_dataset_config
    from anima_trainer.train.loop import report_long_captions

    images = write_shapes_dataset(tmp_path / "imgs", count=2, seed=1)
    long_text = "a red circle on a white background, " * 60
    (images / "shape_01.txt").write_text(long_text)
    write_demo_configs(tmp_path, setup["models"], images, 1, seed=1)
    ds = build_dataset(load_dataset_config(tmp_path / "dataset.toml"))
    te = load_text_encoder(setup["models"]["qwen3"], qwen3_tokenizer_path=setup["models"]["tokenizers"])
    caplog.set_level(logging.WARNING, logger="anima_trainer.train.loop")
    found = report_long_captions(ds, te)
    assert [p.name for p, _, _ in found] == ["shape_01.png"] and found[0][1] > 512
    assert "1 captions are longer than 512 tokens" in caplog.text and "shape_01.png" in caplog.text
    enc = te.encode([ds.caption_for(1, 0)])
    assert enc.qwen_hidden.shape[1] == found[0][1]  # encoded whole


def test_cached_llm_adapter_outputs_give_the_same_training(setup, tmp_path):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 3, seed=2)
    plain = run_training(parse_train_args(["--config_file", str(toml)]))
    cached = run_training(parse_train_args(["--config_file", str(toml), "--cache_llm_adapter_outputs",
                                            "--output_name", "cached"]))
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="the LLM adapter is trained"):
        run_training(parse_train_args(["--config_file", str(toml), "--cache_llm_adapter_outputs",
                                       "--network_args", "train_llm_adapter=true", "--output_name", "z"]))


def test_worker_processes_give_the_same_batches(setup, tmp_path):
    from anima_trainer.data import build_dataset, load_dataset_config
    from anima_trainer.data.loader import run_batches

    write_demo_configs(tmp_path, setup["models"], setup["images"], 1, seed=1)
    text = (tmp_path / "dataset.toml").read_text().replace("batch_size = 4\n", "batch_size = 2\nflip_aug = true\n"
                                                          "shuffle_caption = true\n")
    (tmp_path / "dataset.toml").write_text(text)
    ds = build_dataset(load_dataset_config(tmp_path / "dataset.toml"), seed=3)
    in_process = list(run_batches(ds, 2, workers=0))
    with_workers = list(run_batches(ds, 2, workers=2))
    expected = [b for e in range(2) for b in ds.epoch(e)]
    assert len(in_process) == len(with_workers) == len(expected) == 4
    for a, b, c in zip(in_process, with_workers, expected):
        assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
        assert a.captions == b.captions == c.captions and a.flipped == b.flipped == c.flipped


def test_realistic_kohya_dataset_tomls_train_unchanged(setup, tmp_path):
    """A DreamBooth-style dataset.toml with the usual GUI keys (regularisation subset included), and a
    fine-tuning style one with a metadata JSON, each trains as written."""
    reg = write_shapes_dataset(tmp_path / "reg", count=2, seed=8)
    for f in reg.glob("*.txt"):
        f.unlink()
    (tmp_path / "meta.json").write_text(json.dumps({
        str(p.with_suffix("")): {"caption": p.with_suffix(".txt").read_text(), "tags": "simple, flat colours"}
        for p in sorted(setup["images"].glob("*.png"))}))
    dreambooth = f"""[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = true
enable_bucket = true
bucket_no_upscale = false
bucket_reso_steps = 16
min_bucket_reso = 32
max_bucket_reso = 128

[[datasets]]
resolution = [64, 64]
batch_size = 2

  [[datasets.subsets]]
  image_dir = {json.dumps(str(setup["images"]))}
  num_repeats = 2
  caption_dropout_rate = 0.1
  caption_tag_dropout_rate = 0.1

  [[datasets.subsets]]
  image_dir = {json.dumps(str(reg))}
  class_tokens = "shape"
  is_reg = true
  num_repeats = 1
"""
    finetune = f"""[general]
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16

  [[datasets.subsets]]
  image_dir = {json.dumps(str(setup["images"]))}
  metadata_file = {json.dumps(str(tmp_path / "meta.json"))}
"""
    for name, text in (("dreambooth", dreambooth), ("finetune", finetune)):
        toml = write_demo_configs(tmp_path / name, setup["models"], setup["images"], 3, seed=1)
        (tmp_path / name / "dataset.toml").write_text(text)
        run = run_training(parse_train_args(["--config_file", str(toml), "--prior_loss_weight", "0.5",
                                             "--cache_latents", "--cache_text_encoder_outputs"]))
        assert run.steps == 3 and all(torch.isfinite(torch.tensor(run.losses))), name


def test_train_llm_adapter_trains_the_adapter(setup, tmp_path):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 3, seed=2)
    run = run_training(parse_train_args(["--config_file", str(toml), "--network_args", "train_llm_adapter=true"]))
    llm_adapter = [m for name, m in run.network.modules_by_name.items() if name.startswith("llm_adapter.")]
    assert llm_adapter and all(m.lora_up.weight.abs().sum() > 0 for m in llm_adapter)  # zero-initialised ups moved


def test_training_with_per_module_dims_and_loraplus(setup, tmp_path):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=2)
    run = run_training(parse_train_args(["--config_file", str(toml), "--network_args", "loraplus_lr_ratio=4",
                                         "network_reg_dims=.*mlp.*=2", "rank_dropout=0.1", "module_dropout=0.1"]))
    with safe_open(run.final_path, "pt") as f:
        assert f.get_tensor("diffusion_model.blocks.0.mlp.layer1.lora_down.weight").shape[0] == 2
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight").shape[0] == 8
    groups = run.network.param_groups(1.0)
    assert sorted(g["lr"] for g in groups) == [1.0, 4.0]


def test_dim_from_weights_continues_the_files_network_and_kohya_names(setup, tmp_path, capsys):
    """A run with per-module dims, DoRA and adaLN targets is continued from its file alone (the config's dim,
    alpha and network_args differ); `save_format = kohya` then writes lora_unet_* names that pass the check."""
    first = run_training(_config(setup, tmp_path / "a", "--network_dim", "4", "--network_alpha", "2",
                                 "--network_args", "network_reg_dims=.*mlp.*=2", "dora_wd=true",
                                 "train_adaln=true", steps=2))
    cfg = _config(setup, tmp_path / "b", "--network_weights", str(first.final_path), "--dim_from_weights",
                  "--save_format", "kohya", "--network_dim", "16", steps=1)
    run = run_training(cfg)
    assert {p: (m.dim, float(m.alpha), m.dora_wd) for p, m in run.network.modules_by_name.items()} == {
        p: (m.dim, float(m.alpha), m.dora_wd) for p, m in first.network.modules_by_name.items()}
    with safe_open(run.final_path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert f.get_tensor("lora_unet_blocks_0_mlp_layer1.lora_down.weight").shape[0] == 2
    assert all(k.startswith("lora_unet_") for k in keys) and meta["ss_network_dim"] == "Dynamic"
    assert any(k.startswith("lora_unet_blocks_0_adaln_modulation_mlp_1.") for k in keys)
    # the kohya-named file reloads into the same network, and ComfyUI's merge agrees
    check_saved_file_reproduces(run, setup["models"]["dit"], "lora", dim=4, alpha=2.0,
                                network_reg_dims=".*mlp.*=2", dora_wd="true", train_adaln="true")
    # a file of another algorithm than network_module is a start-up error
    toml = write_demo_configs(tmp_path / "c", setup["models"], setup["images"], 1, seed=1)
    code = main(["train", "--config_file", str(toml), "--network_weights", str(first.final_path),
                 "--dim_from_weights", "--network_module", "networks.lokr"])
    assert code == 2 and "is a lora network but network_module is lokr" in capsys.readouterr().err
