"""anima_train_network.py, the drop-in for kohya's script: a realistic kohya_ss-written TOML, a realistic kohya
command line (as a subprocess) and a root-style Anima_Trainer file each train one step; what kohya reads
differently is translated with a notice, and anything unsupported stops with a message naming it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from safetensors import safe_open

from anima_trainer.compat.dropin import translate_kohya_argv
from anima_trainer.demo import write_demo_models, write_shapes_dataset
from tests.support.kohya_cli import kohya_models_and_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "anima_train_network.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("anima_train_network", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dropin")
    models = write_demo_models(root / "models", seed=6)
    write_shapes_dataset(root / "img" / "5_shapes girl", count=3, seed=1)  # kohya train_data_dir layout
    write_shapes_dataset(root / "img" / "unprefixed", count=1, seed=2)  # not used by kohya
    write_shapes_dataset(root / "reg" / "1_girl", count=2, seed=3)
    return {"root": root, "models": models}


def q(p: object) -> str:
    return json.dumps(str(p))


def _keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as f:
        return list(f.keys())


def kohya_ss_toml(setup: dict, out: Path) -> str:
    """What kohya_ss's LoRA tab writes for Anima (kohya_gui/lora_gui.py config_toml_data, empty/False/0 values
    dropped, keys sorted): GUI bookkeeping (`epoch`, `noise_offset_type`), options sd-scripts ignores for Anima
    (`sample_sampler`, `huber_schedule` with l2, `max_timestep = 1000`), the dataset as train_data_dir, and
    lr_scheduler_num_cycles = the epoch count."""
    m, root = setup["models"], setup["root"]
    return f"""bucket_no_upscale = true
