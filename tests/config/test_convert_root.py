"""convert-config: root-style Anima_Trainer TOML → kohya train.toml + dataset.toml, faithful to the root trainer
(seed_system.md §6, and the sd-scripts-anima converter bugs of §8.2 #23–25)."""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

import pytest
import torch

from anima_trainer.cli import main
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.compat.convert_files import convert_root_file
from anima_trainer.compat.convert_root import STATUSES, ConversionError, convert_root_config, target_regex
from anima_trainer.config.root_schema import ROOT_SCHEMA, is_root_style
from anima_trainer.data import build_dataset, load_dataset_config
from anima_trainer.demo import write_demo_models, write_shapes_dataset
from anima_trainer.fileio import OutputExistsError


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return write_demo_models(tmp_path_factory.mktemp("root_models"), seed=2)


def q(p: object) -> str:
    return json.dumps(str(p))


def model_table(models: dict[str, Path], t5: bool = True) -> str:
    return (f"[model]\ntransformer_path = {q(models['dit'])}\nvae_path = {q(models['vae'])}\n"
            f"text_encoder_path = {q(models['qwen3'])}\n"
            f"t5_tokenizer_path = {q(models['tokenizers'] / 't5') if t5 else q('')}\n")


def kohya_tree(root: Path) -> Path:
    """A root data_dir: `10_alice/` (4 images), `3_bob/extra/` (nested, 2), `misc/` (no repeat prefix, 1) and one
    loose image at the top."""
    write_shapes_dataset(root / "10_alice", count=4, seed=1)
    write_shapes_dataset(root / "3_bob" / "extra", count=2, seed=2)
    write_shapes_dataset(root / "misc", count=1, seed=3)
    write_shapes_dataset(root / "loose_tmp", count=1, seed=4)
    for f in (root / "loose_tmp").iterdir():
        f.rename(root / f"top_{f.name}")
    (root / "loose_tmp").rmdir()
    return root


FULL = """
[dataset]
data_dir = {data}
resolution = 64
min_reso = 32
max_reso = 128
reso_step = 16
max_ar = 3.0
repeats = 7
shuffle_caption = true
shuffle_caption_per_epoch = false
keep_tokens = 1
flip_augment = true
cache_latents = true
cache_dir = ""

[lora]
lora_name = "alice_lokr"
network_type = "lokr"
lora_rank = 8
lora_alpha = 4
lora_dropout = 0.0
lora_targets = ""
lokr_factor = 4
lokr_use_tucker = false
lokr_decompose_both = false
lokr_full_matrix = true
lokr_rank_dropout = 0.1
lokr_module_dropout = 0.0
lokr_constraint = 0.0
lokr_normalize = false

[training]
epochs = 3
max_steps = 0
batch_size = 2
grad_accum = 2
learning_rate = 2e-4
mixed_precision = "fp32"
grad_checkpoint = true
num_workers = 0
xformers = true
seed = 7
auto_install = true
seq_len = 384
log_every = 5
text_cache_size = 0
resume = ""
train_parts = "dit_only"
typo_key = 1

[optimizer]
type = "prodigy"
weight_decay = 0.02
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
prodigy_beta3 = 0.999
prodigy_d0 = 1e-6
prodigy_d_coef = 2.0
prodigy_growth_rate = inf
prodigy_slice_p = 11
prodigy_decouple = true
prodigy_use_bias_correction = true
prodigy_safeguard_warmup = true

[output]
output_dir = {out}
output_name = "ignored_name"
save_every = 2
comfyui_format = true
save_state = true
save_state_every = 5

[progress]
loss_curve_steps = 100
no_progress = false
no_live_curve = true

[monitor]
enabled = true
every = 5
memory = true
wandb = true
alert_policy = "raise"

[wandb]
enabled = true
project = "anima"
name = "run1"
entity = "me"
tags = "a,b"
mode = "offline"
log_every = 1
"""


