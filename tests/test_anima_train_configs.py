"""kohya `anima_train.py` (full fine-tune) configs run unchanged through the drop-in `anima_train.py`: each trains
a couple of steps on the tiny models and saves whole-DiT checkpoints named as kohya names them; every option either
takes effect (asserted on the live run: the optimizer's groups and rates, the fused pass, the bf16 weights, what
stayed frozen) or is named by exactly one start-up notice.  A typo is an error naming the file and line; LoRA-only
options mixed into a fine-tune are accepted with one notice each.

The configs are written as kohya users write them (the options kohya's anima_train.py parser has: kohya-ss/
sd-scripts 48d368f `anima_train.py` setup_parser, `library/anima_train_utils.py`); `@DIR@` is the test's folder.
The only harness addition is `--qwen3_tokenizer_path` on the command line (the tiny models' tokenizers; kohya
bundles its own)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import anima_trainer.train.loop as loop
from anima_trainer.demo import write_demo_models, write_shapes_dataset
from anima_trainer.models import load_dit
from anima_trainer.train.fused_backward import PerParameterOptimizer

ROOT = Path(__file__).resolve().parents[1]

MODELS = """\
pretrained_model_name_or_path = "@DIR@/models/tiny_anima_dit.safetensors"
qwen3 = "@DIR@/models/tiny_qwen3.safetensors"
vae = "@DIR@/models/tiny_vae.safetensors"
t5_tokenizer_path = "@DIR@/models/tokenizers/t5"
"""

DATASET = """\
[general]
shuffle_caption = false
caption_extension = ".txt"
keep_tokens = 0

[[datasets]]
resolution = 64
batch_size = 1
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16

  [[datasets.subsets]]
  image_dir = "@DIR@/img/1_shapes"
  num_repeats = 1
