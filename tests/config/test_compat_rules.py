"""Issue 14's rule for every kohya / sd-scripts-anima option and GUI key (config/kohya_options.py): a field is
implemented, a notice option is accepted with exactly one start-up notice, an error option is refused naming
the file and line; renamed keys in "did you mean"; a user's own optimizer module in the working directory; the
generated per-option table of docs/migration.md."""

from __future__ import annotations

import os
import sys

import pytest

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.config import kohya_options as ko
from anima_trainer.compat import option_table
from anima_trainer.config.train import TrainConfig

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "qwen3.safetensors",
            "--vae", "vae.safetensors", "--output_dir", "out", "--dataset_config", "dataset.toml"]
FIELDS = set(TrainConfig.model_fields)
RULE_NAMES = sorted(n for n in ko.RULES if n not in FIELDS and n not in ko.ALIASES)


def asking(rule: ko.Rule) -> object:
    """A value that asks for something (not kohya's off/unset)."""
    if any(isinstance(v, bool) for v in rule.inert):
        return not next(v for v in rule.inert if isinstance(v, bool))
    if any(isinstance(v, int | float) and not isinstance(v, bool) for v in rule.inert):
        return 3
    return "custom"


def default(rule: ko.Rule) -> object:
    return next(v for v in rule.inert if v is not None)


def toml_value(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)


def cli(name: str, v: object) -> list[str]:
    if isinstance(v, bool):
        return [f"--{name}" if v else f"--no-{name}"]
    return [f"--{name}={v}"]


def shown(v: object) -> str:
    return "true" if v is True else "false" if v is False else repr(v)


def error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_train_args(argv)
    return str(e.value)


NOTICES = [n for n in RULE_NAMES if ko.rule_for(n).kind == "notice"]
ERRORS = [n for n in RULE_NAMES if ko.rule_for(n).kind == "error" and n != "huber_schedule"]


def test_every_kohya_and_sd_scripts_anima_option_has_an_outcome():
    unknown = [n for n in (*ko.KOHYA_OPTIONS, *ko.SD_SCRIPTS_ANIMA_OPTIONS)
               if n not in FIELDS and n not in ko.ALIASES and ko.rule_for(n) is None and n != "config_file"]
    assert unknown == []
    # a field wins: the tables name no field (the other parts of issue 14 add fields without editing them)
    assert not set(ko.RULES) & FIELDS
    assert len(ko.KOHYA_OPTIONS) == 233 and "qwen_image_vae_2d" in ko.KOHYA_OPTIONS  # v0.10.1 ∪ v0.11.1


def test_notice_options_in_a_toml_give_one_notice_each(tmp_path):
    toml = tmp_path / "gui.toml"
    toml.write_text("[extra]\n" + "".join(f"{n} = {toml_value(asking(ko.rule_for(n)))}\n" for n in NOTICES),
                    encoding="utf-8")
    c = parse_train_args([*REQUIRED, "--config_file", str(toml)])
    expected = [f"{n} = {shown(asking(ko.rule_for(n)))}: {ko.rule_for(n).text}" for n in NOTICES]
    assert sorted(c.notices) == sorted(expected)
    assert not any("does not implement" in t or "yet" in t for t in c.notices)


def test_notice_options_on_the_command_line(tmp_path):
    argv = [a for n in NOTICES for a in cli(n, asking(ko.rule_for(n)))]
    c = parse_train_args([*REQUIRED, *argv])
    assert sorted(c.notices) == sorted(f"--{n} = {shown(asking(ko.rule_for(n)))}: {ko.rule_for(n).text}"
                                       for n in NOTICES)


