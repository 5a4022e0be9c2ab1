"""Caches: content-addressed entries reused only when nothing they depend on changed."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from anima_trainer.cache import cache_latents, cache_text, model_fingerprint
from anima_trainer.cache.store import CACHE_FOLDER, CacheStore, entry_key, store_for
from anima_trainer.cli import main
from anima_trainer.data import build_dataset, load_dataset_config
from anima_trainer.demo import write_demo_configs, write_demo_models, write_shapes_dataset, write_tiny_vae
from anima_trainer.models import load_text_encoder, load_vae
from anima_trainer.config import parse_train_args
from anima_trainer.train.loop import run_training


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("models"), seed=4)


@pytest.fixture()
def project(tmp_path, models):
    images = write_shapes_dataset(tmp_path / "images", count=4, seed=4)
    toml = write_demo_configs(tmp_path, models, images, 3, seed=2)
    return {"images": images, "toml": toml, "dataset": tmp_path / "dataset.toml"}


def _dataset(project):
    return build_dataset(load_dataset_config(project["dataset"]), default_batch_size=4)


def _latents(project, vae_path):
    vae = load_vae(vae_path, dtype=torch.float32)
    return cache_latents(_dataset(project), vae, vae_fingerprint=model_fingerprint(vae_path), dtype=torch.float32,
                         to_disk=True, batch_size=2, progress=False)


def _text(project, models):
    te = load_text_encoder(models["qwen3"], qwen3_tokenizer_path=models["tokenizers"], dtype=torch.float32)
    ds = _dataset(project)
    captions = {item.caption: store_for(item.path) for item in ds.items}
    return cache_text(captions, te, qwen_fingerprint=model_fingerprint(models["qwen3"]), progress=False)


def test_latents_reused_and_rebuilt_only_where_inputs_changed(project, models, tmp_path):
    first, s1 = _latents(project, models["vae"])
    assert (s1.built, s1.reused, s1.invalid) == (4, 0, 0)
    assert len(list((project["images"] / CACHE_FOLDER).glob("*.safetensors"))) == 4
    again, s2 = _latents(project, models["vae"])
    assert (s2.built, s2.reused) == (0, 4)
    assert set(first) == {(i, False) for i in range(4)}  # no flip_aug: one orientation per image
    assert all(torch.equal(first[k]["latent"], again[k]["latent"]) for k in first)
    # replace one image: exactly that entry is rebuilt
    ds = _dataset(project)
    changed = ds.items[1].path
    Image.new("RGB", (64, 64), "black").save(changed)
    third, s3 = _latents(project, models["vae"])
    assert (s3.built, s3.reused) == (1, 3)
    assert not torch.equal(third[(1, False)]["latent"], first[(1, False)]["latent"])
    assert torch.equal(third[(0, False)]["latent"], first[(0, False)]["latent"])
    # another VAE file: everything is rebuilt, nothing stale is used
    other = write_tiny_vae(tmp_path / "other_vae.safetensors", seed=99)
    _, s4 = _latents(project, other)
    assert (s4.built, s4.reused) == (4, 0)


def test_latent_cache_equals_fresh_encoding(project, models):
    latents, _ = _latents(project, models["vae"])
    vae = load_vae(models["vae"], dtype=torch.float32)
    ds = _dataset(project)
    for i in range(len(ds.items)):
        direct = vae.encode(ds.load_batch([i]).images)[0]
        torch.testing.assert_close(latents[(i, False)]["latent"], direct, atol=1e-6, rtol=1e-6)


def test_edited_caption_rebuilds_only_its_text_entry(project, models):
    rows, s1 = _text(project, models)
    assert s1.built == len(rows) and s1.reused == 0
    _, s2 = _text(project, models)
    assert (s2.built, s2.reused) == (0, len(rows))
    caption_file = sorted(project["images"].glob("*.txt"))[0]
    caption_file.write_text("a purple hexagon on a white background", encoding="utf-8")
    rows3, s3 = _text(project, models)
    assert (s3.built, s3.reused) == (1, len(rows3) - 1)
    te = load_text_encoder(models["qwen3"], qwen3_tokenizer_path=models["tokenizers"], dtype=torch.float32)
    enc = te.encode(["a purple hexagon on a white background"])
    torch.testing.assert_close(rows3["a purple hexagon on a white background"][0], enc.qwen_hidden[0])


def test_corrupt_or_foreign_entries_are_rebuilt(tmp_path):
    store = CacheStore(tmp_path)
    key = entry_key({"kind": "test", "n": 1})
    store.put(key, {"x": torch.ones(3)})
    assert torch.equal(store.get(key)["x"], torch.ones(3))
    store.path_for(key).write_bytes(b"garbage")
    assert store.lookup(key) == (None, True)
    other = entry_key({"kind": "test", "n": 2})
    shutil.copy(store.put(other, {"x": torch.zeros(1)}), store.path_for(key))  # right name, wrong contents
    assert store.lookup(key) == (None, True)


def test_cache_command_then_cached_training_matches_uncached(project, tmp_path):
    assert main(["cache", "--config_file", str(project["toml"])]) == 0
    entries = list((project["images"] / CACHE_FOLDER).glob("*.safetensors"))
    assert len(entries) == 4 + 4  # 4 latents + 4 distinct captions
    base = parse_train_args(["--config_file", str(project["toml"])])
    plain = run_training(base)
    cached = run_training(parse_train_args(["--config_file", str(project["toml"]), "--cache_latents_to_disk",
                                            "--cache_text_encoder_outputs_to_disk", "--output_name", "cached"]))
    assert len(plain.losses) == len(cached.losses) == 3
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), atol=1e-4, rtol=1e-4)
    assert len(list((project["images"] / CACHE_FOLDER).glob("*.safetensors"))) == 8  # all reused, none added


def test_cache_command_then_training_reuses_every_entry_with_random_captions_and_no_seed(project):
    """issue 16: `cache` and `train` share their start (train/setup.py setup_run), so with `seed` unset (42 in
    both; `cache` used 0) and captions that change every step (caption variants), every entry `cache` built is
    what `train` reads: nothing is built again."""
    lines = project["toml"].read_text().splitlines()
    project["toml"].write_text("\n".join(line for line in lines if not line.startswith("seed =")) + "\n")
    text = project["dataset"].read_text().replace("batch_size = 4\n", "batch_size = 4\nshuffle_caption = true\n"
                                                  "caption_dropout_rate = 0.3\n")
    project["dataset"].write_text(text)
    for f in project["images"].glob("*.txt"):
        f.write_text(f.read_text().replace(" on a ", ", ").replace(" ", ", "))  # tags to shuffle
    args = ["--config_file", str(project["toml"])]
    assert parse_train_args(args).seed is None
    assert main(["cache", *args]) == 0
    folder = project["images"] / CACHE_FOLDER
    built = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    assert len(built) > 4 + 4  # 4 latents + the caption variants (more than one caption per image) + ""
    run = run_training(parse_train_args([*args, "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"]))
    assert run.steps == 3
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")} == built  # all reused, none added


def test_caption_variants_are_deterministic_and_respect_dropout(project):
    from anima_trainer.cache.variants import CaptionVariants

    text = project["dataset"].read_text().replace("batch_size = 4\n", "batch_size = 4\nshuffle_caption = true\n"
                                                  "caption_dropout_rate = 0.5\n")
    project["dataset"].write_text(text)
    for f in project["images"].glob("*.txt"):
        f.write_text(f.read_text().replace(" on a ", ", ").replace(" ", ", "))  # tags to shuffle
    ds = _dataset(project)
    a, b = CaptionVariants(ds, 4), CaptionVariants(ds, 4)
    assert a.table == b.table and len(a.table) == 4 and all(len(v) == 4 for v in a.table.values())
    assert any(len(set(v)) > 1 for v in a.table.values())  # shuffling produced different variants
    assert all(c != "" for v in a.table.values() for c in v)  # dropout is not baked into variants
    plan = ds.batch_plan(0)
    picked, again = a.pick(0, plan), b.pick(0, plan)
    assert picked == again
    normal = ds.epoch_captions(0, plan)
    for p_row, n_row, idx in zip(picked, normal, plan):
        for p, n, i in zip(p_row, n_row, idx):
            assert (p == "") == (n == "") and (p == "" or p in a.table[i])
    assert a.captions() >= {""}


def test_flip_aug_caches_both_orientations_and_random_pixels_refuse_the_cache(project, models):
    from anima_trainer.cache.build import latent_mask

    text = project["dataset"].read_text().replace("batch_size = 4\n", "batch_size = 4\nflip_aug = true\n")
    project["dataset"].write_text(text)
    cache, summary = _latents(project, models["vae"])
    assert summary.built == 8 and set(cache) == {(i, f) for i in range(4) for f in (False, True)}
    vae = load_vae(models["vae"], dtype=torch.float32)
    ds = _dataset(project)
    flipped = vae.encode(ds.load_batch([2], flips=[True]).images)[0]
    torch.testing.assert_close(cache[(2, True)]["latent"], flipped, atol=1e-6, rtol=1e-6)
    plan = ds.batch_plan(0)
    flips = ds.epoch_flips(0, plan)
    latents, mask = cache.batch(plan[0], flips[0])
    assert mask is None
    for row, (i, f) in enumerate(zip(plan[0], flips[0])):
        assert torch.equal(latents[row], cache[(i, f)]["latent"])
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., :8, :] = 1
    assert torch.equal(latent_mask(masks, (2, 2)), torch.tensor([[[[[1.0, 1.0], [0.0, 0.0]]]]]))
    project["dataset"].write_text(text.replace("flip_aug = true", "random_crop = true"))
    with pytest.raises(ValueError, match="random_crop / color_aug"):
        run_training(parse_train_args(["--config_file", str(project["toml"]), "--cache_latents"]))