"""

# the low-memory recipe of kohya's fine-tune: Adafactor stepped in the backward pass, bf16 weights, component rates
ADAFACTOR_FUSED = MODELS + """\
dataset_config = "@DIR@/dataset.toml"
output_dir = "@DIR@/out"
output_name = "anima_ft"
save_model_as = "safetensors"
save_precision = "bf16"
mixed_precision = "bf16"
full_bf16 = true
optimizer_type = "adafactor"
optimizer_args = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
learning_rate = 5e-6
self_attn_lr = 1e-5
cross_attn_lr = 1e-5
mlp_lr = 5e-6
mod_lr = 0
llm_adapter_lr = 0
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 1
max_grad_norm = 0.0
fused_backward_pass = true
gradient_checkpointing = true
blocks_to_swap = 1
cache_latents = true
cache_latents_to_disk = true
cache_text_encoder_outputs = true
cache_text_encoder_outputs_to_disk = true
max_train_steps = 2
save_every_n_steps = 1
save_state = true
timestep_sampling = "shift"
discrete_flow_shift = 3.0
weighting_scheme = "none"
attn_mode = "torch"
seed = 42
max_data_loader_n_workers = 0
persistent_data_loader_workers = true
highvram = true
vae_batch_size = 4
skip_cache_check = true
"""

# as a GUI writes it: the dataset as kohya's command-line options, every switch written out, DeepSpeed off, AdamW
# with mixed bf16, the LLM adapter at its own rate and the MLPs frozen
GUI_ADAMW = MODELS + """\
train_data_dir = "@DIR@/img"
resolution = "64,64"
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
caption_extension = ".txt"
output_dir = "@DIR@/out"
output_name = "ft_gui"
save_model_as = "safetensors"
use_safetensors = false
save_precision = "fp16"
mixed_precision = "bf16"
full_bf16 = false
full_fp16 = false
optimizer_type = "AdamW"
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
learning_rate = 1e-5
llm_adapter_lr = 2e-6
mlp_lr = 0
lr_scheduler = "cosine"
lr_warmup_steps = 0
max_grad_norm = 1.0
unsloth_offload_checkpointing = true
fused_backward_pass = false
blocks_to_swap = 0
train_batch_size = 1
gradient_accumulation_steps = 1
max_train_epochs = 1
max_train_steps = 1600
save_every_n_epochs = 1
save_state_on_train_end = true
sample_sampler = "euler_a"
timestep_sampling = "sigmoid"
sigmoid_scale = 1.0
loss_type = "l2"
deepspeed = false
zero_stage = 2
skip_latents_validity_check = true
cache_latents = true
seed = 1234
max_data_loader_n_workers = 0
huggingface_repo_id = ""
xformers = false
sdpa = true
lowram = false
"""

NOTICE_TAIL = "notice: "  # `anima-trainer train`'s notices; the drop-in's own start with "anima_train: "


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kohya_ft")
    write_demo_models(root / "models", seed=6)
    write_shapes_dataset(root / "img" / "1_shapes", count=2, seed=1)  # kohya's <repeats>_<name> layout
    return root


def _script():
    spec = importlib.util.spec_from_file_location("anima_train", ROOT / "anima_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(world: Path, tmp_path: Path, config: str | None, argv: list[str], monkeypatch, capfd):
    """(exit status, stderr, the live run or None) of `anima_train.py [--config_file FILE] argv`."""
    (tmp_path / "dataset.toml").write_text(DATASET.replace("@DIR@", str(world)), encoding="utf-8")
    head = []
    if config is not None:
        text = config.replace("@DIR@/out", str(tmp_path / "out")).replace("@DIR@/dataset.toml",
                                                                         str(tmp_path / "dataset.toml"))
        (tmp_path / "kohya.toml").write_text(text.replace("@DIR@", str(world)), encoding="utf-8")
        head = ["--config_file", str(tmp_path / "kohya.toml")]
    runs = []

    def keep(cfg):
        runs.append(loop.run_training(cfg))
        return runs[-1].final_path

    monkeypatch.setattr(loop, "train", keep)
    monkeypatch.chdir(tmp_path)
    rc = _script().main([*head, "--qwen3_tokenizer_path", str(world / "models" / "tokenizers"), *argv])
    return rc, capfd.readouterr().err, (runs[0] if runs else None)


def _once(err: str, *starts: str) -> None:
    for start in starts:
        n = sum(line.partition(NOTICE_TAIL)[2].startswith(start) or line.startswith(f"anima_train: {start}")
                for line in err.splitlines())
        assert n == 1, f"{start!r}: {n} notices\n{err[-4000:]}"


def _checkpoint(path: Path, base: Path, dtype: str) -> dict[str, str]:
    """A whole DiT in the base file's layout (every `net.` key), in `dtype`, with `format=pt`; its metadata."""
    with safe_open(str(base), "pt") as b, safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert keys == set(b.keys())
        assert {str(f.get_tensor(k).dtype) for k in keys} == {dtype}
        return f.metadata()


def _lrs(run) -> dict[str, float]:
    """Each group's rate before the schedule scaled it (the schedule ends at 0 for cosine)."""
    return {g["name"]: g.get("initial_lr", g["lr"]) for g in run.optimizer.param_groups}


def _start_line(caplog) -> str:
    """The loop's start-up line naming what trains and the levers on."""
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training the DiT itself"))


def test_adafactor_fused_full_bf16_recipe_trains_with_kohyas_meaning(world, tmp_path, monkeypatch, capfd, caplog):
    rc, err, run = _run(world, tmp_path, ADAFACTOR_FUSED, [], monkeypatch, capfd)
    assert rc == 0, err[-4000:]
    out = tmp_path / "out"
    meta = _checkpoint(out / "anima_ft.safetensors", world / "models" / "tiny_anima_dit.safetensors",
                       "torch.bfloat16")
    assert meta["format"] == "pt" and meta["anima_trainer_training_mode"] == "finetune"
    assert (out / "anima_ft-step00000001.safetensors").is_file()  # save_every_n_steps, kohya's name
    assert (out / "anima_ft-state").is_dir() and (out / "anima_ft-step00000001-state").is_dir()  # save_state
    # fused_backward_pass: the per-parameter optimizer; the component rates; mod_lr = 0 and llm_adapter_lr = 0 freeze
    assert "(fine-tune; bf16 weights with compensated updates, fused backward)" in _start_line(caplog)
    assert isinstance(run.optimizer, PerParameterOptimizer) and run.optimizer.bf16_update == "compensated"
    assert _lrs(run) == {"base": 5e-6, "self_attn": 1e-5, "cross_attn": 1e-5, "mlp": 5e-6}
    assert run.optimizer.param_groups[0]["scale_parameter"] is False  # optimizer_args reached Adafactor
    trained = run.network.selected
    assert not any(p.requires_grad for n, p in trained.items() if ".adaln_modulation" in n)
    assert not any(n.startswith("llm_adapter.") for n in trained)
    assert {p.dtype for p in trained.values()} == {torch.bfloat16}  # full_bf16: bf16 weights ...
    # blocks_to_swap with fused_backward_pass swaps the last (trained) block, as kohya's does: no notice
    assert run.dit.runner.swapper.swapped == [1] and run.dit.runner.swapper.stats.writebacks > 0
    assert "blocks_to_swap" not in err
    _once(err, "full_bf16 = true: the fine-tuned weights are held in bf16 and updated with exactly compensated",
          "attn_mode = 'torch':", "persistent_data_loader_workers = true:",
          "highvram = true:", "skip_cache_check = true:")
    assert "the LLM adapter is not trained" not in err  # llm_adapter_lr = 0 says so
    assert "text-encoder LoRA" not in err  # a fine-tune trains no text encoder: no caching-instead-of-training notice
    assert "error" not in err.lower()


