"""Issue 15 item 1, config side: kohya's network_train_unet_only / network_train_text_encoder_only /
text_encoder_lr are TrainConfig fields with kohya's meaning (a text-encoder LoRA by default), caching the text
encoder's outputs excludes training it (one notice; an error where nothing would be left to train), and
sd-scripts-anima configs keep that trainer's DiT-only default."""

from __future__ import annotations

import pytest

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.config import kohya_options as ko
from anima_trainer.config.train import TrainConfig

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors",
            "--vae", "vae.safetensors", "--output_dir", "out", "--dataset_config", "dataset.toml"]
OPTIONS = ("network_train_unet_only", "network_train_text_encoder_only", "text_encoder_lr")


def parse(*argv: str, toml: str | None = None, tmp_path=None) -> TrainConfig:
    extra: list[str] = []
    if toml is not None:
        f = tmp_path / "train.toml"
        f.write_text(toml, encoding="utf-8")
        extra = ["--config_file", str(f)]
    return parse_train_args([*REQUIRED, *extra, *argv])


def test_the_options_are_fields_not_rules():
    assert all(n in TrainConfig.model_fields for n in OPTIONS)
    assert not set(OPTIONS) & set(ko.RULES) and all(n in ko.KOHYA_OPTIONS for n in OPTIONS)
    assert all(TrainConfig.model_fields[n].description for n in OPTIONS)


def test_kohyas_default_trains_the_text_encoder_too():
    cfg = parse()
    assert (cfg.network_train_unet_only, cfg.trains_text_encoder, cfg.trains_dit) == (False, True, True)
    assert cfg.text_encoder_lr is None and cfg.text_encoder_notices() == [] and cfg.notices == []
    only = parse("--network_train_unet_only")
    assert (only.trains_text_encoder, only.trains_dit, only.text_encoder_notices()) == (False, True, [])
    te = parse("--network_train_text_encoder_only")
    assert (te.trains_text_encoder, te.trains_dit, te.text_encoder_notices()) == (True, False, [])


def test_text_encoder_lr_one_value_or_kohyas_per_encoder_list(tmp_path):
    assert parse("--text_encoder_lr", "3e-5").text_encoder_lr == 3e-5
    assert parse(toml="text_encoder_lr = 4e-5\n", tmp_path=tmp_path).text_encoder_lr == 4e-5
    one = parse(toml="text_encoder_lr = [0.0001]\n", tmp_path=tmp_path)
    assert one.text_encoder_lr == 1e-4 and one.text_encoder_notices() == []
    two = parse("--text_encoder_lr", "1e-4", "2e-5")  # kohya's nargs: one value per text encoder
    assert two.text_encoder_lr == 1e-4
    assert two.text_encoder_notices() == [
        "text_encoder_lr = [0.0001, 2e-05]: Anima has one text encoder (Qwen3), which uses the first value 0.0001; "
        "2e-05 belong to no encoder (kohya ignores them too)"]
    for unset in ('""', "[]"):  # what GUIs write for "unset": learning_rate
        assert parse(toml=f"text_encoder_lr = {unset}\n", tmp_path=tmp_path).text_encoder_lr is None
    with pytest.raises(ConfigError, match=r"text_encoder_lr: must be between 0 and 1000, got -1"):
        parse("--text_encoder_lr=-1")
    with pytest.raises(ConfigError, match="text_encoder_lr: expected a number or a list of numbers"):
        parse(toml='text_encoder_lr = "fast"\n', tmp_path=tmp_path)


def test_text_encoder_lr_zero_freezes_the_encoder_and_says_so():
    cfg = parse("--text_encoder_lr", "0")
    assert (cfg.trains_text_encoder, cfg.trains_dit) == (False, True)
    assert cfg.text_encoder_notices() == [
        "text_encoder_lr = 0: the text encoder (Qwen3) stays frozen (kohya drops a group with lr 0), so no "
        "text-encoder modules are made; only the DiT is trained"]
    with pytest.raises(ConfigError, match="network_train_text_encoder_only with text_encoder_lr = 0: nothing"):
        parse("--text_encoder_lr", "0", "--network_train_text_encoder_only")


def test_text_encoder_lr_without_a_trained_encoder_says_it_has_no_effect(tmp_path):
    cfg = parse(toml="network_train_unet_only = true\ntext_encoder_lr = 5e-5\n", tmp_path=tmp_path)
    assert cfg.text_encoder_notices() == [
        "text_encoder_lr = 5e-05: no effect, the text encoder is not trained (network_train_unet_only = true)"]


@pytest.mark.parametrize("cache", ["cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                                   "cache_llm_adapter_outputs"])
def test_a_text_cache_means_the_encoder_is_not_trained_with_one_notice(cache):
    cfg = parse(f"--{cache}")
    assert (cfg.trains_text_encoder, cfg.trains_dit) == (False, True)
    assert cfg.text_encoder_notices() == [
        f"{cache} = true: the text encoder (Qwen3) is not trained, only the DiT, because its outputs are cached "
        "(kohya refuses this combination with an assert; this run goes on as with network_train_unet_only = true). "
        f"To train a text-encoder LoRA too, turn {cache} off; to say so, set network_train_unet_only = true"]
    # saying so: no notice
    assert parse(f"--{cache}", "--network_train_unet_only").text_encoder_notices() == []
    # nothing left to train: refused, naming both options and the fix
    with pytest.raises(ConfigError) as e:
        parse(f"--{cache}", "--network_train_text_encoder_only")
    assert str(e.value) == (
        f"network_train_text_encoder_only: the text encoder cannot be trained while {cache} is on (its outputs are "
        f"computed once), so nothing would be trained; turn {cache} off, or remove network_train_text_encoder_only "
        "to train the DiT")


def test_both_only_flags_train_nothing():
    with pytest.raises(ConfigError, match="network_train_unet_only and network_train_text_encoder_only are both set"):
        parse("--network_train_unet_only", "--network_train_text_encoder_only")


def test_dit_settings_without_dit_modules_say_so():
    cfg = parse("--network_train_text_encoder_only", "--unet_lr", "1e-4", "--mlp_lr", "0", "--network_args",
                "train_llm_adapter=true", "train_norm=false", "loraplus_lr_ratio=2")
    assert cfg.text_encoder_notices() == [
        "unet_lr = 0.0001, mlp_lr = 0, network_args train_llm_adapter=true: no effect, network_train_text_encoder_only "
        "trains no DiT module (nor the LLM adapter or norm gains inside the DiT; as in kohya)"]


def test_sd_scripts_anima_configs_stay_dit_only(tmp_path):
    cfg = parse("--anima_flow_shift", "3")  # one of its own names: its defaults apply
    assert cfg.sd_scripts_anima_defaults and cfg.network_train_unet_only and not cfg.trains_text_encoder
    assert "network_train_unet_only = true (DiT only)" in cfg.sd_scripts_anima_notices()[0]
    # its trainer has no text-encoder LoRA whatever the flag says; the opt-out gives kohya's meaning
    off = parse("--anima_flow_shift", "3", "--no-network_train_unet_only")
    assert off.network_train_unet_only and "the config's false is overridden" in off.sd_scripts_anima_notices()[0]
    kohya = parse("--anima_flow_shift", "3", "--sd_scripts_anima_defaults=false")
    assert kohya.trains_text_encoder
    # a cache needs no notice there: the text encoder is not trained anyway
    assert parse("--anima_flow_shift", "3", "--cache_text_encoder_outputs").text_encoder_notices() == []