def test_full_config_maps_every_key_and_loads(models, tmp_path):
    data = kohya_tree(tmp_path / "data")
    src = tmp_path / "root.toml"
    src.write_text(model_table(models) + FULL.format(data=q(data), out=q(tmp_path / "lora_out")), encoding="utf-8")
    out = tmp_path / "converted"
    conv, paths = convert_root_file(src, out)
    assert set(paths) == {"train", "dataset", "tracker"}

    # every key of the file is in the report, with a status; unknown keys are reported as such
    raw = tomllib.loads(src.read_text(encoding="utf-8"))
    reported = {r.key.split(" ")[0]: r for r in conv.rows}
    for table, section in raw.items():
        for key in section:
            row = reported[f"{table}.{key}"]
            assert row.status in STATUSES
            assert (row.status == "unknown") == (key not in ROOT_SCHEMA[table])
    assert reported["training.typo_key"].status == "unknown"

    # the result loads through the normal reader, with the root meaning of each key
    cfg = parse_train_args(["--config_file", str(paths["train"])])
    assert cfg.pretrained_model_name_or_path == models["dit"] and cfg.qwen3 == models["qwen3"]
    assert cfg.t5_tokenizer_path == models["tokenizers"] / "t5"
    assert cfg.network_module == "lokr" and (cfg.network_dim, cfg.network_alpha) == (8, 4.0)
    assert cfg.network_args == {"train_llm_adapter": "false", "factor": "4", "full_matrix": "true",
                                "decompose_both": "false", "rank_dropout": "0.1"}
    assert cfg.save_every_n_epochs == 2 and cfg.save_every_n_steps is None  # epochs stay epochs
    assert cfg.max_train_epochs == 3 and cfg.output_name == "alice_lokr"  # lora_name wins (root precedence)
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate) == (2, 2, 2e-4)
    assert (cfg.mixed_precision, cfg.max_grad_norm, cfg.seed, cfg.gradient_checkpointing) == ("no", 0.0, 7, True)
    assert cfg.optimizer_type == "Prodigy"
    assert cfg.optimizer_args == {"weight_decay": 0.02, "eps": 1e-08, "betas": (0.9, 0.99), "beta3": 0.999,
                                  "d0": 1e-06, "d_coef": 2.0, "slice_p": 11, "decouple": True,
                                  "use_bias_correction": True, "safeguard_warmup": True}
    assert (cfg.timestep_sampling, cfg.discrete_flow_shift, cfg.sigmoid_scale) == ("shift", 3.0, 1.0)
    assert cfg.save_state and cfg.cache_latents and cfg.log_every_n_steps == 5
    assert (cfg.monitor_alert_policy, cfg.log_with, cfg.log_tracker_name, cfg.wandb_run_name) == (
        "raise", "wandb", "anima", "run1")
    assert tomllib.loads(paths["tracker"].read_text())["wandb"] == {"entity": "me", "tags": ["a", "b"],
                                                                     "mode": "offline"}

    # N_name folders → subsets with num_repeats = N; nested folders by their own name; the rest repeat once
    ds_raw = tomllib.loads(paths["dataset"].read_text())
    subsets = {Path(s["image_dir"]).relative_to(data).as_posix(): s["num_repeats"]
               for s in ds_raw["datasets"][0]["subsets"]}
    assert subsets == {".": 1, "10_alice": 10, "3_bob/extra": 1, "misc": 1}
    assert ds_raw["general"] == {"shuffle_caption": True, "keep_tokens": 1, "caption_extension": ".txt",
                                 "flip_aug": True}
    ds = build_dataset(load_dataset_config(cfg.dataset_config), default_batch_size=cfg.train_batch_size)
    assert ds.num_images == 8 and ds.num_train_items == 1 + 40 + 2 + 1

    # the table is printed into train.toml as its comment header
    text = paths["train"].read_text(encoding="utf-8")
    assert text.startswith("# converted from") and "# output.save_every" in text
    assert re.search(r"# dataset\.max_ar\s+3\.0\s+-\s+unsupported", text)


