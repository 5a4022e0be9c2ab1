"""Issue 13, items 14–16: every command's help, the version, one-line errors instead of tracebacks, Ctrl-C and
SIGTERM anywhere, and the console (log lines beside the progress bar, levels, TQDM_DISABLE, library noise).

The command line runs in-process through `cli.main([...])` with capsys; only the signal tests start a process.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import anima_trainer
from anima_trainer import cli, console
from anima_trainer.demo import write_demo_configs, write_demo_models, write_shapes_dataset
from anima_trainer.sample.generate import SampleParams
from anima_trainer.train import loop
from anima_trainer.train.monitor import Monitor
from tests.support.cli_output import one_error_line

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "anima_train_network.py"
FAKE_MODELS = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "q.safetensors", "--vae",
               "v.safetensors", "--dataset_config", "dataset.toml"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli.main installs the console handler and sets levels: undo it for the next test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {n: logging.getLogger(n).level for n in console.NOISY_LIBRARIES}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lvl in noisy.items():
        logging.getLogger(n).setLevel(lvl)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The demo's tiny models, 4 images and its train.toml (4 steps, batch 4, workers 0)."""
    root = tmp_path_factory.mktemp("hardening_cli")
    models = write_demo_models(root / "models", seed=3)
    images = write_shapes_dataset(root / "images", count=4, seed=3)
    toml = write_demo_configs(root, models, images, 4, seed=5)
    return {"root": root, "models": models, "images": images, "toml": toml}