bucket_reso_steps = 16
cache_latents = true
caption_extension = ".txt"
discrete_flow_shift = 1.0
dynamo_backend = "no"
enable_bucket = true
epoch = 1
gradient_accumulation_steps = 1
gradient_checkpointing = true
huber_c = 0.1
huber_scale = 1
huber_schedule = "snr"
learning_rate = 0.0001
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
max_bucket_reso = 128
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_train_steps = 1
min_bucket_reso = 32
mixed_precision = "no"
network_alpha = 1
network_args = []
network_dim = 8
network_module = "networks.lora_anima"
network_train_unet_only = true
noise_offset_type = "Original"
optimizer_type = "AdamW"
output_dir = {q(out)}
output_name = "gui_lora"
persistent_data_loader_workers = 1
pretrained_model_name_or_path = {q(m['dit'])}
prior_loss_weight = 1
qwen3 = {q(m['qwen3'])}
qwen3_max_token_length = 512
qwen3_tokenizer_path = {q(m['tokenizers'] / 'qwen')}
reg_data_dir = {q(root / 'reg')}
resolution = "64,64"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "bf16"
sdpa = true
seed = 1234
sigmoid_scale = 1.0
t5_max_token_length = 512
t5_tokenizer_path = {q(m['tokenizers'] / 't5')}
text_encoder_lr = [0.0001]
timestep_sampling = "sigmoid"
train_batch_size = 1
train_data_dir = {q(root / 'img')}
unet_lr = 0.0001
vae = {q(m['vae'])}
wandb_run_name = "gui_lora"
xformers = true
"""


def test_kohya_ss_gui_toml_trains_one_step(setup, tmp_path, capsys):
    toml = tmp_path / "config_lora-20260101-120000.toml"
    toml.write_text(kohya_ss_toml(setup, tmp_path / "out"), encoding="utf-8")
    assert _load_script().main(["--config_file", str(toml), "--log_with", "none"]) == 0
    err = capsys.readouterr().err
    for notice in ("notice: epoch = 1: kohya_ss GUI bookkeeping", "notice: sample_sampler = 'euler_a': previews "
                   "always use Euler", "notice: huber_schedule = 'snr': only used by the huber and smooth_l1 losses",
                   "notice: xformers = true: attention runs on torch SDPA",
                   "notice: text_encoder_lr = 0.0001: no effect, "
                   "the text encoder is not trained (network_train_unet_only = true)", "folder 'unprefixed'"):
        assert err.count(notice) == 1, notice
    assert "lr_scheduler_num_cycles" not in err  # 1 with cosine: kohya's default, one descent
    assert "lr schedule: cosine, 1 steps: start 0.0001, peak 0.0001 (step 0), end 0.0001, 0 descents" in err
    events = [json.loads(line) for line in (tmp_path / "out" / "gui_lora.events.jsonl").read_text().splitlines()]
    recorded = [e["message"] for e in events if e["type"] == "notice"]
    assert len(recorded) == len(set(recorded)) and any(m.startswith("xformers = true: attention runs") for m in
                                                        recorded) and any(m.startswith("epoch = 1") for m in recorded)
    out = tmp_path / "out"
    assert any(k.endswith(".lora_down.weight") for k in _keys(out / "gui_lora.safetensors"))
    generated = out / "gui_lora_config"
    train = tomllib.loads((generated / "train.toml").read_text())
    assert not {"train_data_dir", "resolution"} & set(train) and train["xformers"] is True  # judged by the loader
    dataset = tomllib.loads((generated / "dataset.toml").read_text())
    assert dataset["general"]["resolution"] == 64 and dataset["general"]["caption_extension"] == ".txt"
    subsets = dataset["datasets"][0]["subsets"]
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s["class_tokens"], s.get("is_reg", False))
            for s in subsets] == [("5_shapes girl", 5, "shapes girl", False), ("1_girl", 1, "girl", True)]


def test_kohya_command_line_trains_one_step_as_a_script(setup, tmp_path):
    m, root, out = setup["models"], setup["root"], tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), *kohya_models_and_data(m, root / "img"),
            "--shuffle_caption", "--keep_tokens", "1",
            "--output_dir", str(out), "--output_name", "cli_lokr", "--save_model_as", "safetensors",
            "--network_module", "lycoris.kohya", "--network_dim", "8", "--network_alpha", "4",
            "--network_args", "algo=lokr", "preset=full", "conv_dim=4", "conv_alpha=1", "factor=4", "use_tucker=False",
            "--sdpa", "--network_train_unet_only", "--cache_latents", "--gradient_checkpointing",
            "--mixed_precision", "no", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "3",
            "--max_train_steps", "1", "--max_data_loader_n_workers", "0", "--persistent_data_loader_workers",
            "--seed", "42", "--log_with", "none"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "notice: --sdpa = true: attention runs on torch SDPA" in proc.stderr and "conv_dim=4 ignored" in proc.stderr
    assert "notice: --persistent_data_loader_workers = true: data workers stay alive" in proc.stderr
    assert "lr_scheduler_num_cycles" not in proc.stderr  # 3 restarts, as kohya: nothing translated
    keys = _keys(out / "cli_lokr.safetensors")
    assert any(k.endswith(".lokr_w1") for k in keys) and not any("lora_down" in k for k in keys)


def test_root_style_config_is_converted_on_the_fly(setup, tmp_path, capsys):
    m = setup["models"]
    write_shapes_dataset(tmp_path / "data" / "4_x", count=2)
    src = tmp_path / "anima_lora_config.toml"
    src.write_text(f"""[model]