def test_missing_keys_take_the_root_trainers_defaults(models, tmp_path):
    write_shapes_dataset(tmp_path / "imgs", count=2)
    src = tmp_path / "root.toml"
    src.write_text(model_table(models) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\n[training]\n",
                   encoding="utf-8")
    conv, paths = convert_root_file(src, tmp_path / "out")
    cfg = parse_train_args(["--config_file", str(paths["train"])])
    # root defaults (seed_system.md §6.2), not kohya's (lr 2e-6, dim 4, alpha 1, fp32, clip 1.0, 1600 steps)
    assert (cfg.learning_rate, cfg.network_dim, cfg.network_alpha) == (5e-5, 32, 16.0)
    assert (cfg.mixed_precision, cfg.max_grad_norm, cfg.seed, cfg.max_train_epochs) == ("bf16", 0.0, 42, 1)
    assert (cfg.train_batch_size, cfg.max_data_loader_n_workers, cfg.output_name) == (1, 0, "anima_lora")
    assert cfg.network_module == "lora" and cfg.network_args == {"train_llm_adapter": "true"}
    assert cfg.optimizer_args == {"weight_decay": 0.01, "eps": 1e-08, "betas": (0.9, 0.999)}
    assert cfg.save_state and cfg.output_dir == Path("./output")
    ds = tomllib.loads(paths["dataset"].read_text())["datasets"][0]
    assert (ds["resolution"], ds["min_bucket_reso"], ds["max_bucket_reso"], ds["bucket_reso_steps"]) == (
        1024, 512, 2048, 64)
    assert ds["enable_bucket"] is True
    assert {r.key for r in conv.rows if r.status == "default"} >= {"training.learning_rate (absent)",
                                                                   "lora.lora_rank (absent)"}


def _steps_config(models, tmp_path: Path, epochs: int, max_steps: int) -> tuple[Path, object]:
    write_shapes_dataset(tmp_path / "imgs", count=4)  # 4 images, batch 1 → 4 optimizer steps per epoch
    src = tmp_path / f"root_{epochs}_{max_steps}.toml"
    src.write_text(model_table(models) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\nresolution = 64\n"
                   f"min_reso = 32\nmax_reso = 128\nreso_step = 16\n[training]\nepochs = {epochs}\n"
                   f"max_steps = {max_steps}\n", encoding="utf-8")
    _, paths = convert_root_file(src, tmp_path / f"out_{epochs}_{max_steps}")
    return paths["train"], parse_train_args(["--config_file", str(paths["train"])])


@pytest.mark.parametrize(("epochs", "max_steps", "expected"), [(2, 5, 5), (2, 10, 8), (3, 0, 12), (1, 4, 4)])
def test_epochs_and_max_steps_stop_at_whichever_comes_first(models, tmp_path, epochs, max_steps, expected):
    from anima_trainer.train.loop import total_steps

    _, cfg = _steps_config(models, tmp_path, epochs, max_steps)
    ds = build_dataset(load_dataset_config(cfg.dataset_config), default_batch_size=cfg.train_batch_size)
    assert len(ds) == 4
    steps, _ = total_steps(cfg, len(ds))
    assert steps == expected == min(epochs * 4, max_steps or 10**9)
    # only one of the two is written, so kohya's "epochs override steps" cannot change the length
    assert (cfg.max_train_epochs is None) == (max_steps > 0 and epochs * 4 > max_steps)


def _lr_curve(cfg, steps: int) -> list[float]:
    from anima_trainer.train import schedulers as sch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = sch.build_scheduler(opt, cfg.lr_scheduler, steps, **sch.schedule_options(cfg))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def _schedule_cfg(models, tmp_path: Path, training: str):
    write_shapes_dataset(tmp_path / "imgs", count=2)
    src = tmp_path / "root.toml"
    src.write_text(model_table(models) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\n[training]\n{training}",
                   encoding="utf-8")
    conv, paths = convert_root_file(src, tmp_path / "out")
    return conv, parse_train_args(["--config_file", str(paths["train"])])