def _script():
    spec = importlib.util.spec_from_file_location("anima_train_network", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- item 14: help and version ------------------------------------------------------------------------------

def _subcommands() -> list[str]:
    parser = cli._build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_the_subcommand_list_is_complete():
    names = _subcommands()
    assert {"train", "cache", "inspect", "sample", "demo", "merge", "download", "convert-network",
            "convert-config", "config-reference"} <= set(names)


@pytest.mark.parametrize("command", [[], *([c] for c in _subcommands())], ids=lambda c: " ".join(c) or "top")
def test_help_works_for_every_command(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    prog = " ".join(["anima-trainer", *command])
    assert out.startswith(f"usage: {prog} "), out[:200]
    assert len(out.splitlines()) > 3


def test_train_help_lists_every_setting_and_shows_percent_signs(capsys):
    # the % in vram_budget_gb's description crashed argparse ("%o format: an integer is required")
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--vram_budget_gb" in out and "92 % of the card" in " ".join(out.split())
    assert "--console_log_level" in out


def test_dropin_script_help(capsys):
    assert _script().main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: anima_train_network.py ")
    assert "--learning_rate" in out and "--train_data_dir" in out  # the train options and the translated ones


def test_dropin_script_help_as_a_process():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: anima_train_network.py ") and not proc.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == f"anima-trainer {anima_trainer.__version__}\n"


def test_sample_options_all_have_help_and_show_defaults(capsys):
    parser = cli._build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = {name: [a.dest for a in p._actions if not a.help] for name, p in sub.choices.items()}
    assert not {name: dests for name, dests in undocumented.items() if dests}  # every option of every command
    assert cli.main(["sample", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("sampler steps (default: 30)", "(default: 4.0)", "(default: 1024)", "(default: 3.0)",
                  "(default: 0)"):
        assert shown in out, shown


# --- item 15: one line instead of a traceback ---------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--learning_rate", "1e39"], "learning_rate: must be <= 1000.0, got '1e39'"),
    (["--learning_rate", "nan"], "learning_rate: expected a finite number, got 'nan'"),
    (["--unet_lr", "inf"], "unet_lr: expected a finite number, got 'inf'"),
    (["--max_train_steps", str(2**63 - 1)], f"max_train_steps: must be <= 100000000, got '{2**63 - 1}'"),
    (["--max_train_epochs", str(2**40)], f"max_train_epochs: must be <= 1000000, got '{2**40}'"),
])
def test_out_of_range_numbers_are_config_errors(args, message, tmp_path, capsys):
    assert cli.main(["train", *FAKE_MODELS, "--output_dir", str(tmp_path / "out"), *args]) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {message}"


def test_output_dir_that_is_a_file_is_named_before_loading(tmp_path, capsys):
    blocker = tmp_path / "notafolder"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        assert cli.main(["train", *FAKE_MODELS, "--output_dir", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: output_dir: '{out}'") and "[Errno" not in line
        assert f"'{blocker}'" in line or out == blocker
        assert "a file, not a folder" in line


def test_deeply_nested_toml_names_the_file(tmp_path, capsys):
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 50000 + "]" * 50000 + "\n")
    assert cli.main(["train", "--config_file", str(deep)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: config_file: '{deep}' is nested too deeply")
    assert _script().main(["--config_file", str(deep)]) == 2
    assert f"'{deep}' is nested too deeply" in one_error_line(capsys.readouterr().err)


def test_deeply_nested_dataset_toml_and_metadata_json_name_the_file(tiny, tmp_path, capsys):
    deep = tmp_path / "dataset.toml"
    deep.write_text("a = " + "[" * 50000 + "]" * 50000 + "\n")
    base = ["train", "--config_file", str(tiny["toml"]), "--output_dir", str(tmp_path / "out")]
    assert cli.main([*base, "--dataset_config", str(deep)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: dataset_config: {deep} is nested too deeply to be read (a broken or hostile TOML; dataset.toml "
        "files are a few tables deep)")
    meta = tmp_path / "meta.json"
    meta.write_text("[" * 50000 + "]" * 50000)
    deep.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tiny['images']}'\n"
                    f"metadata_file = '{meta}'\n")
    assert cli.main([*base, "--dataset_config", str(deep)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(meta) in line and "nested too deeply to be read" in line, line


@pytest.mark.parametrize("args, message", [
    (["--width", "0"], "width and height must be positive multiples of 16 (8 for the VAE × 2 for the DiT patch), "
                       "got 0x1024"),
    (["--height", "-16"], "got 1024x-16"),
    (["--width", "24"], "got 24x1024"),
    (["--width", "8192", "--height", "8192"], "width and height must be at most 4096 px"),
    (["--cfg", "nan"], "--cfg must be a finite number (1 = no guidance, 4 is usual), got nan"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--shift", "0"], "--shift must be a finite number > 0"),
    (["--network", "a.safetensors", "--network_mul", "nan"], "network a.safetensors: strength must be a finite"),
])
def test_sample_refuses_impossible_settings_before_loading(args, message, tmp_path, capsys):
    rc = cli.main(["sample", "--dit", "no_dit.safetensors", "--qwen3", "q", "--vae", "v", "--prompt", "x",
                   "--out", str(tmp_path / "o.png"), *args])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "o.png").exists()


def test_sample_params_validate_directly():
    SampleParams(prompt="x", width=64, height=64, cfg=1.0).validate()
    for bad in (dict(width=0), dict(height=0), dict(cfg=math.nan), dict(shift=math.inf), dict(steps=0)):
        with pytest.raises(ValueError):
            SampleParams(prompt="x", **{"width": 64, "height": 64, **bad}).validate()


@pytest.fixture(scope="module")
def matrix_alpha_lora(tiny) -> tuple[Path, str]:
    """A LoRA for the tiny DiT whose first `.alpha` is a 4×4 matrix."""
    from anima_trainer.models import load_dit
    from anima_trainer.networks import create_network

    path = tiny["root"] / "matrix_alpha.safetensors"
    net = create_network(load_dit(tiny["models"]["dit"], dtype=torch.float32), "lora", dim=4, alpha=4)
    net.save(path)
    sd = load_file(path)
    key = sorted(k for k in sd if k.endswith(".alpha"))[0]
    sd[key] = torch.ones(4, 4)
    save_file(sd, path)
    return path, key


def test_alpha_matrix_is_one_line_naming_file_and_key(tiny, matrix_alpha_lora, tmp_path, capsys):
    path, key = matrix_alpha_lora
    m = tiny["models"]
    expected = f"{key}: alpha must be one number, but it is a tensor of shape [4, 4]"
    runs = {
        "inspect": ["inspect", str(path)],
        "merge": ["merge", "--dit", str(m["dit"]), "--network", str(path), "--out", str(tmp_path / "m.safetensors")],
        "sample": ["sample", "--dit", str(m["dit"]), "--qwen3", str(m["qwen3"]), "--vae", str(m["vae"]),
                   "--qwen3_tokenizer_path", str(m["tokenizers"] / "qwen"),
                   "--t5_tokenizer_path", str(m["tokenizers"] / "t5"),
                   "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1", "--network", str(path),
                   "--out", str(tmp_path / "s.png")],
        "train": ["train", "--config_file", str(tiny["toml"]), "--network_weights", str(path), "--network_dim", "4",
                  "--network_alpha", "4", "--output_dir", str(tmp_path / "t")],
        "dim_from_weights": ["train", "--config_file", str(tiny["toml"]), "--network_weights", str(path),
                             "--dim_from_weights", "--output_dir", str(tmp_path / "d")],
    }
    for name, argv in runs.items():
        assert cli.main(argv) == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert str(path.name) in line and expected.split(": ", 1)[1] in line, (name, line)
        assert key.removeprefix("diffusion_model.") in line, (name, line)
    assert not list(tmp_path.rglob("*.safetensors")) and not (tmp_path / "s.png").exists()


def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from anima_trainer.compat import reference

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(reference, "render_reference", boom)
    assert cli.main(["config-reference"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: unexpected RuntimeError: boom") and "--debug" in line
    assert cli.main(["config-reference", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: unexpected RuntimeError: boom")
    assert cli.main(["--log_level", "DEBUG", "config-reference"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_user_error_with_debug_shows_the_traceback_too(tmp_path, capsys):
    assert cli.main(["--debug", "train", *FAKE_MODELS, "--output_dir", str(tmp_path), "--learning_rate", "1e39"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: learning_rate: must be <=")


def test_os_errors_lose_errno_and_say_what_to_do():
    full = OSError(28, "No space left on device", "/data/out/x.safetensors")
    assert console.describe_error(full) == ("No space left on device: '/data/out/x.safetensors' (the disk is full: "
                                            "free space there, or point output_dir / the cache at another disk)")
    assert "[Errno" not in console.describe_error(FileExistsError(17, "File exists", "out"))
    from anima_trainer.fileio import SaveError

    saved = SaveError("/data/out/x.safetensors", OSError(28, "No space left on device"))
    assert console.describe_error(saved) == ("could not write /data/out/x.safetensors: No space left on device (the "
                                             "disk is full: free space there, or point output_dir / the cache at "
                                             "another disk)")
    assert console.describe_error(RecursionError("maximum recursion depth exceeded")).startswith(
        "an input is nested too deeply to be read")


def test_ctrl_c_at_start_up_and_in_cache_is_one_line(monkeypatch, tmp_path, capsys):
    import anima_trainer.config as config_pkg
    import anima_trainer.train.setup as setup_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(setup_module, "ensure_tokenizers", interrupt)  # the first step of setup_run (issue 16)
    assert cli.main(["cache", *FAKE_MODELS, "--output_dir", str(tmp_path)]) == 130
    assert one_error_line(capsys.readouterr().err).startswith("interrupted: stopped;")
    monkeypatch.setattr(config_pkg, "parse_train_args", interrupt)
    assert cli.main(["train", "--config_file", "x.toml"]) == 130
    assert one_error_line(capsys.readouterr().err).startswith("interrupted")


def test_second_ctrl_c_in_the_loop_is_one_line(tiny, monkeypatch, tmp_path, capsys):
    def second_signal(*args, **kwargs):
        raise KeyboardInterrupt("second SIGINT: stopping immediately")

    monkeypatch.setattr(loop, "training_step", second_signal)
    assert cli.main(["train", "--config_file", str(tiny["toml"]), "--output_dir", str(tmp_path)]) == 130
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("interrupted (second SIGINT: stopping immediately): stopped;")


def test_image_removed_mid_run_names_it_with_workers(tiny, tmp_path, monkeypatch, capsys):
    """Documented choice (docs/troubleshooting.md): the run stops with one line naming the file; states saved
    before it resume once the file is back."""
    import shutil

    images = shutil.copytree(tiny["images"], tmp_path / "images")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text((tiny["root"] / "dataset.toml").read_text().replace(
        str(tiny["images"]), str(images)).replace("batch_size = 4", "batch_size = 1"))
    victim = images / "shape_02.png"
    real_step = loop.training_step

    def step_then_delete(*args, **kwargs):
        victim.unlink(missing_ok=True)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", step_then_delete)
    rc = cli.main(["train", "--config_file", str(tiny["toml"]), "--dataset_config", str(dataset),
                   "--output_dir", str(tmp_path / "out"), "--max_data_loader_n_workers", "2",
                   "--train_batch_size", "1", "--max_train_steps", "40"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    assert f"image {victim} was removed or became unreadable during the run (FileNotFoundError" in line
    assert "damage" not in line and "DataLoader worker" not in line
    assert not (tmp_path / "out" / "demo_lora.safetensors").exists()


# --- signals: SIGTERM sent to this process while cli.main runs (handlers live in the main thread) -----------

def _sigterm_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this
    raise AssertionError("SIGTERM did not interrupt")


def test_sigterm_at_start_up_is_the_ctrl_c_path(monkeypatch, tmp_path, capsys):
    import anima_trainer.train.setup as setup_module

    monkeypatch.setattr(setup_module, "ensure_tokenizers", _sigterm_self)  # the first step of setup_run (issue 16)
    previous = signal.getsignal(signal.SIGTERM)
    assert cli.main(["cache", *FAKE_MODELS, "--output_dir", str(tmp_path)]) == 130
    assert one_error_line(capsys.readouterr().err).startswith("interrupted (SIGTERM): stopped;")
    assert signal.getsignal(signal.SIGTERM) == previous  # restored


def test_sigterm_to_demo_in_the_loop_saves_and_stops(monkeypatch, tmp_path, capsys):
    real_step = loop.training_step
    sent = []

    def step_then_sigterm(*args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # the loop finishes this step, saves, stops
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", step_then_sigterm)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1000"]) == 130
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("stopped: training interrupted at step 1; a state was saved to ")
    assert (tmp_path / "demo" / "output" / "demo_lora-step00000001-state").is_dir()
    assert not (tmp_path / "demo" / "output" / "demo_lora.safetensors").exists()


# --- item 16: the console ------------------------------------------------------------------------------------

def test_log_lines_do_not_land_inside_the_progress_bar(capsys):
    from tqdm import tqdm

    console.setup()
    bar = tqdm(total=10, desc="training", file=sys.stderr, disable=False, mininterval=0)
    bar.update(1)
    logging.getLogger("anima_trainer.test").warning("hello from the loop")
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.replace("\r", "\n").split("\n")
    assert "WARNING anima_trainer.test: hello from the loop" in [line.strip() for line in lines]


def test_library_request_lines_hidden_unless_debug():
    console.setup()
    for name in ("httpx", "urllib3", "huggingface_hub"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
    console.setup("DEBUG")
    assert logging.getLogger("httpx").isEnabledFor(logging.INFO)
    with pytest.raises(ValueError, match="log level: expected one of DEBUG, INFO"):
        console.parse_level("loud")


def test_tqdm_disable_and_console_log_level_in_training(tiny, tmp_path, monkeypatch, capsys):
    base = ["train", "--config_file", str(tiny["toml"]), "--max_train_steps", "1", "--log_with", "none"]
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert cli.main([*base, "--output_dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "training:" in err and "INFO anima_trainer" in err  # the bar and INFO lines by default
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert cli.main([*base, "--output_dir", str(tmp_path / "b"), "--console_log_level", "warning"]) == 0
    err = capsys.readouterr().err
    assert "training:" not in err and "INFO" not in err, err
    assert (tmp_path / "b" / "demo_lora.safetensors").is_file()


def test_log_level_option_and_environment(monkeypatch, capsys):
    monkeypatch.setenv(console.LEVEL_ENV, "ERROR")
    assert console.setup() == logging.ERROR
    assert cli.main(["--log_level", "warning", "config-reference"]) == 0
    assert logging.getLogger().level == logging.WARNING
    assert cli.main(["--log_level", "loud", "config-reference"]) == 2
    assert "log level: expected one of" in one_error_line(capsys.readouterr().err)


def test_every_new_nonfinite_episode_is_shown(caplog):
    """Repeats are rate-limited; a NaN after finite steps is a new alert, shown even inside the window."""
    mon = Monitor(nonfinite_policy="skip_step", warn_every_n_steps=100, max_consecutive_nonfinite=100)
    nan_steps = {3, 4, 5, 10, 60}
    with caplog.at_level(logging.WARNING):
        for step in range(1, 70):
            mon.add_micro_batch(torch.tensor(math.nan if step in nan_steps else 1.0), 1)
            mon.check_update(step)
            mon.end_step(step, 1)
    warned = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert [m.split(":")[1].strip() for m in warned] == ["step 3", "step 10", "step 60"]
    assert mon.alerts["nonfinite_loss"].count == 5


def test_tqdm_disable_turns_the_sampling_bar_off(monkeypatch, capsys):
    from anima_trainer.sample.sampler import sample_euler, simple_schedule

    def velocity(x, sigma):
        return torch.zeros_like(x)

    noise = torch.ones(1, 4)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    sample_euler(velocity, noise, simple_schedule(3, 3.0), progress=True)
    assert "sampling" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = sample_euler(velocity, noise, simple_schedule(3, 3.0), progress=True)
    assert "sampling" not in capsys.readouterr().err and torch.equal(out, noise)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (always-full device)")
def test_a_full_disk_in_the_event_log_names_the_log():
    """Item 15: "[Errno 28]" alone named no file; the event log's own writes say which file and why."""
    from anima_trainer.fileio import SaveError
    from anima_trainer.train.events import EventLog

    log = EventLog("/dev/full")
    with pytest.raises(SaveError) as e:
        log.write("start", step=0)
    log.close()
    assert str(e.value) == "could not write the event log /dev/full: No space left on device"


def test_tqdm_disable_turns_the_cache_and_download_bars_off(tmp_path, monkeypatch, capsys):
    """Item 16: every bar honours TQDM_DISABLE, not only the training and sampling bars."""
    from anima_trainer.cache import cache_latents, model_fingerprint
    from anima_trainer.data import build_dataset, load_dataset_config
    from anima_trainer.tools.download.transfer import _bar
    from anima_trainer.models.vae import load_vae

    models = write_demo_models(tmp_path / "models")
    write_shapes_dataset(tmp_path / "data", count=2)
    write_demo_configs(tmp_path / "cfg", models, tmp_path / "data", steps=1, seed=0)

    def cache(folder: str) -> None:
        dataset = build_dataset(load_dataset_config(tmp_path / "cfg" / "dataset.toml"), default_batch_size=1)
        vae = load_vae(models["vae"], dtype=torch.float32)
        cache_latents(dataset, vae, vae_fingerprint=model_fingerprint(models["vae"]), dtype=torch.float32,
                      to_disk=False, batch_size=1, progress=True)

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cache("a")
    assert "caching latents" in capsys.readouterr().err
    assert _bar(10, "downloading x", True).disable is False
    monkeypatch.setenv("TQDM_DISABLE", "1")
    cache("b")
    assert "caching latents" not in capsys.readouterr().err
    assert _bar(10, "downloading x", True).disable is True