def test_kohyas_default_values_say_so(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("xformers = false\nqwen3_max_token_length = 512\nhuber_schedule = \"snr\"\n", encoding="utf-8")
    assert parse_train_args([*REQUIRED, "--config_file", str(toml)]).notices == [
        f"xformers = false: already what anima-trainer does ({ko.RULES['xformers'].text})",
        f"qwen3_max_token_length = 512: already what anima-trainer does ({ko.RULES['qwen3_max_token_length'].text})",
        "huber_schedule = 'snr': only used by the huber and smooth_l1 losses (loss_type is l2); no effect"]


def test_the_command_line_replaces_the_tomls_notice(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("[a]\nxformers = true\nlowram = true\n", encoding="utf-8")
    c = parse_train_args([*REQUIRED, "--config_file", str(toml), "--no-xformers"])
    assert sorted(n.split(":")[0] for n in c.notices) == ["--xformers = false", "lowram = true"]


def test_error_options_name_file_and_line(tmp_path):
    toml = tmp_path / "my_train.toml"
    lines = ["[model]", 'loss_type = "huber"', "[x]"] + [f"{n} = {toml_value(asking(ko.rule_for(n)))}"
                                                          for n in [*ERRORS, "huber_schedule"]]
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    msg = error([*REQUIRED, "--config_file", str(toml)])
    for i, n in enumerate([*ERRORS, "huber_schedule"], 4):
        rule = ko.rule_for(n)
        assert f"{n} = {shown(asking(rule))}: {rule.text} (in my_train.toml line {i})" in msg.splitlines(), n
    # the values that ask for nothing are accepted, with a notice
    ok = tmp_path / "ok.toml"
    ok.write_text("".join(f"{n} = {toml_value(default(ko.rule_for(n)))}\n" for n in ERRORS), encoding="utf-8")
    assert len(parse_train_args([*REQUIRED, "--config_file", str(ok)]).notices) == len(ERRORS)


def test_error_options_on_the_command_line():
    assert error([*REQUIRED, "--show_timesteps", "console"]) == \
        f"--show_timesteps = 'console': {ko.RULES['show_timesteps'].text} (on the command line)"
    assert error([*REQUIRED, "--weighted_captions"]).startswith(
        "--weighted_captions = true: Anima's tokenizer has no weighted captions")


def test_field_wins_over_a_rule(monkeypatch):
    monkeypatch.setitem(ko.RULES, "network_dim", ko.Rule("error", "never used"))
    c = parse_train_args([*REQUIRED, "--network_dim", "8"])
    assert c.network_dim == 8 and c.notices == []


def test_type_errors_name_file_and_line(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('# comment\n[net]\nnetwork_dim = "big"\n', encoding="utf-8")
    assert error([*REQUIRED, "--config_file", str(toml)]) == \
        "network_dim: expected an integer, got 'big' (in t.toml line 3)"


@pytest.mark.parametrize("old, new", [("dit_path", "pretrained_model_name_or_path"), ("qwen3_path", "qwen3"),
                                      ("vae_path", "vae"), ("t5_tokenizer", "t5_tokenizer_path"),
                                      ("timestep_bias_begin", "min_timestep")])
def test_did_you_mean_knows_renamed_keys(tmp_path, old, new):
    toml = tmp_path / "t.toml"
    toml.write_text(f'[m]\n{old} = "x"\n', encoding="utf-8")
    assert error([*REQUIRED, "--config_file", str(toml)]) == \
        f"unknown key '{old}' in t.toml line 2; did you mean '{new}'? ('{old}' is an older or another trainer's " \
        "name for it)"
    assert error([*REQUIRED, f"--{old}", "x"]).startswith(f"unknown option '--{old}'; did you mean '--{new}'?")


def test_keys_nobody_writes_stay_errors(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("[m]\nnetwork_dimm = 8\n", encoding="utf-8")
    assert error([*REQUIRED, "--config_file", str(toml)]) == \
        "unknown key 'network_dimm' in t.toml line 2; did you mean 'network_dim'?"


def test_gui_keys_are_known(tmp_path):
    # kohya_ss and lora-scripts(-next) bookkeeping as their saved TOMLs carry it
    toml = tmp_path / "gui.toml"
    toml.write_text('LoRA_type = "Standard"\nepoch = 10\nmodel_train_type = "anima-lora"\nlora_type = "lora"\n'
                    'enable_preview = false\nsample_sampler = "euler_a"\n', encoding="utf-8")
    notices = parse_train_args([*REQUIRED, "--config_file", str(toml)]).notices
    assert [n.split(":")[0] for n in notices] == ["LoRA_type = 'Standard'", "epoch = 10",
                                                  "model_train_type = 'anima-lora'", "lora_type = 'lora'",
                                                  "enable_preview = false", "sample_sampler = 'euler_a'"]
    assert "kohya_ss GUI bookkeeping" in notices[0] and "lora-scripts GUI key" in notices[2]


def test_sd_scripts_anima_config_is_detected(tmp_path):
    c = parse_train_args([*REQUIRED, "--anima_flow_shift", "3", "--lr_scheduler", "cosine_with_min_lr",
                          "--lr_scheduler_num_cycles", "0.5"])
    assert c.sd_scripts_anima and c.notices == [
        "lr_scheduler_num_cycles = 0.5: an sd-scripts-anima config, so it counts cosine periods as sd-scripts-anima "
        "documents (0.5 = one descent to the minimum)"]
    assert not parse_train_args(REQUIRED).sd_scripts_anima


def test_own_optimizer_and_scheduler_modules_in_the_working_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "my_opts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "fancy.py").write_text("import torch\n\nclass FancyAdam(torch.optim.AdamW):\n    pass\n\n"
                                  "class FancyLR(torch.optim.lr_scheduler.StepLR):\n    pass\n", encoding="utf-8")
    # as `anima-trainer` runs it: the working directory is not on sys.path by itself
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    for mod in ("my_opts", "my_opts.fancy"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    c = parse_train_args([*REQUIRED, "--optimizer_type", "my_opts.fancy.FancyAdam",
                          "--lr_scheduler_type", "my_opts.fancy.FancyLR", "--lr_scheduler_args", "step_size=2"])
    assert (c.optimizer_type, c.lr_scheduler_type) == ("my_opts.fancy.FancyAdam", "my_opts.fancy.FancyLR")
    assert str(tmp_path) in sys.path


def test_dropin_copy_reports_the_users_file(tmp_path):
    from anima_trainer.compat.dropin import translate_kohya_argv

    user = tmp_path / "kohya.toml"
    user.write_text(f'[a]\noutput_dir = "{tmp_path / "o"}"\ntrain_data_dir = "{tmp_path}"\n[b]\n'
                    'network_dim = "big"\n', encoding="utf-8")
    (tmp_path / "3_x").mkdir()
    (tmp_path / "3_x" / "a.png").write_bytes(b"")
    argv, _ = translate_kohya_argv(["--config_file", str(user)])
    assert "kohya.toml" not in argv[argv.index("--config_file") + 1]  # a generated copy
    msg = error([*argv, "--pretrained_model_name_or_path", "d", "--qwen3", "q", "--vae", "v"])
    assert msg == "network_dim: expected an integer, got 'big' (in kohya.toml line 5)"


def test_migration_table_is_generated_from_the_code():
    doc = option_table.DOC_PATH.read_text(encoding="utf-8")
    assert doc == option_table.render_doc(doc), (
        "docs/migration.md's option table is out of date; regenerate it with "
        "`python -m anima_trainer.compat.option_table --write`")
    main, gui = option_table.rows()
    assert {r.name for r in main} >= set(ko.KOHYA_OPTIONS) and len(gui) >= 60
    t = option_table.totals(main)
    assert sum(t.values()) == len(main) and f"**{len(main)} options**" in doc
    # the rule, not a to-do list: no row says "not implemented yet"
    assert "implement yet" not in doc and "not implemented yet" not in doc
    row = next(r for r in main if r.name == "xformers")
    assert (row.outcome, row.what) == ("notice", ko.RULES["xformers"].text)


def test_option_table_prints_totals(capsys):
    assert option_table.main([]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(option_table.BEGIN) and out.err.startswith("totals: {'implemented': ")


def test_flow_settings_without_effect_are_said():
    c = parse_train_args([*REQUIRED, "--discrete_flow_shift", "3", "--weighting_scheme", "logit_normal"])
    assert c.notices == [
        "discrete_flow_shift = 3: not used by timestep_sampling 'sigmoid' (only by shift and sigma); no effect",
        "weighting_scheme = 'logit_normal': for Anima it only shapes the timestep density of timestep_sampling = "
        "\"sigma\" (it is no loss weight); no effect with 'sigmoid'"]
    assert parse_train_args([*REQUIRED, "--timestep_sampling", "sigma", "--discrete_flow_shift", "3",
                             "--weighting_scheme", "logit_normal"]).notices == []


def test_anima_standalone_trainer_template_keys(tmp_path):
    # gazingstars123/Anima-Standalone-Trainer training-ui/templates/config_template.toml (its PR-era names)
    toml = tmp_path / "ast.toml"
    toml.write_text('[training_arguments]\nflash_attn = false\ntimestep_bias_strategy = "none"\n'
                    'persistent_data_loader_workers = true\n[anima_arguments]\ntimestep_sample_method = '
                    '"logit_normal"\nweighting_scheme = "logit_normal"\n', encoding="utf-8")
    c = parse_train_args([*REQUIRED, "--config_file", str(toml)])
    assert (c.timestep_sampling, c.discrete_flow_shift) == ("shift", 3.0)  # the PR's logit-normal, shift 3
    assert sorted(n.split(":")[0] for n in c.notices) == [
        "flash_attn = false", "persistent_data_loader_workers = true", "timestep_bias_strategy = 'none'",
        "timestep_sample_method = 'logit_normal'", "weighting_scheme = 'logit_normal'"]
    toml.write_text('timestep_bias_strategy = "later"\n', encoding="utf-8")
    assert error([*REQUIRED, "--config_file", str(toml)]).startswith(
        "timestep_bias_strategy = 'later': diffusers' timestep bias is not a kohya option")
