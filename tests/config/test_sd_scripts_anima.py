"""sd-scripts-anima configs (issue 14 item 2, seed_system.md §1.2–§2): a config that uses its names gets its
defaults, its network module and network_args, train_norm, anima_seq_len and its two resume options."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from safetensors import safe_open

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.compat.dropin import translate_kohya_argv
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml, write_demo_models, write_shapes_dataset
from anima_trainer.train.loop import run_training

# FHfanshu/sd-scripts-anima configs/smoke/anima_10steps_train_args.toml (commit ffd16a6), as published, with only
# its placeholders replaced: the model paths by the tiny demo models (`qwen` named a Hugging Face folder, which
# holds the tokenizer: the tiny Qwen3 is a single file, so its tokenizer folder is given beside it), output_dir and
# dataset_config by temporary ones, and `AdamW8bit` by `AdamW` (bitsandbytes is not installed in CI).
SMOKE = """anima_transformer = "{dit}"
pretrained_model_name_or_path = "{dit}"
vae = "{vae}"
qwen = "{qwen}"
qwen3_tokenizer_path = "{qwen_tok}"
# LLMAdapter链路默认启用，T5 tokenizer 必填
t5_tokenizer_dir = "{t5}"

network_module = "networks.lokr_anima"
network_dim = 16
network_alpha = 16

output_dir = "{out}"
output_name = "anima_smoke_10steps"
save_model_as = "safetensors"
save_every_n_steps = 10

dataset_config = "{dataset}"
max_train_steps = 10
learning_rate = 0.0001
lr_scheduler = "constant"
lr_warmup_steps = 0

train_batch_size = 1
gradient_accumulation_steps = 1
mixed_precision = "bf16"
gradient_checkpointing = false
cache_latents = false
xformers = true
max_data_loader_n_workers = 0

optimizer_type = "AdamW"
optimizer_args = ["weight_decay=0.01", "eps=1e-08", "betas=(0.9,0.95)"]