def test_cosine_num_cycles_keeps_its_meaning(models, tmp_path):
    # sd-scripts-anima turned this into a quarter cosine ending at ~0.56 × lr (§8.2 #24); 0.5 = one descent
    _, cfg = _schedule_cfg(models, tmp_path, 'lr_scheduler = "cosine"\nlr_min_ratio = 0.1\n'
                                             'lr_scheduler_num_cycles = 0.5\nlr_warmup_ratio = 0.1\n')
    assert (cfg.lr_scheduler, cfg.lr_scheduler_min_lr_ratio, cfg.lr_scheduler_num_cycles) == (
        "cosine_with_min_lr", 0.1, 1.0)  # kohya's meaning: 1 = one descent (kohya halves it into 0.5 periods)
    assert cfg.lr_warmup_steps == 0.1
    lrs = _lr_curve(cfg, 100)
    # kohya's (transformers') curve: warm-up 0, 0.1, ... 0.9, full lr at step 10; the last step (99 of 100) is
    # 1/90 of the descent short of the end: 0.1 + 0.9 * ½(1 + cos(π·89/90))
    end = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(end) and end < 0.1003
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # one monotone descent


def test_restarts_count_descents(models, tmp_path):
    conv, cfg = _schedule_cfg(models, tmp_path, 'lr_scheduler = "cosine_with_restarts"\n'
                                                'lr_scheduler_num_cycles = 2\n')
    assert cfg.lr_scheduler_num_cycles == 2.0  # kohya's meaning too: 2 restart cycles
    lrs = _lr_curve(cfg, 100)
    rises = sum(b > a + 1e-9 for a, b in zip(lrs, lrs[1:], strict=False))
    # two descents (one restart at step 50); the last step is 1/100 before the end of the second
    assert rises == 1 and lrs[50] == 1.0 and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.98)))


