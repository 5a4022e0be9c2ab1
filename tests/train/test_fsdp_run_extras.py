"""Previews, the validation loss and the EMA in a fine-tune sharded with FSDP2 (train/sharded_run.py): every
forward of a sharded DiT is a collective, so every process samples and validates together and only the main
process writes; each process keeps the EMA of its own shards.

Through the real run (`accelerate launch -m anima_trainer train`, 2 gloo processes on the CPU, the tiny models,
fp32, ema_decay 0.5): a sharded run with previews (drawn with the EMA weights) and validation trains bit for bit as
the same sharded run without previews; its previews are written once per prompt and tag; its validation loss
equals a single process's at every step, and its `-ema` checkpoint the single process's within rtol 1e-4 (the
same global batch: 2 processes × 2 accumulated micro-batches against 1 × 4, as tests/train/test_fsdp_run.py); the
run cut back to its step-2 state and resumed writes the same final and `-ema` files bitwise.
5 images with validation_split 0.2: 4 train (one step per epoch), 1 held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_shapes_dataset
from anima_trainer.sample import generate
from anima_trainer.sample.prompts import load_sample_prompts
from anima_trainer.train.loop import run_training
from anima_trainer.train.sharded_run import SHARDING_REFUSALS, check_shardable, preview_roles
from tests.train.test_fsdp_run import COMMON, _launch, _toml

PROMPTS = ("a red circle --w 64 --h 64 --s 2 --d 7\n"
           "a blue square --n blurry --l 3 --w 32 --h 48 --s 2 --d 9\n")  # cond + uncond: two contexts per call
VALIDATION = ("--validation_split", "0.2", "--validate_every_n_steps", "2")
EMA = ("--ema_decay", "0.5")
FILES = ("demo_lora.safetensors", "demo_lora-ema.safetensors")


def _events(output: Path, kind: str) -> list[dict]:
    [path] = output.glob("*.jsonl")
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["type"] == kind]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("extras_images"), count=5, seed=3)


@pytest.fixture(scope="module")
def sharded(setup, images, tmp_path_factory) -> dict:
    """Two sharded launches on the same data, both with validation and the EMA: with previews (at the start and
    every 2 steps, from the EMA weights), and without; then the second one cut back to its step-2 state (its
    later files and states removed) and resumed."""
    setup = {**setup, "images": images}
    runs = {}
    for name, extra in (("previews", ("--sample_at_first", "--sample_every_n_steps", "2", "--sample_use_ema")),
                        ("plain", ())):
        out = tmp_path_factory.mktemp(f"fsdp_{name}")
        toml = _toml(setup, out)
        prompts = out / "prompts.txt"
        prompts.write_text(PROMPTS)
        sample = ("--sample_prompts", str(prompts), *extra) if extra else ()
        done = _launch(toml, "--gradient_accumulation_steps", "2", *VALIDATION, *EMA, *sample)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        output = out / "output"
        runs[name] = {"output": output, "log": done.stderr, "toml": toml,
                      **{f: load_file(output / f) for f in FILES}}
    output = runs["plain"]["output"]
    state = output / "demo_lora-step00000002-state"
    runs["state_files"] = sorted(p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file())
    import shutil
    shutil.rmtree(output / "demo_lora-state")
    for name in (*FILES, "demo_lora-step00000002.safetensors", "demo_lora-step00000002-ema.safetensors"):
        (output / name).unlink()  # killed between the step-2 state and its files
    resumed = _launch(runs["plain"]["toml"], "--gradient_accumulation_steps", "2", *VALIDATION, *EMA,
                      "--resume", "latest")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    runs["resumed"] = {f: load_file(output / f) for f in FILES}
    return runs


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_previews_do_not_perturb_a_sharded_run(sharded):
    for name in FILES:  # the EMA swapped in for the previews and put back exactly
        assert _equal(sharded["previews"][name], sharded["plain"][name]), name
    final, ema = sharded["plain"][FILES[0]], sharded["plain"][FILES[1]]
    assert not _equal(final, ema)  # the EMA differs from the weights


def test_a_resumed_sharded_run_with_ema_equals_the_uninterrupted_one_bitwise(sharded):
    held = sharded["state_files"]
    assert {"ema.json", "fsdp/.metadata", "fsdp/__0_0.distcp", "fsdp/__1_0.distcp"}.issubset(held), held
    assert "ema.safetensors" not in held  # the shadows are sharded, in the DCP checkpoint
    for name in FILES:
        assert _equal(sharded["resumed"][name], sharded["plain"][name]), name


def test_a_sharded_run_writes_each_preview_once(sharded):
    output = sharded["previews"]["output"]
    written = sorted(p.name for p in (output / "sample").iterdir())
    assert written == [f"demo_lora_{tag}_{i:02d}_{seed}.png" for tag in ("000000", "000002", "000004")
                       for i, seed in ((0, 7), (1, 9))], written
    samples = _events(output, "sample")  # the main process's events only, one per preview round
    assert [(e["step"], e["status"], len(e["files"])) for e in samples] == [(0, "written", 2), (2, "written", 2),
                                                                             (4, "written", 2)]
    assert not (sharded["plain"]["output"] / "sample").exists()


def test_sharded_validation_and_ema_equal_one_process(setup, images, sharded, tmp_path):
    toml = _toml({**setup, "images": images}, tmp_path)
    run_training(parse_train_args(["--config_file", str(toml), "--gradient_accumulation_steps", "4", *COMMON,
                                   *VALIDATION, *EMA]))
    reference = load_file(tmp_path / "output" / FILES[1])
    got = sharded["plain"][FILES[1]]
    assert got.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-4, atol=1e-7)
    single = {e["step"]: e for e in _events(tmp_path / "output", "validation")}
    for name in ("previews", "plain"):
        got = {e["step"]: e for e in _events(sharded[name]["output"], "validation")}
        assert sorted(got) == sorted(single) == [1, 2, 3, 4]  # every epoch's end (one step each) and step 2, 4
        for step, reference in single.items():
            for key in (k for k in reference if k.startswith("val/loss")):
                assert got[step][key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), (name, step, key)
    assert "validation: 1 held-out image(s)" in sharded["plain"]["log"]


# --------------------------------------------------------------------------------------- the pieces --

class _Stop:
    requested: str | None = None


class _Dist:
    """A stand-in `Distributed`: `any_true` records its calls and answers as if another process were stopping."""

    def __init__(self, is_main: bool, others_stop: bool = False) -> None:
        self.is_main, self.others_stop, self.asked = is_main, others_stop, []

    def any_true(self, flag: bool) -> bool:
        self.asked.append(flag)
        return flag or self.others_stop


def test_preview_roles_unsharded_and_sharded():
    stop = _Stop()
    renders, writes, cancel = preview_roles(_Dist(is_main=False), None, stop)
    assert (renders, writes) == (False, True)  # unsharded: only the main process renders (and writes)
    renders, writes, cancel = preview_roles(_Dist(is_main=True), None, stop)
    assert (renders, writes, cancel()) == (True, True, False)
    stop.requested = "SIGINT"
    assert cancel() is True
    assert preview_roles(_Dist(is_main=True), object(), None)[2] is None  # no stop signals: never cancelled
    other = _Dist(is_main=False, others_stop=True)
    renders, writes, cancel = preview_roles(other, object(), _Stop())
    assert (renders, writes) == (True, False)  # sharded: every process samples, the main one alone writes
    assert cancel() is True and other.asked == [False]  # another process's stop cancels this one too, together


def test_render_previews_without_writing_makes_the_same_dit_calls(setup, tmp_path):
    from anima_trainer.models.base_models import load_base_models

    m = setup["models"]
    base = load_base_models(m["dit"], m["qwen3"], m["vae"], device=torch.device("cpu"), dtype=torch.float32,
                            qwen3_tokenizer_path=m["tokenizers"] / "qwen", t5_tokenizer_path=m["tokenizers"] / "t5")
    dit, te, vae = base.dit, base.text_encoder, base.vae
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(PROMPTS)
    prompts = load_sample_prompts(prompts_file)
    calls: list[tuple] = []
    dit.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    decodes = []
    real_decode = vae.decode
    vae.decode = lambda z: decodes.append(z.shape) or real_decode(z)
    written = generate.render_previews(dit, te, vae, prompts, tmp_path / "a", "000001", "x")
    writing = list(calls)
    assert [p.name for p in written] == ["x_000001_00_7.png", "x_000001_01_9.png"] and len(decodes) == 2
    calls.clear()
    assert generate.render_previews(dit, te, vae, prompts, tmp_path / "b", "000001", "x", writes=False) == []
    assert calls == writing and len(writing) == 4  # 2 sampler steps × 2 prompts: the same DiT calls, in order
    assert len(decodes) == 2 and not (tmp_path / "b").exists()  # nothing decoded or written


def test_previews_and_validation_are_no_longer_refused_sharded(setup, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    cfg = parse_train_args(["--config_file", str(_toml(setup, tmp_path)), "--sample_prompts", str(prompts),
                            "--sample_every_n_steps", "2", *VALIDATION])
    check_shardable(cfg)  # accepted: nothing raised
    check_shardable(parse_train_args(["--config_file", str(_toml(setup, tmp_path / "ema")), *EMA]))
    assert not {"sample_prompts", "validation_split", "ema_decay"} & set(SHARDING_REFUSALS)