seed = 42
anima_seq_len = 128
anima_noise_offset = 0.0
"""
# configs/smoke/anima_dataset.toml of the same commit, image_dir replaced
SMOKE_DATASET = """[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 0
flip_aug = false

[[datasets]]
resolution = 512
batch_size = 1
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 1024
bucket_reso_steps = 64

[[datasets.subsets]]
image_dir = "{images}"
num_repeats = 1
"""
DEFAULTS_LINE = ("sd-scripts-anima defaults (the config uses sd-scripts-anima's names): gradient_checkpointing = true "
                 "(the config's false is overridden as sd-scripts-anima does; same result, less memory; "
                 "sd_scripts_anima_defaults = false keeps it off), network_train_unet_only = true (DiT only), "
                 "train_norm = true, LLM-adapter targets "
                 "(network_args train_llm_adapter = true), LoKr factor 8, timestep_sampling = shift, "
                 "discrete_flow_shift = 3.0, "
                 "resume_ignore_optimizer_mismatch = true")
SEQ_LEN_LINE = ("anima_seq_len = 128: the text context is always padded to 512 rows and captions are not cut at 128 "
                "tokens, because ComfyUI runs Anima that way; a shorter context (as sd-scripts-anima trains it) would "
                "train a model ComfyUI does not run")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("seed")
    return {"root": root, "models": write_demo_models(root / "models", seed=3),
            "images": write_shapes_dataset(root / "images", count=2, seed=3)}


def _posix(p: Path) -> str:
    return p.as_posix()


def _smoke(setup: dict, name: str) -> Path:
    m, out = setup["models"], setup["root"] / name
    out.mkdir()
    (out / "anima_dataset.toml").write_text(SMOKE_DATASET.format(images=_posix(setup["images"])), encoding="utf-8")
    path = out / "anima_10steps_train_args.toml"
    path.write_text(SMOKE.format(dit=_posix(m["dit"]), vae=_posix(m["vae"]), qwen=_posix(m["qwen3"]),
                                 qwen_tok=_posix(m["tokenizers"] / "qwen"), t5=_posix(m["tokenizers"] / "t5"),
                                 out=_posix(out / "output"), dataset=_posix(out / "anima_dataset.toml")),
                    encoding="utf-8")
    return path


def test_smoke_config_trains_with_sd_scripts_anima_defaults(setup, caplog):
    """sd-scripts-anima's own 10-step smoke config runs unchanged through the drop-in (1 step here)."""
    argv, dropin_notices = translate_kohya_argv(["--config_file", str(_smoke(setup, "smoke")),
                                                 "--max_train_steps", "1"])
    cfg = parse_train_args(argv)
    assert any(n.startswith("xformers = ") and "torch SDPA" in n for n in [*dropin_notices, *cfg.notices])
    assert cfg.sd_scripts_anima_defaults is True
    assert cfg.network_module == "lokr" and (cfg.network_dim, cfg.network_alpha) == (16, 16.0)
    assert cfg.network_args == {"train_norm": "true", "train_llm_adapter": "true", "factor": "8"}
    assert (cfg.gradient_checkpointing, cfg.train_norm, cfg.timestep_sampling, cfg.discrete_flow_shift) == (
        True, True, "shift", 3.0)
    assert cfg.anima_seq_len == 128 and cfg.resume_ignore_optimizer_mismatch is True
    assert cfg.sd_scripts_anima_notices() == [DEFAULTS_LINE, SEQ_LEN_LINE]
    with caplog.at_level(logging.WARNING, logger="anima_trainer.train.loop"):
        run = run_training(cfg)
    assert run.steps == 1
    notices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("notice: ")]
    assert notices == [f"notice: {DEFAULTS_LINE}", f"notice: {SEQ_LEN_LINE}"]
    events = [json.loads(line) for line in (cfg.output_dir / "anima_smoke_10steps.events.jsonl").read_text(
        encoding="utf-8").splitlines()]
    messages = [e["message"] for e in events if e["type"] == "notice"]
    assert sorted(messages) == sorted([*cfg.notices, DEFAULTS_LINE, SEQ_LEN_LINE])  # each once, xformers' too
    net = run.network
    # the LLM adapter's 10 Linears are trained too, every RMSNorm gain, LoKr with w1 = 8×8 (factor 8 of 64)
    assert sum(p.startswith("llm_adapter.") for p in net.modules_by_name) == 10
    assert len(net.modules_by_name) == 2 * 10 + 10 and net.norm_modules
    assert {tuple(m.lokr_w1.shape) for m in net.lora_modules} == {(8, 8)}
    # dim 16 >= max(out_k, in_n) / 2 for every module of the width-64 model: w2 is a full matrix (scale 1)
    assert {m.dim for m in net.lora_modules} == {16} and not any(m.w2_decomposed for m in net.lora_modules)
    with safe_open(str(run.final_path), "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith(".w_norm") for k in keys)
    assert "diffusion_model.llm_adapter.blocks.0.mlp.2.lokr_w1" in keys


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--anima_transformer", "d.safetensors", "--qwen", "q", "--vae", "v", "--output_dir",
            str(tmp_path / "o"), "--dataset_config", "ds.toml", "--t5_tokenizer_dir", "t5", *extra]


KOHYA = ["--pretrained_model_name_or_path", "d.safetensors", "--qwen3", "q", "--vae", "v", "--dataset_config",
         "ds.toml"]


@pytest.mark.parametrize("names", [["--qwen", "q"], ["--t5_tokenizer_dir", "t5"], ["--anima_seq_len", "512"],
                                   ["--anima_flow_shift", "3"], ["--anima_monitor_memory", "true"],
                                   ["--network_module", "networks.lokr_anima"]])
def test_each_sd_scripts_anima_name_asks_for_its_defaults(tmp_path, names):
    base = [a for a in KOHYA if a not in ("--qwen3", "q")] if names[0] == "--qwen" else KOHYA
    cfg = parse_train_args([*base, "--output_dir", str(tmp_path), *names])
    assert cfg.sd_scripts_anima_defaults is True and cfg.gradient_checkpointing and cfg.train_norm
    assert cfg.network_args["train_llm_adapter"] == "true" and cfg.timestep_sampling == "shift"
    assert cfg.sd_scripts_anima_notices()[0].startswith("sd-scripts-anima defaults (the config uses")


def test_kohya_names_get_kohyas_defaults(tmp_path):
    cfg = parse_train_args([*KOHYA, "--output_dir", str(tmp_path), "--network_module", "networks.lokr"])
    assert cfg.sd_scripts_anima_defaults is False and cfg.network_args == {}
    assert (cfg.gradient_checkpointing, cfg.train_norm, cfg.timestep_sampling) == (False, None, "sigmoid")
    assert cfg.sd_scripts_anima_notices() == [] and cfg.optimizer_mismatch_ignored() is False