def test_gui_written_adamw_config_trains_the_llm_adapter_at_its_rate(world, tmp_path, monkeypatch, capfd, caplog):
    rc, err, run = _run(world, tmp_path, GUI_ADAMW, [], monkeypatch, capfd)
    assert rc == 0, err[-4000:]
    base_path = world / "models" / "tiny_anima_dit.safetensors"
    _checkpoint(tmp_path / "out" / "ft_gui.safetensors", base_path, "torch.float16")  # save_precision
    assert (tmp_path / "out" / "ft_gui-state").is_dir()  # save_state_on_train_end
    assert "(fine-tune; bf16 weights with compensated updates)" in _start_line(caplog)  # fused_backward_pass off
    assert _lrs(run) == {"base": 1e-5, "llm_adapter": 2e-6}  # mlp_lr = 0: no group
    assert run.optimizer.param_groups[0]["weight_decay"] == 0.01
    base = load_dit(base_path, dtype=torch.bfloat16).state_dict()  # mixed bf16: the DiT is held in bf16
    tuned = run.dit.state_dict()
    # llm_adapter_lr above 0: kohya trains the adapter at that rate, and so does this (one notice says so)
    assert any(not torch.equal(base[k], v) for k, v in tuned.items() if k.startswith("llm_adapter."))
    block_mlps = [k for k in tuned if k.startswith("blocks.") and ".mlp." in k]
    assert block_mlps and all(torch.equal(base[k], tuned[k]) for k in block_mlps)  # mlp_lr = 0: frozen
    assert any(not torch.equal(base[k], v) for k, v in tuned.items() if ".self_attn." in k)
    _once(err, "llm_adapter_lr = 2e-06: the LLM adapter trains at this rate", "sample_sampler = 'euler_a':",
          "deepspeed = false:", "zero_stage = 2:", "skip_latents_validity_check = true:", "huggingface_repo_id = '':",
          "xformers = false:", "sdpa = true:", "lowram = false:", "unsloth_offload_checkpointing = true:",
          "mixed_precision = \"bf16\": the fine-tuned weights are held in bf16")
    assert "use_safetensors" not in err and "save_model_as" not in err  # kohya's meaning: safetensors, silently


