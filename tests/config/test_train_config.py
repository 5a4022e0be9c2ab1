"""TrainConfig / parse_train_args: kohya precedence and TOML semantics, aliases, and every user mistake being a
ConfigError that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from anima_trainer.config import (
    ConfigError,
    TrainConfig,
    build_train_parser,
    parse_train_args,
)
from anima_trainer.train.optim import check_optimization, optimizer_description

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors",
            "--vae", "vae.safetensors", "--output_dir", "out", "--dataset_config", "dataset.toml"]


def write(tmp_path: Path, text: str, name: str = "train.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_train_args(argv)
    return str(e.value)


def test_defaults_are_kohyas():
    c = parse_train_args(REQUIRED)
    assert c.pretrained_model_name_or_path == Path("dit.safetensors")
    assert (c.learning_rate, c.max_train_steps, c.max_train_epochs) == (2e-6, 1600, None)
    assert (c.network_module, c.network_dim, c.network_alpha, c.network_args) == ("lora", 4, 1.0, {})
    assert (c.optimizer_type, c.lr_scheduler, c.lr_warmup_steps, c.max_grad_norm) == ("AdamW", "constant", 0, 1.0)
    assert (c.train_batch_size, c.gradient_accumulation_steps, c.mixed_precision) == (1, 1, "no")
    assert (c.timestep_sampling, c.discrete_flow_shift, c.sigmoid_scale) == ("sigmoid", 1.0, 1.0)
    assert (c.weighting_scheme, c.logit_mean, c.logit_std, c.mode_scale) == ("uniform", 0.0, 1.0, 1.29)
    assert (c.loss_type, c.huber_c, c.max_data_loader_n_workers) == ("l2", 0.1, 8)
    assert (c.output_name, c.save_precision, c.overwrite) == ("last", None, False)  # save_model_as: a rule


def test_precedence_cli_over_toml_over_default(tmp_path):
    toml = write(tmp_path, 'network_dim = 16\nlearning_rate = 1e-4\nnetwork_args = ["a=1"]\n')
    c = parse_train_args([*REQUIRED, "--config_file", str(toml), "--network_dim", "32"])
    assert c.network_dim == 32  # command line wins
    assert c.learning_rate == 1e-4  # TOML beats the default
    assert c.network_args == {"a": "1"}
    assert c.network_alpha == 1.0  # default
    c = parse_train_args([*REQUIRED, "--config_file", str(toml), "--network_args", "b=2"])
    assert c.network_args == {"b": "2"}  # a list option on the command line replaces the TOML's


def test_toml_tables_flattened_and_suffix_optional(tmp_path):
    write(tmp_path, '[model]\nnetwork_dim = 8\n[optimizer]\nlearning_rate = 5e-5\n[x]\ngradient_checkpointing = true\n'
                    'max_train_epochs = 3\n')
    c = parse_train_args([*REQUIRED, "--config_file", str(tmp_path / "train")])  # ".toml" appended as in kohya
    assert (c.network_dim, c.learning_rate, c.gradient_checkpointing, c.max_train_epochs) == (8, 5e-5, True, 3)
    assert "not found (also tried" in error([*REQUIRED, "--config_file", str(tmp_path / "nope")])


def test_duplicate_key_across_tables(tmp_path):
    toml = write(tmp_path, "seed = 1\n[a]\nnetwork_dim = 8\n[b]\nnetwork_dim = 16\n")
    msg = error([*REQUIRED, "--config_file", str(toml)])
    assert "'network_dim'" in msg and "[a]" in msg and "[b]" in msg and "train.toml" in msg
    toml = write(tmp_path, "seed = 1\n[a]\nseed = 2\n")
    assert "both the top level and [a]" in error([*REQUIRED, "--config_file", str(toml)])


def test_unknown_toml_key_suggests(tmp_path):
    toml = write(tmp_path, "[opt]\nlearning_rat = 1e-4\n")
    msg = error([*REQUIRED, "--config_file", str(toml)])
    assert msg == "unknown key 'learning_rat' in train.toml line 2; did you mean 'learning_rate'?"


def test_unknown_flag_suggests_and_abbreviation_rejected():
    assert error([*REQUIRED, "--learning_rat", "1e-4"]) == \
        "unknown option '--learning_rat'; did you mean '--learning_rate'?"
    msg = error([*REQUIRED, "--config", "train.toml"])  # allow_abbrev=False: not taken as --config_file
    assert msg == "unknown option '--config'; did you mean '--config_file'?"
    assert "unexpected argument 'stray'" in error([*REQUIRED, "stray"])
    assert build_train_parser().allow_abbrev is False


def test_type_errors_name_the_key(tmp_path):
    assert error([*REQUIRED, "--network_dim", "abc"]) == "network_dim: expected an integer, got 'abc'"
    assert error([*REQUIRED, "--learning_rate", "fast"]) == "learning_rate: expected a number, got 'fast'"
    toml = write(tmp_path, 'gradient_checkpointing = "maybe"\nnetwork_dim = 2.5\n')
    msg = error([*REQUIRED, "--config_file", str(toml)])
    assert "gradient_checkpointing: expected true or false, got 'maybe'" in msg
    assert "network_dim: expected an integer, got 2.5" in msg
    assert "mixed_precision: expected one of 'no', 'fp16' or 'bf16', got 'fp8'" == \
        error([*REQUIRED, "--mixed_precision", "fp8"])


def test_required_and_cross_field_rules():
    msg = error(["--qwen3", "q"])
    assert "pretrained_model_name_or_path: required" in msg and "dataset_config: required" in msg
    assert "max_train_steps: must be >= 1" in error([*REQUIRED, "--max_train_steps", "0"])
    assert "max_train_epochs: must be >= 1" in error([*REQUIRED, "--max_train_epochs", "0"])
    assert error([*REQUIRED, "--save_precision", "fp8"]).startswith("save_precision: expected one of")
    assert parse_train_args([*REQUIRED, "--save_precision", "float"]).save_precision == "fp32"  # kohya's name
    assert "constant_with_warmup" in error([*REQUIRED, "--lr_warmup_steps", "10"])
    c = parse_train_args([*REQUIRED, "--lr_scheduler", "cosine", "--lr_warmup_steps", "10%"])
    assert c.lr_warmup_steps == 0.1
    assert parse_train_args([*REQUIRED, "--lr_scheduler", "linear", "--lr_warmup_steps", "50"]).lr_warmup_steps == 50
    assert "log_with: 'tensorboard' needs logging_dir" in error([*REQUIRED, "--log_with", "tensorboard"])
    assert parse_train_args([*REQUIRED, "--sample_every_n_steps", "100"]).notices == [
        "sample_every_n_steps = 100: no sample_prompts are given, so no previews are made (as in kohya); set "
        "sample_prompts to a prompt file to get them"]
    assert "dim_from_weights: needs network_weights" in error([*REQUIRED, "--dim_from_weights"])
    assert "network_dropout: must be < 1" in error([*REQUIRED, "--network_dropout", "1"])


def test_aliases_and_conflicts(tmp_path):
    c = parse_train_args(["--anima_transformer", "d.safetensors", "--qwen", "qwen_dir", "--vae", "v",
                          "--output_dir", "o", "--dataset_config", "ds.toml", "--t5_tokenizer_dir", "t5"])
    assert (c.pretrained_model_name_or_path, c.qwen3, c.t5_tokenizer_path) == (
        Path("d.safetensors"), Path("qwen_dir"), Path("t5"))
    msg = error([*REQUIRED, "--qwen", "other"])
    assert "'qwen' (sd-scripts-anima name of 'qwen3') and 'qwen3' are both set on the command line" in msg
    assert parse_train_args([*REQUIRED, "--qwen", "qwen3.safetensors"]).qwen3 == Path("qwen3.safetensors")
    toml = write(tmp_path, '[m]\nqwen = "a"\n[n]\nqwen3 = "b"\n')
    assert "both set in train.toml" in error([*REQUIRED, "--config_file", str(toml)])
    # across layers it is ordinary precedence: the command line wins
    toml = write(tmp_path, 'qwen = "from_toml"\n')
    assert parse_train_args([*REQUIRED, "--config_file", str(toml)]).qwen3 == Path("qwen3.safetensors")


def test_sd_scripts_anima_timestep_names():
    # sd-scripts-anima's logit_normal + flow shift = kohya's "shift"; its unset shift defaults to 3.0
    c = parse_train_args([*REQUIRED, "--anima_timestep_sampling", "logit_normal"])
    assert (c.timestep_sampling, c.discrete_flow_shift) == ("shift", 3.0)
    c = parse_train_args([*REQUIRED, "--anima_flow_shift", "5", "--anima_sigmoid_scale", "1.5"])
    assert (c.timestep_sampling, c.discrete_flow_shift, c.sigmoid_scale) == ("shift", 5.0, 1.5)
    assert "sd-scripts-anima's 'uniform' shifts t" in error([*REQUIRED, "--anima_timestep_sampling", "uniform"])
    c = parse_train_args([*REQUIRED, "--anima_timestep_sampling", "uniform", "--anima_flow_shift", "1"])
    assert c.timestep_sampling == "uniform"
    assert "discrete_flow_shift" in error([*REQUIRED, "--anima_flow_shift", "2", "--discrete_flow_shift", "3"])


def test_network_and_optimizer_args():
    c = parse_train_args([*REQUIRED, "--network_args", "train_llm_adapter=True", "network_reg_lrs=.*mlp.*=1e-4",
                          "--optimizer_args", "weight_decay=0.01", "betas=(0.9,0.99)"])
    assert c.network_args == {"train_llm_adapter": "True", "network_reg_lrs": ".*mlp.*=1e-4"}  # first '=' splits
    assert c.optimizer_args == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert error([*REQUIRED, "--network_args", "oops"]) == "network_args: item 'oops' is not of the form key=value"
    c = parse_train_args([*REQUIRED, "--optimizer_args", "weight_decy=0.1"])  # the keys are checked at start-up
    with pytest.raises(ConfigError) as e:
        check_optimization(c)
    assert "optimizer_args: AdamW has no argument 'weight_decy'; did you mean 'weight_decay'? (AdamW accepts: " \
        "betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused)" == str(e.value)
    assert "use learning_rate" in error([*REQUIRED, "--optimizer_args", "lr=1"])


def test_optimizer_and_scheduler_names():
    assert parse_train_args([*REQUIRED, "--optimizer_type", "adamw"]).optimizer_type == "AdamW"
    assert parse_train_args([*REQUIRED, "--optimizer_type", "radam_schedulefree"]).optimizer_type == \
        "RAdamScheduleFree"
    with pytest.raises(ConfigError, match="did you mean 'Prodigy'"):  # the class is resolved at start-up
        check_optimization(parse_train_args([*REQUIRED, "--optimizer_type", "prodgy"]))
    assert parse_train_args([*REQUIRED, "--lr_scheduler", "polynomial"]).lr_scheduler == "polynomial"
    assert "unknown scheduler 'cosin'; did you mean 'cosine'?" in error([*REQUIRED, "--lr_scheduler", "cosin"])


def test_save_model_as_and_network_module():
    msg = error([*REQUIRED, "--save_model_as", "ckpt"])
    assert msg.startswith("save_model_as: 'ckpt'") and "only safetensors" in msg
    for name in ("networks.lora_anima", "networks.lora", "anima_trainer.networks.lora", "lora"):
        assert parse_train_args([*REQUIRED, "--network_module", name]).network_module == "lora"
    for name, args, algo in (("networks.lokr", [], "lokr"), ("networks.loha", [], "loha"),
                             ("lycoris.kohya", ["algo=lokr", "factor=4"], "lokr"),
                             ("lycoris.kohya", ["algo=LoHa"], "loha"),
                             ("networks.lokr", ["algo=lokr"], "lokr")):
        c = parse_train_args([*REQUIRED, "--network_module", name, "--network_args", *args])
        assert c.network_module == algo and "algo" not in c.network_args, (name, args)
        assert c.to_metadata(optimizer="(not read here)")["ss_network_module"] == f"networks.{algo}"
    assert parse_train_args([*REQUIRED, "--network_module", "lycoris.kohya", "--network_args", "algo=lokr",
                             "factor=4"]).network_args == {"factor": "4"}
    msg = error([*REQUIRED, "--network_module", "lycoris.kohya"])
    assert msg.startswith("network_module: 'lycoris.kohya' needs network_args algo=lokr or algo=loha")
    assert "needs network_args algo" in error([*REQUIRED, "--network_module", "lycoris.kohya", "--network_args",
                                               "algo=locon"])
    assert "does not match" in error([*REQUIRED, "--network_module", "networks.lokr", "--network_args", "algo=loha"])
    assert parse_train_args([*REQUIRED, "--network_module", "networks.lokr_anima"]).network_module == "lokr"
    assert "unknown network module 'foo'" in error([*REQUIRED, "--network_module", "foo"])


def test_realistic_kohya_train_toml(tmp_path):
    toml = write(tmp_path, '''\
[model_arguments]
pretrained_model_name_or_path = "/models/anima-base-v1.0.safetensors"
qwen3 = "/models/qwen_3_06b_base.safetensors"
vae = "/models/qwen_image_vae.safetensors"

[dataset_arguments]
dataset_config = "dataset.toml"
max_data_loader_n_workers = 2

[network_arguments]
network_module = "networks.lora_anima"
network_dim = 32
network_alpha = 16
network_args = ["train_llm_adapter=True", "exclude_patterns=['.*final.*']"]

[optimizer_arguments]
optimizer_type = "AdamW"
optimizer_args = ["weight_decay=0.01"]
learning_rate = 1e-4
lr_scheduler = "cosine"
lr_warmup_steps = 100
max_grad_norm = 1.0

[training_arguments]
output_dir = "output"
output_name = "my_anima_lora"
save_model_as = "safetensors"
save_precision = "bf16"
save_every_n_epochs = 1
max_train_epochs = 10
train_batch_size = 2
mixed_precision = "bf16"
gradient_checkpointing = true
seed = 42
timestep_sampling = "shift"
discrete_flow_shift = 3.0
sigmoid_scale = 1.0
weighting_scheme = "none"
loss_type = "l2"
logging_dir = "logs"
log_with = "tensorboard"
sample_prompts = "prompts.txt"
sample_every_n_epochs = 1
''')
    c = parse_train_args(["--config_file", str(toml)])
    assert c.pretrained_model_name_or_path == Path("/models/anima-base-v1.0.safetensors")
    assert c.dataset_config == Path("dataset.toml")  # relative: kept as is, i.e. relative to the working dir
    assert (c.network_module, c.network_dim, c.network_alpha) == ("lora", 32, 16.0)
    assert c.network_args == {"train_llm_adapter": "True", "exclude_patterns": "['.*final.*']"}
    assert (c.learning_rate, c.lr_scheduler, c.lr_warmup_steps, c.optimizer_args) == (
        1e-4, "cosine", 100, {"weight_decay": 0.01})
    assert (c.max_train_epochs, c.train_batch_size, c.mixed_precision, c.save_precision) == (10, 2, "bf16", "bf16")
    assert (c.timestep_sampling, c.discrete_flow_shift, c.weighting_scheme, c.seed) == ("shift", 3.0, "none", 42)
    meta = c.to_metadata(optimizer_description(c.optimizer_type, c.optimizer_args))  # as train/file_metadata.py
    assert meta["ss_network_module"] == "networks.lora_anima"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_seed"]) == ("32", "16.0", "42")
    # kohya's net_kwargs: the arguments as given, then its "dropout" (network_dropout, here unset)
    assert meta["ss_network_args"] == ('{"train_llm_adapter": "True", "exclude_patterns": "[\'.*final.*\']", '
                                       '"dropout": null}')
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert all(isinstance(v, str) for v in meta.values())


def test_bad_toml_and_direct_construction(tmp_path):
    msg = error(["--config_file", str(write(tmp_path, "network_dim = = 3\n"))])
    assert msg.startswith("config_file:") and "not valid TOML" in msg
    assert "cannot be set inside" in error([*REQUIRED, "--config_file",
                                            str(write(tmp_path, 'config_file = "x.toml"\n'))])
    # a TrainConfig built directly normalises too (other stages build them in tests)
    c = TrainConfig(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir="o", dataset_config="ds",
                    network_module="networks.lora_anima", network_args=["a=b"])
    assert (c.network_module, c.network_args) == ("lora", {"a": "b"})


def test_t5_tokenizer_defaults_are_the_download_table():
    """config (the lowest layer) spells the T5 tokenizer defaults itself; they must stay download's table."""
    from anima_trainer.tools.download.sources import T5_TOKENIZER as t5

    fields = TrainConfig.model_fields
    assert (fields["t5_tokenizer_repo_id"].default, fields["t5_tokenizer_subfolder"].default,
            fields["t5_tokenizer_modelscope_repo_id"].default, fields["t5_tokenizer_modelscope_revision"].default,
            fields["t5_tokenizer_modelscope_subfolder"].default) == (
        t5.hf_repo, t5.subfolder, t5.modelscope_repo, t5.modelscope_revision, t5.modelscope_subfolder)
