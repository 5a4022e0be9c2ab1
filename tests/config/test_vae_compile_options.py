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