def test_missing_t5_tokenizer_is_an_error_naming_the_key(models, tmp_path):
    write_shapes_dataset(tmp_path / "imgs", count=1)
    src = tmp_path / "root.toml"
    src.write_text(model_table(models, t5=False) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\n[training]\n",
                   encoding="utf-8")
    with pytest.raises(ConversionError, match=r"model\.t5_tokenizer_path: required"):
        convert_root_file(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_never_overwrites_without_overwrite(models, tmp_path, capsys):
    write_shapes_dataset(tmp_path / "imgs", count=1)
    src = tmp_path / "root.toml"
    src.write_text(model_table(models) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\n[training]\n",
                   encoding="utf-8")
    out = tmp_path / "out"
    assert main(["convert-config", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "root key" in printed and "wrote" in printed and "train with: anima-trainer train" in printed
    (out / "dataset.toml").write_text("# mine\n", encoding="utf-8")
    with pytest.raises(OutputExistsError):
        convert_root_file(src, out)
    assert (out / "dataset.toml").read_text() == "# mine\n"
    assert main(["convert-config", str(src), "--out", str(out)]) == 2
    assert main(["convert-config", str(src), "--out", str(out), "--overwrite"]) == 0
    assert "[[datasets.subsets]]" in (out / "dataset.toml").read_text()


def test_targets_follow_the_root_matching_rules(models, tmp_path):
    """lora_targets → include/exclude regexes that select exactly the modules the root trainer's matcher picks."""
    from anima_trainer.models import load_dit
    from anima_trainer.networks.inject import check_network_args, find_targets

    targets = ["q_proj", "mlp.layer1", "re:cross_attn\\.k_", "blocks.1.*.v_proj", "transformer.mlp.2"]
    write_shapes_dataset(tmp_path / "imgs", count=1)
    src = tmp_path / "root.toml"
    src.write_text(model_table(models) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\n[lora]\n"
                   f"lora_targets = {json.dumps(targets)}\n[training]\n", encoding="utf-8")
    _, paths = convert_root_file(src, tmp_path / "out")
    cfg = parse_train_args(["--config_file", str(paths["train"])])
    dit = load_dit(models["dit"], dtype=torch.float32)
    parsed = check_network_args(cfg.network_args)
    got = set(find_targets(dit, parsed["include_patterns"], parsed["exclude_patterns"], parsed["train_llm_adapter"]))

    def root_matches(name: str) -> bool:  # the root trainer's rules, written out independently
        leaf = name.split(".")[-1]
        for t in (x.removeprefix("transformer.") for x in targets):
            if t.startswith("re:"):
                hit = re.search(t[3:], name) is not None
            elif "*" in t:
                hit = re.fullmatch(t.replace(".", r"\.").replace("*", ".*"), name) is not None
            elif "." in t:
                hit = name == t or name.endswith("." + t)
            else:
                hit = leaf == t
            if hit:
                return True
        return False

    linears = {n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linears if root_matches(n)} - {"llm_adapter.out_proj"}
    assert got == expected
    assert "llm_adapter.blocks.0.self_attn.q_proj" in got and "blocks.1.self_attn.v_proj" in got
    assert target_regex("re:foo") == ".*(?:foo).*"


def test_presets_and_train_parts(models, tmp_path):
    write_shapes_dataset(tmp_path / "imgs", count=1)
    base = model_table(models) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\n"
    conv = convert_root_config(tomllib.loads(base + '[lora]\nanima_target_preset = "anima_block_llm"\n[training]\n'))
    assert conv.train["network_args"] == ["train_adaln=true", "train_llm_adapter=true"]
    conv = convert_root_config(tomllib.loads(base + '[lora]\nanima_target_preset = "anima_block"\n[training]\n'))
    assert conv.train["network_args"] == ["train_adaln=true", "train_llm_adapter=false"]
    conv = convert_root_config(tomllib.loads(base + '[training]\ntrain_parts = "dit_llm_adapter_qwen"\n'))
    row = next(r for r in conv.rows if r.key == "training.train_parts")
    assert row.status == "approximate" and "full fine-tune" in row.note
    with pytest.raises(ConversionError, match=r"lora\.network_type"):
        convert_root_config(tomllib.loads(base + '[lora]\nnetwork_type = "loha"\n[training]\n'))
    with pytest.raises(ConversionError, match=r"dataset\.reso_step"):
        convert_root_config(tomllib.loads(base + 'reso_step = 24\n[training]\n'))


def test_root_style_detection(models, tmp_path):
    # root-only keys decide, not table names: a kohya TOML with [model] / [training] tables stays a kohya TOML
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f"[model]\npretrained_model_name_or_path = {q(models['dit'])}\nqwen3 = {q(models['qwen3'])}\n"
                     f"vae = {q(models['vae'])}\n[training]\noutput_dir = 'o'\ndataset_config = 'd.toml'\n"
                     "max_train_epochs = 2\n", encoding="utf-8")
    assert parse_train_args(["--config_file", str(kohya)]).max_train_epochs == 2
    assert not is_root_style(tomllib.loads(kohya.read_text()))
    root = tmp_path / "root.toml"
    root.write_text(model_table(models) + "[training]\nepochs = 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"root-style Anima_Trainer config .*`anima-trainer convert-config "):
        parse_train_args(["--config_file", str(root)])


def test_sd_scripts_anima_converter_flags(models, tmp_path, capsys):
    """sd-scripts-anima's converter command line (--input, --output_dir, --train_args_name, --dataset_name; default
    output folder <input folder>/kohya_converted) converts the same way as `convert-config INPUT --out DIR`."""
    write_shapes_dataset(tmp_path / "imgs", count=1)
    src = tmp_path / "cfg" / "root.toml"
    src.parent.mkdir()
    src.write_text(model_table(models) + f"[dataset]\ndata_dir = {q(tmp_path / 'imgs')}\n[training]\n",
                   encoding="utf-8")
    assert main(["convert-config", "--input", str(src), "--train_args_name", "train_args.toml",
                 "--dataset_name", "ds.toml"]) == 0
    out = tmp_path / "cfg" / "kohya_converted"
    assert sorted(p.name for p in out.iterdir()) == ["ds.toml", "train_args.toml"]
    cfg = parse_train_args(["--config_file", str(out / "train_args.toml")])
    assert cfg.dataset_config == out / "ds.toml" and cfg.pretrained_model_name_or_path == models["dit"]
    assert main(["convert-config", "--input", str(src), "--output_dir", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["dataset.toml", "train.toml"]
    capsys.readouterr()
    assert main(["convert-config", str(src), "--input", str(src)]) == 2
    assert "give the root-style TOML once, as INPUT or as --input INPUT" in capsys.readouterr().err
    assert main(["convert-config", "--input", str(src), "--output_dir", str(tmp_path / "p"),
                 "--dataset_name", "sub/ds.toml"]) == 2
    assert "--dataset_name: 'sub/ds.toml' is not a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