def test_what_the_config_sets_wins_over_the_defaults(tmp_path, tmp_path_factory):
    cfg = parse_train_args(_args(tmp_path, "--network_module", "networks.lokr_anima", "--network_args",
                                 "lokr_factor=4", "train_llm_adapter=false", "--no-train_norm",
                                 "--anima_flow_shift", "2", "--resume_ignore_optimizer_mismatch=false"))
    assert cfg.network_args == {"factor": "4", "train_llm_adapter": "false", "train_norm": "false"}
    assert (cfg.discrete_flow_shift, cfg.gradient_checkpointing, cfg.optimizer_mismatch_ignored()) == (2.0, True,
                                                                                                      False)
    assert cfg.sd_scripts_anima_notices() == [
        "sd-scripts-anima defaults (the config uses sd-scripts-anima's names): gradient_checkpointing = true, "
        "network_train_unet_only = true (DiT only)"]
    # the opt-out: none of its defaults
    off = parse_train_args(_args(tmp_path, "--sd_scripts_anima_defaults=false"))
    assert (off.gradient_checkpointing, off.train_norm, off.network_args, off.sd_scripts_anima_notices()) == (
        False, None, {}, [])
    # target_modules chooses the targets itself: no train_llm_adapter is added
    tm = parse_train_args(_args(tmp_path, "--network_args", "target_modules=q_proj"))
    assert tm.network_args == {"target_modules": "q_proj", "train_norm": "true"}
    # network_args train_norm is used as written, with a notice (sd-scripts-anima's default flag would replace it)
    nt = parse_train_args(_args(tmp_path, "--network_args", "train_norm=false"))
    assert nt.network_args["train_norm"] == "false" and nt.train_norm is None
    assert "network_args train_norm=false is used as written" in nt.sd_scripts_anima_notices()[1]


def test_train_norm_flag_wins_over_network_args_with_a_notice(tmp_path):
    for flag, want in (("--train_norm", "true"), ("--no-train_norm", "false"), ("--train_norm=false", "false")):
        other = "false" if want == "true" else "true"
        cfg = parse_train_args([*KOHYA, "--output_dir", str(tmp_path), flag, "--network_args",
                                f"train_norm={other}"])
        assert cfg.network_args == {"train_norm": want}
        assert cfg.sd_scripts_anima_notices() == [
            f"train_norm = {want} wins over network_args train_norm={other} (as in sd-scripts-anima: the flag wins)"]
    same = parse_train_args([*KOHYA, "--output_dir", str(tmp_path), "--train_norm", "--network_args",
                             "train_norm=on"])
    assert same.network_args == {"train_norm": "true"} and same.sd_scripts_anima_notices() == []


def test_lokr_anima_network_args(tmp_path):
    def net(*args: str, module: str = "networks.lokr_anima") -> dict:
        return parse_train_args([*KOHYA, "--output_dir", str(tmp_path), "--sd_scripts_anima_defaults=false",
                                 "--network_module", module, "--network_args", *args]).network_args

    assert net("lokr_factor=4", "lokr_full_matrix=True", "lokr_decompose_both=false", "lokr_rank_dropout=0.1",
               "lokr_module_dropout=0.2") == {"factor": "4", "full_matrix": "True", "decompose_both": "false",
                                              "rank_dropout": "0.1", "module_dropout": "0.2"}
    assert net("lokr_factor=", "lokr_rank_dropout=") == {"factor": "8", "rank_dropout": "0"}  # its `v or default`
    assert net("lokr_factor=4", "factor=4") == {"factor": "4"}
    cfg = parse_train_args([*KOHYA, "--output_dir", str(tmp_path), "--network_module", "networks.lokr_anima",
                            "--sd_scripts_anima_defaults=false", "--network_args", "lokr_factor=-1"])
    assert cfg.network_args == {"factor": "-1"} and cfg.sd_scripts_anima_notices() == [
        "network_args lokr_factor=-1: the most balanced factorisation, as in LyCORIS (sd-scripts-anima clamped it "
        "to 1: a 1×1 lokr_w1 and the whole matrix in lokr_w2)"]
    with pytest.raises(ConfigError, match=r"network_args: lokr_factor=4 \(sd-scripts-anima's name\) and factor=2 "
                                          "disagree; keep one of them"):
        net("lokr_factor=4", "factor=2")
    # its converter writes lokr_* for LoRA too; sd-scripts-anima's LoRA ignores them: a notice here
    cfg = parse_train_args([*KOHYA, "--output_dir", str(tmp_path), "--network_module", "networks.lora_anima",
                            "--network_args", "lokr_factor=8", "lokr_full_matrix=False"])
    assert cfg.network_module == "lora" and cfg.network_args == {}
    assert cfg.sd_scripts_anima_notices() == [
        "network_args lokr_factor=8 ignored: the network is lora, not LoKr (sd-scripts-anima's LoRA ignores it too)",
        "network_args lokr_full_matrix=False ignored: the network is lora, not LoKr (sd-scripts-anima's LoRA ignores "
        "it too)"]