transformer_path = {q(m['dit'])}
vae_path = {q(m['vae'])}
text_encoder_path = {q(m['qwen3'])}
t5_tokenizer_path = {q(m['tokenizers'] / 't5')}
[dataset]
data_dir = {q(tmp_path / 'data')}
resolution = 64
min_reso = 32
max_reso = 128
reso_step = 16
max_ar = 3.0
[lora]
lora_name = "root_run"
lora_rank = 4
[training]
epochs = 10
max_steps = 1
mixed_precision = "fp32"
[output]
output_dir = {q(tmp_path / 'out')}
""", encoding="utf-8")
    # the model paths are single files: the Qwen tokenizer comes from the command line, which wins over the file
    assert _load_script().main(["--config_file", str(src), "--qwen3_tokenizer_path", str(m["tokenizers"] / "qwen"),
                                "--log_with", "none"]) == 0
    err = capsys.readouterr().err
    assert "root-style Anima_Trainer config: converted on the fly" in err and "dataset.max_ar" in err
    assert (tmp_path / "out" / "root_run.safetensors").is_file()
    train = tomllib.loads((tmp_path / "out" / "root_run_config" / "train.toml").read_text())
    assert train["max_train_steps"] == 1 and "max_train_epochs" not in train  # 1 step ends before 10 epochs


def test_translations_without_training(setup, tmp_path):
    # kohya's num_cycles keeps kohya's meaning in `anima-trainer train` too: the drop-in passes it on unchanged
    argv, notes = translate_kohya_argv(["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_num_cycles", "1"])
    assert argv == ["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_num_cycles", "1"] and notes == []
    # a dataset_config plus command-line dataset options: kohya's fallback level under [general]
    ds = tmp_path / "dataset.toml"
    ds.write_text('[general]\nshuffle_caption = false\n[[datasets]]\nresolution = 96\n[[datasets.subsets]]\n'
                  'image_dir = "rel_images"\n', encoding="utf-8")
    (tmp_path / "rel_images").mkdir()
    argv, notes = translate_kohya_argv(["--dataset_config", str(ds), "--resolution", "64", "--shuffle_caption",
                                        "--caption_extention", ".txt", "--output_dir", str(tmp_path / "o")])
    generated = Path(argv[argv.index("--dataset_config") + 1])
    doc = tomllib.loads(generated.read_text())
    assert doc["general"] == {"shuffle_caption": False, "resolution": 64, "caption_extension": ".txt"}
    assert doc["datasets"][0]["resolution"] == 96  # the file's own levels still win
    assert Path(doc["datasets"][0]["subsets"][0]["image_dir"]) == tmp_path / "rel_images"


@pytest.mark.parametrize(("extra", "message"), [
    (["--weighted_captions"], "--weighted_captions = true: Anima's tokenizer has no weighted captions"),
    (["--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "preset=attn-only"], "preset='attn-only'"),
])
def test_unsupported_options_fail_clearly(setup, tmp_path, capsys, extra, message):
    m = setup["models"]
    base = ["--pretrained_model_name_or_path", str(m["dit"]), "--qwen3", str(m["qwen3"]), "--vae", str(m["vae"]),
            "--output_dir", str(tmp_path), "--dataset_config", str(tmp_path / "d.toml")]
    assert _load_script().main(base + extra) == 2
    assert message in capsys.readouterr().err


def test_a_path_in_output_name_creates_no_folder_outside_output_dir(setup, tmp_path, capsys):
    """Issue 13 item 9: the drop-in's generated `<output_name>_config` folder is named after output_name too."""
    m = setup["models"]
    work = tmp_path / "a" / "b"
    argv = ["--pretrained_model_name_or_path", str(m["dit"]), "--qwen3", str(m["qwen3"]), "--vae", str(m["vae"]),
            "--output_dir", str(work), "--train_data_dir", str(setup["root"] / "img"), "--resolution", "64",
            "--output_name", "../../escaped"]
    assert _load_script().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_name: '../../escaped' contains a path separator" in err[0], err
    assert not list(tmp_path.rglob("escaped*"))


def test_an_option_without_meaning_is_accepted_with_one_notice():
    """Issue 14 rule 2: kohya's --v_parameterization means nothing for flow matching: accepted, one notice."""
    from anima_trainer.config import parse_train_args

    argv, _ = translate_kohya_argv(["--pretrained_model_name_or_path", "d.safetensors", "--qwen3", "q", "--vae", "v",
                                    "--output_dir", "o", "--dataset_config", "d.toml", "--v_parameterization"])
    notices = parse_train_args(argv).notices
    assert [n for n in notices if n.startswith("--v_parameterization = true: Anima is trained with flow matching")] \
        == notices
