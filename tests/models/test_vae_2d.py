"""The 2-D VAE path (kohya's --qwen_image_vae_2d) equals diffusers' 3-D model on single images, and
--vae_chunk_size (row-chunked convolutions) changes nothing but the workspace.

Tolerances (fp32, CPU): the 2-D convs sum the same products as the 3-D convs minus the two zero frames,
in another order; observed max differences ~2e-7 (tiny) and ~1e-6 (full size) relative to max|ref|.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anima_trainer.demo import write_tiny_vae
from anima_trainer.models import load_vae
from anima_trainer.models import vae as vae_module
from anima_trainer.models.vae import VAE2D, _conv2d_from_causal

REL_TOL = 1e-5  # max |2-D − 3-D| / max |3-D|


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= REL_TOL * ref.abs().max().item(), f"max abs err {err:.3g}, max|ref| {ref.abs().max():.3g}"


@pytest.fixture(scope="module")
def tiny_vae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae2d") / "tiny_vae.safetensors", seed=3)


def test_causal_conv_on_one_frame_is_the_last_kernel_slice() -> None:
    """The derivation: with 2 zero frames padded before a single frame, only weight[:, :, -1] meets data."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    torch.manual_seed(0)
    conv3d = QwenImageCausalConv3d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 1, 7, 5)
    expected = F.conv2d(x[:, :, 0], conv3d.weight[:, :, 2], conv3d.bias, padding=1)  # by hand
    torch.testing.assert_close(conv3d(x)[:, :, 0], expected)
    torch.testing.assert_close(_conv2d_from_causal(conv3d)(x[:, :, 0]), expected)


@pytest.mark.parametrize("size", [(64, 48), (40, 72)])
def test_tiny_vae_2d_equals_3d(tiny_vae_file: Path, size: tuple[int, int]) -> None:
    vae3d = load_vae(tiny_vae_file, dtype=torch.float32, two_d=False)
    vae2d = load_vae(tiny_vae_file, dtype=torch.float32)  # the default users get
    assert vae3d.model2d is None and isinstance(vae2d.model2d, VAE2D)
    images = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1))
    z3 = vae3d.encode(images)
    _close(vae2d.encode(images), z3)
    _close(vae2d.decode_raw(z3), vae3d.decode_raw(z3))
    _close(vae2d.decode(z3), vae3d.decode(z3))


def test_full_size_vae_2d_equals_3d(vae_path: Path) -> None:
    """The realistic-size (base_dim 96) random-init VAE, fp32, one 32x40 image."""
    vae3d = load_vae(vae_path, dtype=torch.float32, two_d=False)
    vae2d = VAE2D(vae3d.model)
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean3 = vae3d.model.encode(x.unsqueeze(2)).latent_dist.mean[:, :, 0]
        _close(vae2d.encode_mean(x), mean3)
        _close(vae2d.decode(mean3), vae3d.model.decode(mean3.unsqueeze(2)).sample[:, :, 0])


def test_vae_chunk_size_is_exact_and_chunks(tiny_vae_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked rows give the same latents and pixels; the 3x3 convs really run in chunks of <= N rows."""
    whole = load_vae(tiny_vae_file, dtype=torch.float32)
    chunked = load_vae(tiny_vae_file, dtype=torch.float32, chunk_rows=4)
    images = torch.rand(2, 3, 64, 40, generator=torch.Generator().manual_seed(4))
    z = whole.encode(images)
    rows: list[int] = []
    real_conv2d = F.conv2d

    def spy(x, w, *args, **kwargs):
        if w.shape[-1] == 3:
            rows.append((x.shape[2] - 3) // (args[1][0] if len(args) > 1 else 1) + 1)
        return real_conv2d(x, w, *args, **kwargs)

    monkeypatch.setattr(vae_module.F, "conv2d", spy)
    torch.testing.assert_close(chunked.encode(images), z, rtol=0, atol=1e-6)
    assert rows and max(rows) <= 4 and len(rows) > 2 * 20  # 64-row inputs: many chunks per conv
    monkeypatch.undo()
    torch.testing.assert_close(chunked.decode(z), whole.decode(z), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="vae_chunk_size must be >= 1, got 0"):
        load_vae(tiny_vae_file, dtype=torch.float32, chunk_rows=0)