def test_command_line_with_lora_options_and_a_pickle_format(world, tmp_path, monkeypatch, capfd):
    """A LoRA command line pointed at anima_train.py: the adapter options change nothing (one notice each),
    unet_lr does not replace learning_rate (kohya's fine-tune has no unet_lr), save_model_as ckpt still writes
    kohya's .safetensors, and the default name is kohya's `last`."""
    m = world / "models"
    argv = ["--pretrained_model_name_or_path", str(m / "tiny_anima_dit.safetensors"), "--qwen3",
            str(m / "tiny_qwen3.safetensors"), "--vae", str(m / "tiny_vae.safetensors"), "--t5_tokenizer_path",
            str(m / "tokenizers" / "t5"), "--train_data_dir", str(world / "img"), "--resolution", "64",
            "--caption_extension", ".txt", "--output_dir", str(tmp_path / "out"), "--save_model_as", "ckpt",
            "--use_safetensors", "--mixed_precision", "no", "--optimizer_type", "AdamW", "--learning_rate", "1e-5",
            "--unet_lr", "1e-4", "--text_encoder_lr", "1e-5", "--network_module", "networks.lora_anima",
            "--network_dim", "16", "--network_alpha", "8", "--network_args", "train_llm_adapter=True",
            "--network_train_unet_only", "--max_train_steps", "1", "--max_data_loader_n_workers", "0"]
    rc, err, run = _run(world, tmp_path, None, argv, monkeypatch, capfd)
    assert rc == 0, err[-4000:]
    _checkpoint(tmp_path / "out" / "last.safetensors", m / "tiny_anima_dit.safetensors", "torch.float32")
    assert _lrs(run) == {"base": 1e-5}
    _once(err, "--save_model_as = 'ckpt': kohya's anima_train.py writes the fine-tuned DiT as .safetensors",
          "unet_lr: an adapter-network option", "text_encoder_lr: an adapter-network option",
          "network_dim: an adapter-network option", "network_alpha: an adapter-network option",
          "network_args: an adapter-network option", "network_train_unet_only: an adapter-network option",
          "the LLM adapter is not trained: kohya's anima_train.py trains it at learning_rate")


def test_a_typo_is_an_error_naming_the_file_and_line(world, tmp_path, monkeypatch, capfd):
    config = ADAFACTOR_FUSED.replace("learning_rate = 5e-6", "learing_rate = 5e-6")
    rc, err, run = _run(world, tmp_path, config, [], monkeypatch, capfd)
    line = 1 + config.splitlines().index("learing_rate = 5e-6")
    assert rc == 2 and run is None
    assert f"unknown key 'learing_rate' in kohya.toml line {line}; did you mean 'learning_rate'?" in err
    assert not (tmp_path / "out" / "anima_ft.safetensors").exists()


def test_anima_train_format_switches_keep_kohyas_meaning(tmp_path):
    """kohya's anima_train.py always writes .safetensors (its saver ignores save_model_as and use_safetensors): a
    fine-tune accepts both as kohya does; an adapter still refuses a pickle format (kohya's LoRA trainer writes it)."""
    from anima_trainer.config import parse_train_args
    from tests.config.test_train_config import REQUIRED, error, write

    def load(text: str, *cli: str):
        return parse_train_args([*REQUIRED, "--config_file", str(write(tmp_path, text)), *cli])

    for value in ("true", "false"):
        assert load(f"use_safetensors = {value}\n", "--training_mode", "finetune").notices == []
    (note,) = load('save_model_as = "ckpt"\n', "--training_mode", "finetune").notices
    assert note.startswith("save_model_as = 'ckpt': kohya's anima_train.py writes the fine-tuned DiT as .safetensors "
                           "whatever save_model_as says")
    assert error([*REQUIRED, "--save_model_as", "ckpt"]).startswith("save_model_as: 'ckpt' is not written")
    # kohya's FLUX fine-tune options carried over into an Anima fine-tune config: one notice each
    notes = load("mem_eff_save = true\nblockwise_fused_optimizers = true\n", "--training_mode", "finetune").notices
    assert [n.partition(":")[0] for n in notes] == ["mem_eff_save = true", "blockwise_fused_optimizers = true"]
    assert "set fused_backward_pass = true" in notes[1]


def test_help_says_what_the_fine_tune_does_with_kohyas_options(capfd):
    """`anima_train.py --help`: train's options, the translated ones, then the fine-tune's meaning of kohya's
    options (LLM adapter opt-in, the output files); anima_train_network.py's help has no such part."""
    assert _script().main(["--help"]) == 0
    out = " ".join(capfd.readouterr().out.split())
    assert out.startswith("usage: anima_train.py")
    assert "the LLM adapter trains only with --llm_adapter_lr above 0 or --finetune_llm_adapter" in out
    assert "whatever --save_model_as or --use_safetensors say" in out
    spec = importlib.util.spec_from_file_location("anima_train_network", ROOT / "anima_train_network.py")
    network = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(network)
    assert network.main(["--help"]) == 0
    assert "--finetune_llm_adapter (kohya" not in " ".join(capfd.readouterr().out.split())
