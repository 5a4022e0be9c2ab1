"""A fine-tune sharded with FSDP2 through the real run (`accelerate launch -m anima_trainer train`, 2 gloo
processes on the CPU, the tiny models, fp32, mixed_precision "no"): it equals one process on the same global
batch, a run cut after a state and resumed equals the uninterrupted one, and the launch checks accept an FSDP
launch for a fine-tune only.

Global batch: 2 processes × batch 1 × 2 accumulated micro-batches (FSDP's `micro_batch`: the reduce-scatter on
the last one) against 1 process × batch 1 × 4 accumulated micro-batches: the same 4 samples per step (4 images,
one step per epoch), per-sample noise seeds.  One sharded launch serves both comparisons (starting processes
is the slow part)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.models import load_dit
from anima_trainer.train import training_state as states
from anima_trainer.train.loop import run_training
from anima_trainer.train.sharded_run import FULL_BF16_SHARDED_NOTICE, check_launch, check_shardable
from tests.train.test_distributed import ROOT, launch_command

STEPS = 4
COMMON = ("--learning_rate", "1e-3", "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
          "--save_every_n_steps", "2", "--save_state", "--log_with", "none", "--max_grad_norm", "0.05")


def _toml(setup: dict, out: Path) -> Path:
    """The demo's train.toml as a fine-tune with a user's defaults (no overwrite = true), batch 1."""
    toml = write_demo_configs(out, setup["models"], setup["images"], STEPS, seed=5,
                              training_extra='training_mode = "finetune"\n')
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1)
    toml.write_text(toml.read_text().replace("overwrite = true\n", ""))
    return toml


def _launch(toml: Path, *extra: str, fsdp: bool = False, dropin: bool = False) -> subprocess.CompletedProcess:
    """2 processes of `-m anima_trainer train`, or of kohya's drop-in `anima_train.py` (`dropin`)."""
    target = [str(ROOT / "anima_train.py")] if dropin else ["-m", "anima_trainer", "train"]
    argv, env = launch_command(2, [*target, "--config_file", str(toml), *COMMON, *extra])
    if fsdp:  # accelerate launch --use_fsdp instead of --multi_gpu (accelerate's plugin refuses its default
        # sync_module_states on the CPU while the Accelerator is built; on GPUs the flag is not needed)
        at = argv.index("--multi_gpu")
        argv[at:at + 1] = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_sync_module_states", "false"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sharded(setup, tmp_path_factory) -> dict:
    """The uninterrupted sharded run (launched with --use_fsdp), then the same folder cut back to its step-2
    state (the final file and state removed, and the step-2 file: killed between that state and its file) and
    resumed with --resume latest through kohya's drop-in `anima_train.py` (launched with --multi_gpu)."""
    out = tmp_path_factory.mktemp("fsdp_run")
    toml = _toml(setup, out)
    done = _launch(toml, "--gradient_accumulation_steps", "2", fsdp=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[:6000]
    output = out / "output"
    files = sorted(p.name for p in output.iterdir() if not p.name.endswith((".jsonl", ".txt", ".lock")))
    final = load_file(output / "demo_lora.safetensors")
    state_files = sorted(p.relative_to(output / "demo_lora-step00000002-state").as_posix()
                         for p in (output / "demo_lora-step00000002-state").rglob("*") if p.is_file())
    for name in ("demo_lora.safetensors", "demo_lora-step00000002.safetensors"):
        (output / name).unlink()
    import shutil
    shutil.rmtree(output / "demo_lora-state")
    resumed = _launch(toml, "--gradient_accumulation_steps", "2", "--resume", "latest", dropin=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-4000:]
    return {"out": out, "files": files, "final": final, "state_files": state_files, "log": done.stderr,
            "resumed": load_file(output / "demo_lora.safetensors"),
            "resumed_step2": (output / "demo_lora-step00000002.safetensors").is_file(), "resumed_log": resumed.stderr}


def test_sharded_finetune_equals_one_process_on_the_global_batch(setup, sharded, tmp_path):
    single = run_training(parse_train_args(["--config_file", str(_toml(setup, tmp_path)),
                                            "--gradient_accumulation_steps", "4", *COMMON]))
    reference = load_file(single.final_path)
    got = sharded["final"]
    assert got.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-4, atol=1e-7)
    base = load_dit(setup["models"]["dit"], dtype=torch.float32).state_dict()
    moved = [k for k in reference if k.startswith("net.blocks.")
             and not torch.equal(reference[k], base[k.removeprefix("net.")])]
    assert moved  # it trained
    assert "sharded with FSDP2 over 2 processes: 3 units (2 blocks + the root)" in sharded["log"]
    assert sharded["log"].count("accelerate's FSDP plugin settings") == 1  # one notice, from the main process


def test_sharded_state_holds_the_shards_and_the_final_file_is_written_once(sharded):
    assert sharded["files"] == ["demo_lora-state", "demo_lora-step00000002-state", "demo_lora-step00000002.safetensors",
                                "demo_lora.safetensors"], sharded["files"]
    held = sharded["state_files"]
    assert {"fsdp/.metadata", "fsdp/__0_0.distcp", "fsdp/__1_0.distcp", "rng_rank0.json", "rng_rank1.json",
            states.TRAIN_STATE}.issubset(held), held
    assert "network.safetensors" not in held and "optimizer.json" not in held
    state = sharded["out"] / "output" / "demo_lora-step00000002-state"
    assert states.verify_state(state).step == 2  # the shards are in the manifest and check out
    assert not list((sharded["out"] / "output").glob(".*shards"))  # no staging folder left behind


