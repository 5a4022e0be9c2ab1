"""Issue 14: kohya's qwen_image_vae_2d / vae_chunk_size / vae_disable_cache / torch_compile / dynamo_backend
as TrainConfig fields: what they map onto and the one start-up notice each gets where its effect differs."""

from __future__ import annotations

import pytest

from anima_trainer.config.train import TrainConfig

PATHS = dict(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir="o", dataset_config="ds")


def test_defaults_use_the_2d_vae_and_print_nothing() -> None:
    c = TrainConfig(**PATHS)
    assert (c.qwen_image_vae_2d, c.vae_chunk_size, c.vae_disable_cache, c.masked_loss) == (True, None, False, False)
    assert c.compile_blocks == "auto" and c.vae_compile_notices() == []  # resolved per card at start-up


@pytest.mark.parametrize(("backend", "expected"), [("inductor", "inductor"), ("AOT_EAGER", "aot_eager"),
                                                   ("eager", "eager"), ("tensorrt", "inductor")])
def test_torch_compile_turns_on_compile_blocks(backend: str, expected: str) -> None:
    c = TrainConfig(**PATHS, torch_compile=True, dynamo_backend=backend)
    assert c.compile_blocks and c.compile_backend == expected
    (note,) = c.vae_compile_notices()
    assert note.startswith(f"torch_compile = true: compiled per DiT block (compile_blocks, as kohya's --compile) "
                           f"with backend {expected}")
    assert ("is not available here" in note) == (backend == "tensorrt")


def test_dynamo_backend_no_compiles_nothing_and_alone_has_no_effect() -> None:
    # kohya compiles nothing then; here it does not switch the default off (compile_blocks decides)
    c = TrainConfig(**PATHS, torch_compile=True, dynamo_backend="NO")
    assert c.compile_blocks == "auto"
    assert c.vae_compile_notices() == ["torch_compile = true with dynamo_backend = 'no' compiles nothing in kohya; "
                                       "here compile_blocks = \"auto\" decides (compiled on CUDA cards of compute "
                                       "capability 8.0+ with triton); compile_blocks = false runs eager"]
    c = TrainConfig(**PATHS, torch_compile=True, dynamo_backend="no", compile_blocks=False)
    assert c.compile_blocks is False
    assert c.vae_compile_notices() == ["torch_compile = true with dynamo_backend = 'no' compiles nothing in kohya; "
                                       "here compile_blocks = false decides"]
    c = TrainConfig(**PATHS, dynamo_backend="eager")
    assert c.compile_blocks == "auto"
    assert c.vae_compile_notices() == ["dynamo_backend = 'eager' has no effect without torch_compile (as in kohya)"]
    assert TrainConfig(**PATHS, dynamo_backend="no").vae_compile_notices() == []  # what kohya_ss writes


def test_vae_disable_cache_and_chunk_on_3d_get_one_notice_each() -> None:
    c = TrainConfig(**PATHS, vae_disable_cache=True, vae_chunk_size=64, qwen_image_vae_2d=False)
    notes = c.vae_compile_notices()
    assert len(notes) == 2
    assert notes[0].startswith("vae_disable_cache = true: the VAE's feature cache only carries frames")
    assert notes[1].startswith("vae_chunk_size = 64: chunked convolutions run on the 2-D VAE path")
    assert TrainConfig(**PATHS, vae_chunk_size=64).vae_compile_notices() == []  # honoured on the 2-D path
    with pytest.raises(ValueError, match="vae_chunk_size"):
        TrainConfig(**PATHS, vae_chunk_size=0)


# issue 18: compile_blocks = "auto" is the default; kohya's `false` (its default, written into every config by GUIs
# and by kohya's --output_config) does not switch it off, our compile_blocks = false does
KEPT_AUTO = ("torch_compile/compile = false (kohya's default, which GUIs and kohya's --output_config write into every "
             "config) keeps compile_blocks = \"auto\": the DiT blocks are compiled on CUDA cards of compute "
             "capability 8.0+ with triton and run eager elsewhere; compile_blocks = false runs eager everywhere")


@pytest.mark.parametrize(("toml", "cli", "expected", "notices"), [
    ("torch_compile = false\n", [], "auto", [KEPT_AUTO]),
    ("compile = false\n", [], "auto", [KEPT_AUTO]),
    ("compile = false\ntorch_compile = false\n", [], "auto", [KEPT_AUTO]),  # kohya's --output_config: one notice
    ('compile = "false"\ndynamo_backend = "no"\n', [], "auto", [KEPT_AUTO]),
    ("torch_compile = false\ncompile_blocks = false\n", [], False, []),  # our own name asks for eager
    ("compile = false\ncompile_blocks = true\n", [], True, []),
    ("compile = true\ntorch_compile = false\n", [], True, []),
    ("compile = false\n", ["--compile", "false"], False, []),  # the command line is a request, not a GUI's default
    ("compile = false\n", ["--compile"], True, []),
    ("torch_compile = false\n", ["--compile_blocks", "auto"], "auto", [KEPT_AUTO]),
    ("", ["--compile_blocks"], True, []),
    ("", ["--no-compile_blocks"], False, []),
    ("", [], "auto", []),
])
def test_kohya_compile_false_keeps_auto_with_one_notice(tmp_path, toml, cli, expected, notices) -> None:
    from anima_trainer.config.loader import parse_train_args

    path = tmp_path / "train.toml"
    path.write_text(toml)
    base = [f"--{k}={v}" for k, v in PATHS.items()]
    cfg = parse_train_args([*base, "--config_file", str(path), *cli])
    assert cfg.compile_blocks == expected and type(cfg.compile_blocks) is type(expected)
    assert cfg.vae_compile_notices() == notices
    assert [n for n in cfg.notices if "compile" in n] == []  # said once, by vae_compile_notices at start-up


def test_compile_blocks_words() -> None:
    assert TrainConfig(**PATHS, compile_blocks="Auto").compile_blocks == "auto"
    assert TrainConfig(**PATHS, compile_blocks="yes").compile_blocks is True
    assert TrainConfig(**PATHS, compile_blocks="off").compile_blocks is False
    with pytest.raises(ValueError, match="compile_blocks\n.*expected true, false or 'auto', got 'maybe'"):
        TrainConfig(**PATHS, compile_blocks="maybe")