def test_anima_seq_len_any_value_with_one_notice(tmp_path):
    for n in (1, 128, 256, 384):
        notes = parse_train_args(_args(tmp_path, "--anima_seq_len", str(n))).sd_scripts_anima_notices()
        assert notes[1] == SEQ_LEN_LINE.replace("128", str(n)) and len(notes) == 2
    notes = parse_train_args(_args(tmp_path, "--anima_seq_len", "512")).sd_scripts_anima_notices()
    assert notes[1].endswith("because ComfyUI runs Anima that way; nothing to change")
    with pytest.raises(ConfigError, match="anima_seq_len: must be >= 1, got '0'"):
        parse_train_args(_args(tmp_path, "--anima_seq_len", "0"))


# --- resume --------------------------------------------------------------------------------------------------

def _resume_cfg(setup: dict, out: Path, *extra: str, steps: int):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1)
    return parse_train_args(["--config_file", str(toml), "--save_every_n_steps", "1", "--save_state",
                             "--learning_rate", "1e-2", *extra])


def test_changed_optimizer_on_resume(setup, tmp_path, caplog):
    """resume_ignore_optimizer_mismatch: a changed optimizer starts from a fresh state with a warning; without it
    the change is refused (kohya config), and anima_resume_snapshot_strict refuses any change."""
    run_training(_resume_cfg(setup, tmp_path / "r", steps=1))
    state = str(tmp_path / "r" / "output" / "demo_lora-state")
    with pytest.raises(ConfigError, match="optimizer_type: AdamW → SGDNesterov"):
        run_training(_resume_cfg(setup, tmp_path / "r", "--resume", state, "--optimizer_type", "SGDNesterov",
                                 steps=2))
    with pytest.raises(ConfigError, match=r"anima_resume_snapshot_strict = true:\n  lr_schedule.max_train_steps: "
                                          r"1 → 2\n\(set anima_resume_snapshot_strict = false"):
        run_training(_resume_cfg(setup, tmp_path / "r", "--resume", state, "--anima_resume_snapshot_strict",
                                 "--sd_scripts_anima_defaults=false", steps=2))
    with caplog.at_level(logging.WARNING):
        run = run_training(_resume_cfg(setup, tmp_path / "r", "--resume", state, "--optimizer_type", "SGDNesterov",
                                       "--resume_ignore_optimizer_mismatch", steps=2))
    assert run.steps == 2 and type(run.optimizer).__name__ == "SGD"
    assert ("optimizer_type changed (AdamW → SGDNesterov) and resume_ignore_optimizer_mismatch is on: continuing "
            "with a FRESH optimizer state") in caplog.text
    assert "momentum_buffer" in run.optimizer.state[run.optimizer.param_groups[0]["params"][0]]


def test_resolved_config_of_a_sd_scripts_anima_run_reads_back_equal(tmp_path):
    """The resolved config (train_config.toml) holds the applied defaults: read back it is the same config, and
    a kohya config's resolved file does not turn into a sd-scripts-anima one (it has anima_* fields)."""
    from anima_trainer.train.events import write_resolved_config

    for argv in (_args(tmp_path, "--network_module", "networks.lokr_anima", "--anima_seq_len", "256"),
                 [*KOHYA, "--output_dir", str(tmp_path / "o")]):
        cfg = parse_train_args(argv)
        back = parse_train_args(["--config_file", str(write_resolved_config(tmp_path / "r.toml", cfg))])
        absolute = {k: Path.cwd() / v for k, v in cfg.model_dump().items() if isinstance(v, Path)}
        assert back == cfg.model_copy(update=absolute)  # the resolved file makes paths absolute
        assert back.sd_scripts_anima_defaults is cfg.sd_scripts_anima_defaults
