"""Latent cache building with images decoded in worker processes (max_data_loader_n_workers): the same entries, the
same files on disk and the same per-batch encodes as in one process, and no worker left behind when it fails."""

from __future__ import annotations

import multiprocessing
import shutil

import pytest
import torch
from PIL import Image

from anima_trainer.cache import cache_latents, model_fingerprint
from anima_trainer.cache.store import CACHE_FOLDER
from anima_trainer.data import build_dataset
from anima_trainer.data.images import ImageReadError
from anima_trainer.demo import write_demo_dataset_toml, write_shapes_dataset, write_tiny_vae
from anima_trainer.data import load_dataset_config
from anima_trainer.models import load_vae


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae.safetensors", seed=3)


def _images(folder):
    """7 images in two buckets (5 square, 2 wide), one with transparency (alpha_mask: a mask entry)."""
    images = write_shapes_dataset(folder, count=7, seed=5)
    for name in ("shape_05.png", "shape_06.png"):
        if not (images / name).exists():
            raise AssertionError(f"write_shapes_dataset no longer names its files shape_NN.png: {name}")
        Image.open(images / name).resize((96, 48)).save(images / name)
    rgba = Image.open(images / "shape_01.png").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(images / "shape_01.png")
    return images


def _dataset(folder, images):
    toml = write_demo_dataset_toml(folder / "dataset.toml", images, batch_size=2, extra="flip_aug = true\n")
    toml.write_text(toml.read_text() + "  alpha_mask = true\n")  # a subset option: the last subset's
    return build_dataset(load_dataset_config(toml), default_batch_size=2)


def _build(ds, vae_path, workers, **kw):
    vae = kw.pop("vae", None) or load_vae(vae_path, dtype=torch.float32)
    return cache_latents(ds, vae, vae_fingerprint=model_fingerprint(vae_path), dtype=torch.float32, to_disk=True,
                         batch_size=kw.pop("batch_size", 3), progress=False, workers=workers, **kw)


def _files(images):
    return {p.name: p.read_bytes() for p in sorted((images / CACHE_FOLDER).glob("*.safetensors"))}


def test_workers_build_the_same_cache_as_one_process(tmp_path, vae_path):
    images = _images(tmp_path / "a")
    shutil.copytree(images, tmp_path / "b")
    in_process, s0 = _build(_dataset(tmp_path / "a", images), vae_path, workers=0)
    in_workers, s2 = _build(_dataset(tmp_path / "b", tmp_path / "b"), vae_path, workers=2)
    assert (s0.built, s0.reused) == (s2.built, s2.reused) == (14, 0)  # 7 images, both orientations
    assert set(in_process) == set(in_workers) == {(i, f) for i in range(7) for f in (False, True)}
    for key, entry in in_process.items():
        assert set(entry) == set(in_workers[key])
        for name, tensor in entry.items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, in_workers[key][name]), (key, name)
    assert sum("mask" in e for e in in_process.values()) == 14  # alpha_mask: every item of the subset has one
    files = _files(images)
    assert len(files) == 14 and files == _files(tmp_path / "b")  # same names, same bytes
    # each entry is exactly the VAE's encode of its batch (one bucket, one orientation, vae_batch_size images)
    # as the one-process build always made it
    ds, vae = _dataset(tmp_path / "a", images), load_vae(vae_path, dtype=torch.float32)
    square = [i for i, item in enumerate(ds.items) if item.bucket == ds.items[0].bucket]
    chunk = square[:3]
    direct = vae.encode(ds.load_batch(chunk, flips=[True] * 3).images)
    for row, index in enumerate(chunk):
        assert torch.equal(in_workers[(index, True)]["latent"], direct[row])
    # the second pass reuses every entry, whatever the worker count
    _, again = _build(_dataset(tmp_path / "b", tmp_path / "b"), vae_path, workers=0)
    assert (again.built, again.reused, again.invalid) == (0, 14, 0)


def test_workers_build_only_the_owned_share(tmp_path, vae_path):
    images = _images(tmp_path)
    ds = _dataset(tmp_path, images)
    mine, summary = _build(ds, vae_path, workers=2, owned=lambda i: i % 2 == 0)
    assert set(mine) == {(i, f) for i in (0, 2, 4, 6) for f in (False, True)} and summary.built == 8
    everything, rest = _build(ds, vae_path, workers=2)
    assert (rest.built, rest.reused) == (6, 8)
    assert all(torch.equal(mine[k]["latent"], everything[k]["latent"]) for k in mine)


class _FailingVAE:
    """The VAE, raising `error` on its `fail_at`-th encode (a CUDA error, Ctrl-C)."""

    def __init__(self, vae, error: BaseException, fail_at: int) -> None:
        self.vae, self.error, self.fail_at, self.calls = vae, error, fail_at, 0
        self.device = vae.device

    def encode(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.vae.encode(images)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: out of memory"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_a_failed_build_stops_its_workers_and_keeps_the_finished_entries(tmp_path, vae_path, error):
    images = _images(tmp_path)
    ds = _dataset(tmp_path, images)
    before = set(multiprocessing.active_children())
    vae = _FailingVAE(load_vae(vae_path, dtype=torch.float32), error, fail_at=2)
    with pytest.raises(type(error)):
        _build(ds, vae_path, workers=2, vae=vae)
    assert set(multiprocessing.active_children()) == before  # the two workers are gone, not left to linger
    assert len(_files(images)) == 3  # the first batch (3 images) was stored before the failure: a rerun reuses it
    _, rerun = _build(ds, vae_path, workers=2)
    assert (rerun.built, rerun.reused) == (11, 3)


def test_an_image_broken_after_the_scan_is_named_in_one_line(tmp_path, vae_path):
    images = _images(tmp_path)
    ds = _dataset(tmp_path, images)
    gone = ds.items[4].path
    gone.write_bytes(b"not a png any more")  # hashed fine, fails to decode in a worker
    before = set(multiprocessing.active_children())
    with pytest.raises(ImageReadError) as info:
        _build(ds, vae_path, workers=2)
    assert str(gone) in str(info.value) and "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert set(multiprocessing.active_children()) == before