def test_resumed_sharded_run_equals_the_uninterrupted_one_bitwise(sharded):
    ref, got = sharded["final"], sharded["resumed"]
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert sharded["resumed_step2"]  # the file the cut run missed after its state, gathered and written again
    assert "resuming from" in sharded["resumed_log"]


def test_a_damaged_shard_is_refused_at_resume(sharded, tmp_path):
    import shutil
    state = tmp_path / "demo_lora-step00000002-state"
    shutil.copytree(sharded["out"] / "output" / state.name, state)
    with open(state / "fsdp" / "__1_0.distcp", "r+b") as f:
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ConfigError, match=r"fsdp/__1_0\.distcp.*checksum"):
        states.verify_state(state)
    with pytest.raises(ConfigError, match="sharded with FSDP"):  # loaded unsharded: said so, before anything
        states.check_sharding(state, sharded=False)


def _accelerator(kind: str, processes: int = 2):
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes,
                           is_main_process=True)


def test_an_fsdp_launch_is_accepted_for_a_finetune_and_refused_for_lora(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    lora = parse_train_args(["--config_file", str(write_demo_configs(tmp_path / "lora", setup["models"],
                                                                        setup["images"], 2, seed=5))])
    with pytest.raises(ConfigError, match=r"not supported for adapter training.*--multi_gpu"):
        check_launch(lora, _accelerator("FSDP"))
    finetune = parse_train_args(["--config_file", str(_toml(setup, tmp_path / "ft"))])
    assert check_launch(finetune, _accelerator("FSDP")).compile_blocks is False  # "auto" runs eager sharded
    assert check_launch(finetune, _accelerator("MULTI_CPU")).compile_blocks is False
    off = parse_train_args(["--config_file", str(_toml(setup, tmp_path / "off")), "--fsdp_sharding", "off"])
    assert check_launch(off, _accelerator("MULTI_CPU")).compile_blocks == "auto"  # data parallel: untouched
    with pytest.raises(ConfigError, match=r"fsdp_sharding = \"off\".*--multi_gpu"):
        check_launch(off, _accelerator("FSDP"))
    with pytest.raises(ConfigError, match="DeepSpeed"):
        check_launch(finetune, _accelerator("DEEPSPEED"))


@pytest.mark.parametrize(("extra", "option"), [
    (("--full_fp16", "--mixed_precision", "fp16"), "full_fp16"),
    (("--mixed_precision", "fp16"), "mixed_precision"),
    (("--compile_blocks", "true"), "compile_blocks"),
    (("--eval_every_n_steps", "2"), "eval_every_n_steps"),
])
def test_what_fsdp_cannot_do_is_refused_naming_the_option(setup, tmp_path, extra, option):
    cfg = parse_train_args(["--config_file", str(_toml(setup, tmp_path)), *extra])
    with pytest.raises(ConfigError, match=rf"^{option}\b.*fsdp_sharding = \"off\""):
        check_shardable(cfg)


def test_a_refused_option_set_in_the_toml_is_named_with_its_file_and_line(setup, tmp_path):
    toml = _toml(setup, tmp_path)
    refused = 'training_mode = "finetune"\nmixed_precision = "bf16"\neval_every_n_steps = 2\n'
    toml.write_text(toml.read_text().replace('training_mode = "finetune"\n', refused))
    with pytest.raises(ConfigError, match=r"^eval_every_n_steps: .*\(in train\.toml line \d+\)"):
        check_shardable(parse_train_args(["--config_file", str(toml)]))


def test_fsdp_sharding_is_a_finetune_option(setup, tmp_path):
    with pytest.raises(ConfigError, match="fsdp_sharding: shards a fine-tune"):
        parse_train_args(["--config_file", str(write_demo_configs(tmp_path, setup["models"], setup["images"], 2,
                                                                  seed=5)), "--fsdp_sharding", "off"])


def test_a_state_of_the_other_form_is_refused_and_a_stale_staging_folder_removed(tmp_path):
    unsharded = tmp_path / "demo_lora-step00000002-state"
    unsharded.mkdir()
    with pytest.raises(ConfigError, match=r"was not saved sharded .*fsdp_sharding = \"off\""):
        states.check_sharding(unsharded, sharded=True)
    states.check_sharding(unsharded, sharded=False)
    stale = tmp_path / ".demo_lora-state.tmp-4242-shards"  # a sharded save killed before the main process moved it
    other = tmp_path / ".other-state.tmp-4242-shards"  # another run's: never touched
    for folder in (stale, other):
        (folder / "fsdp").mkdir(parents=True)
        (folder / "fsdp" / "__0_0.distcp").write_bytes(b"x")
    states.remove_stale_temporaries(tmp_path, "demo_lora")
    assert not stale.exists() and other.is_dir() and unsharded.is_dir()


def test_full_bf16_sharded_keeps_fp32_master_shards_with_one_notice(setup, tmp_path, monkeypatch, caplog):
    """kohya's full_bf16 (plain bf16 weights) in a sharded fine-tune: accepted with one notice; the run keeps
    its fp32 master shards (train/sharded_run.py ShardedFinetune.start) instead of casting to bf16."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = parse_train_args(["--config_file", str(_toml(setup, tmp_path)), "--full_bf16", "--mixed_precision", "bf16"])
    with caplog.at_level(logging.WARNING):
        run_cfg = check_launch(cfg, _accelerator("MULTI_CPU"))
    assert cfg.full_bf16 and run_cfg.full_bf16 is False and run_cfg.mixed_precision == "bf16"
    notices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("notice: full_bf16")]
    assert notices == [f"notice: {FULL_BF16_SHARDED_NOTICE}"] and "fp32 master shards" in notices[0]
