"""Issue 13 items 7, 8, 17: the one write path (fileio) fsyncs file and folder, takes the mode from the umask, and
a killed writer's temporaries in a cache folder are removed when the cache is next opened."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save

from anima_trainer import fileio, tensor_files
from anima_trainer.cache.store import CACHE_FOLDER, CacheStore, store_for
from anima_trainer.cli import main
from anima_trainer.sample.generate import SampleParams, read_png_parameters, save_png
from tests.support.networks import random_network


def _png(path: Path) -> Path:
    return save_png(Image.new("RGB", (16, 16), "red"), SampleParams(prompt="p", width=16, height=16), path)


def _cache_entry(folder: Path) -> Path:
    return CacheStore(folder).put("key-1", {"latent": torch.randn(16, 1, 2, 2)})


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_final_file_takes_its_mode_from_the_umask(dit, dit_file, tmp_path, umask, mask, mode):
    umask(mask)
    net = random_network(dit)
    try:
        lora = net.save(tmp_path / "lora.safetensors")
    finally:
        net.remove()
    assert main(["merge", "--dit", str(dit_file), "--network", str(lora), "--out",
                 str(tmp_path / "merged.safetensors")]) == 0
    assert main(["convert-network", str(lora), str(tmp_path / "kohya.safetensors"), "--to", "kohya",
                 "--dit", str(dit_file)]) == 0
    written = [lora, tmp_path / "merged.safetensors", tmp_path / "kohya.safetensors",
               _cache_entry(tmp_path / CACHE_FOLDER), _png(tmp_path / "image.png"),
               fileio.atomic_write_bytes(b"x = 1\n", tmp_path / "config.toml")]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(mode) for p in written}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [CACHE_FOLDER]


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync call as (inode, is a folder), taken at the call."""
    calls: list[tuple[int, bool]] = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        calls.append((st.st_ino, stat.S_ISDIR(st.st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("kind", ["network", "cache entry", "png", "merged"])
def test_file_and_folder_are_fsynced_before_and_after_the_rename(dit, dit_file, tmp_path, fsyncs, kind):
    folder = tmp_path / "out"
    if kind == "network":
        net = random_network(dit)
        try:
            path = net.save(folder / "lora.safetensors")
        finally:
            net.remove()
    elif kind == "cache entry":
        path = _cache_entry(folder)
    elif kind == "png":
        path = _png(folder / "image.png")
    else:
        lora = tensor_files.atomic_save(load_file(_network_file(dit, tmp_path)), tmp_path / "lora.safetensors")
        fsyncs.clear()
        path = folder / "merged.safetensors"
        assert main(["merge", "--dit", str(dit_file), "--network", str(lora), "--out", str(path)]) == 0
    # the file's bytes (its inode: synced under the temporary name, then renamed) and the folder's entry
    assert (path.stat().st_ino, False) in fsyncs, fsyncs
    assert (folder.stat().st_ino, True) in fsyncs, fsyncs
    assert fsyncs.index((path.stat().st_ino, False)) < fsyncs.index((folder.stat().st_ino, True))


def _network_file(dit, tmp_path: Path) -> Path:
    net = random_network(dit)
    try:
        return net.save(tmp_path / "source.safetensors")
    finally:
        net.remove()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_a_killed_writers_temporaries_are_removed_when_the_cache_is_next_opened(tmp_path):
    images = tmp_path / "images"
    cache = images / CACHE_FOLDER
    cache.mkdir(parents=True)
    # an entry written by the killed run (not opened by this process yet: the sweep runs once per process)
    name = CacheStore(tmp_path / "elsewhere").path_for("key-1").name
    entry = tensor_files.atomic_save({"latent": torch.ones(2)}, cache / name, {"anima_cache_key": "key-1"})
    dead = _dead_pid()
    left = [cache / f".{entry.name}.{dead}-0a1b2c3d.tmp", cache / f".{'f' * 40}.safetensors.{dead}-99aa88bb.tmp"]
    for p in left:
        p.write_bytes(b"half a safetensors file")
    live = cache / f".{'e' * 40}.safetensors.{os.getppid()}-12345678.tmp"  # a process writing right now
    users = [cache / ".notes.tmp", cache / "mine.safetensors.tmp", cache / f".x.{dead}.tmp",
             cache / f".x.{dead}-0a1b2c3d.tmp.bak", cache / "README"]
    for p in [live, *users]:
        p.write_bytes(b"keep me")
    store = store_for(images / "a.png")  # what caching opens for every image of the folder
    assert store.get("key-1") is not None
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in [entry, live, *users])


def test_a_day_old_temporary_of_a_live_pid_is_stale_too(tmp_path):
    tmp = tmp_path / f".a.safetensors.{os.getpid()}-0a1b2c3d.tmp"
    tmp.write_bytes(b"x")
    assert fileio.remove_stale_temporaries(tmp_path) == []
    os.utime(tmp, (0, 0))
    assert fileio.remove_stale_temporaries(tmp_path) == [tmp] and not tmp.exists()


def test_safetensors_written_by_the_write_path_are_what_safetensors_writes(tmp_path):
    tensors = {"b.lora_up.weight": torch.randn(8, 4), "a.lora_down.weight": torch.randn(4, 8),
               "a.alpha": torch.tensor(2.0), "c": torch.randn(3, 5).to(torch.bfloat16), "e": torch.empty(0, 3),
               "i": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    path = tensor_files.atomic_save(tensors, tmp_path / "n.safetensors", {"ss_network_dim": "4"})
    assert path.read_bytes() == save(tensors, {"ss_network_dim": "4"})
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert read_png_parameters(_png(tmp_path / "x.png"))["prompt"] == "p"


def test_a_failing_write_leaves_no_temporary_and_the_old_file(tmp_path, monkeypatch):
    path = fileio.atomic_write_bytes(b"old", tmp_path / "f.toml")

    def check(tmp: Path) -> None:
        assert tmp.read_bytes() == b"new" and tmp.parent == tmp_path
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        fileio.write_atomic(path, lambda fd: fileio.write_all(fd, b"new"), check=check)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.toml"]


def test_temporaries_of_long_names_fit_and_a_prefix_limits_the_sweep(tmp_path):
    long = tmp_path / ("n" * 240 + ".safetensors")  # 252 characters: a legal name
    assert tensor_files.atomic_save({"w": torch.ones(1)}, long).exists()
    dead = _dead_pid()
    mine, other = (tmp_path / f".{n}.safetensors.{dead}-0a1b2c3d.tmp" for n in ("run-step00000002", "other"))
    for p in (mine, other):
        p.write_bytes(b"x")
    assert fileio.remove_stale_temporaries(tmp_path, "run") == [mine] and other.exists()


def test_a_finished_file_moved_into_place_is_fsynced_then_its_folder(tmp_path, fsyncs):
    """A resumable download's `.part` (written in place) takes the write path's last steps."""
    part = tmp_path / "model.safetensors.part"
    part.write_bytes(b"data")
    dest = fileio.move_into_place(part, tmp_path / "model.safetensors")
    assert dest.read_bytes() == b"data" and not part.exists()
    assert fsyncs.index((dest.stat().st_ino, False)) < fsyncs.index((tmp_path.stat().st_ino, True))


def test_a_folder_replaced_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, fsyncs, monkeypatch):
    """State folders: swapped by two renames, the parent fsync'd after; a failing swap puts the old one back."""
    final, aside = tmp_path / "run-state", tmp_path / ".run-state.old-1"
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    fileio.replace_folder(tmp_path / "new", final)  # nothing in the way: no aside name needed
    assert (final / "f").read_text() == "new" and (tmp_path.stat().st_ino, True) in fsyncs
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "f").write_text("newer")
    with pytest.raises(FileExistsError):
        fileio.replace_folder(tmp_path / "newer", final)
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name == "newer":
            raise PermissionError("no")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        fileio.replace_folder(tmp_path / "newer", final, aside=aside)
    assert (final / "f").read_text() == "new" and not aside.exists()
    monkeypatch.setattr(os, "replace", real)
    fileio.replace_folder(tmp_path / "newer", final, aside=aside)
    assert (final / "f").read_text() == "newer" and not aside.exists() and not (tmp_path / "newer").exists()
