"""validation_split / validation_seed: which images are held out, kohya's precedence with the train args, and
the fixed `ValidationSet` the validation loss reads (captions, pixels, batches, noise seeds)."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from anima_trainer.data import DatasetConfigError, ValidationSet, build_dataset, parse_dataset_config
from anima_trainer.data.params import resolve_datasets
from anima_trainer.data.scan import split_validation


def _folder(root: Path, n: int, size=(64, 64), start: int = 0, caption: str = "tag{k}, red, blue") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(start, start + n):
        im = Image.new("RGB", size, (10 * k % 256, 100, 50))
        im.putpixel((0, 0), (255, 255, 255))  # left/right differ: a flip would be visible
        im.save(root / f"img{k:02d}.png")
        (root / f"img{k:02d}.txt").write_text(caption.format(k=k), encoding="utf-8")
    return root


def _raw(datasets: list[dict], general: dict | None = None) -> dict:
    return {"general": {"resolution": 64, "caption_extension": ".txt", **(general or {})}, "datasets": datasets}


def _build(datasets: list[dict], general: dict | None = None, **kw):
    return build_dataset(parse_dataset_config(_raw(datasets, general)), **kw)


def _names(items) -> set[str]:
    return {i.path.name for i in items}


def test_split_is_disjoint_deterministic_and_location_independent(tmp_path):
    a = _folder(tmp_path / "one" / "a", 10)
    ds = _build([{"validation_split": 0.3, "subsets": [{"image_dir": str(a)}]}], seed=4)
    held = _names(ds.validation_items)
    assert len(held) == 3 and len(ds.items) == 7
    assert held.isdisjoint(_names(ds.items)) and held | _names(ds.items) == {f"img{k:02d}.png" for k in range(10)}
    # same seed → same images; the training seed is the default validation seed
    assert _names(_build([{"validation_split": 0.3, "subsets": [{"image_dir": str(a)}]}], seed=4).validation_items) \
        == held
    assert any(_names(_build([{"validation_split": 0.3, "subsets": [{"image_dir": str(a)}]}],
                             seed=s).validation_items) != held for s in range(5, 10))
    # moving the folder keeps the split (the file name is the identity, not the path)
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    assert _names(_build([{"validation_split": 0.3, "subsets": [{"image_dir": str(b)}]}], seed=4).validation_items) \
        == held
    # scan order does not matter
    params = resolve_datasets(parse_dataset_config(_raw([{"validation_split": 0.3,
                                                          "subsets": [{"image_dir": str(a)}]}])))
    items = list(ds.items) + list(ds.validation_items)
    for trial in range(3):
        random.Random(trial).shuffle(items)
        train, val = split_validation(params, items, seed=4)
        assert _names(val) == held and len(train) == 7


def test_adding_images_moves_at_most_that_many(tmp_path):
    a = _folder(tmp_path / "a", 10)
    before = _names(_build([{"validation_split": 0.3, "validation_seed": 11,
                             "subsets": [{"image_dir": str(a)}]}]).validation_items)
    _folder(a, 2, start=10)  # 12 images: floor(3.6) = 3 held out
    after = _names(_build([{"validation_split": 0.3, "validation_seed": 11,
                            "subsets": [{"image_dir": str(a)}]}]).validation_items)
    assert len(after) == 3 and len(before & after) >= 1


def test_precedence_dataset_general_train_args(tmp_path):
    a, b, c = (_folder(tmp_path / n, 10) for n in "abc")
    datasets = [{"validation_split": 0.5, "validation_seed": 1, "subsets": [{"image_dir": str(a)}]},
                {"subsets": [{"image_dir": str(b)}]},
                {"validation_split": 0.0, "subsets": [{"image_dir": str(c)}]}]
    # train args are the defaults of datasets (and [general]) that set nothing
    ds = _build(datasets, default_validation_split=0.2, default_validation_seed=7, seed=3)
    assert [(p.validation_split, p.validation_seed) for p in ds.params] == [(0.5, 1), (0.2, 7), (0.0, 7)]
    per_ds = [sum(1 for i in ds.validation_items if i.dataset_index == d) for d in range(3)]
    assert per_ds == [5, 2, 0]
    # [general] beats the train args
    ds = _build(datasets, {"validation_split": 0.3, "validation_seed": 9}, default_validation_split=0.2,
                default_validation_seed=7)
    assert [(p.validation_split, p.validation_seed) for p in ds.params] == [(0.5, 1), (0.3, 9), (0.0, 9)]
    # the per-dataset seed decides which images (dataset 1's seed 9 vs 7 from the train args)
    seeds = {s: _names(i for i in _build([datasets[1]], default_validation_split=0.3,
                                          default_validation_seed=s).validation_items) for s in range(6)}
    assert len(set(map(frozenset, seeds.values()))) > 1
    with pytest.raises(DatasetConfigError, match=r"validation_split \(train args\) must be a fraction in \[0, 1\)"):
        _build(datasets, default_validation_split=1.0)


def test_reg_images_are_never_held_out(tmp_path):
    a, r = _folder(tmp_path / "a", 10), _folder(tmp_path / "reg", 10)
    ds = _build([{"validation_split": 0.3, "subsets": [{"image_dir": str(a)}, {"image_dir": str(r), "is_reg": True}]}])
    assert len(ds.validation_items) == 3 and {i.subset_index for i in ds.validation_items} == {0}
    # reg balancing counts the remaining 7 training images
    assert sum(i.num_repeats for i in ds.items if i.is_reg) == 7


def test_too_small_dataset_is_an_error_and_a_small_subset_warns(tmp_path, caplog):
    a = _folder(tmp_path / "a", 3)
    with pytest.raises(DatasetConfigError, match=r"\[\[datasets\]\] #1: validation_split 0.1 holds out no image .*"
                                                 r"n = 3 .*validation_split >= 0.334"):
        _build([{"validation_split": 0.1, "subsets": [{"image_dir": str(a)}]}])
    one = _folder(tmp_path / "one", 1)
    with pytest.raises(DatasetConfigError, match="at least 2 images"):
        _build([{"validation_split": 0.5, "subsets": [{"image_dir": str(one)}]}])
    # 0.334 works as promised
    assert len(_build([{"validation_split": 0.334, "subsets": [{"image_dir": str(a)}]}]).validation_items) == 1
    # one subset too small, another holding out: only a warning for the small one
    big = _folder(tmp_path / "big", 10)
    with caplog.at_level(logging.WARNING):
        ds = _build([{"validation_split": 0.2, "subsets": [{"image_dir": str(big)}, {"image_dir": str(a)}]}])
    assert len(ds.validation_items) == 2 and "holds out none" in caplog.text


def test_validation_set_is_fixed(tmp_path):
    a = _folder(tmp_path / "a", 10, caption="first ||| tag{k}, red, blue, green")
    wide = _folder(tmp_path / "wide", 6, size=(96, 48), caption="{{{{x}}}}, {{a|b}} tag{k}")  # {{x}}, {a|b} tagK
    subsets = [{"image_dir": str(a), "shuffle_caption": True, "caption_dropout_rate": 0.5,
                "caption_tag_dropout_rate": 0.5, "keep_tokens_separator": "|||", "caption_prefix": "pre",
                "flip_aug": True, "color_aug": True, "random_crop": True},
               {"image_dir": str(wide), "enable_wildcard": True, "caption_dropout_every_n_epochs": 1}]
    general = {"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16,
               "batch_size": 2}
    ds = _build([{"validation_split": 0.5, "subsets": subsets}], general, seed=2)
    v = ValidationSet.from_dataset(ds)
    assert isinstance(v, ValidationSet) and v.num_images == 5 + 3
    again = ValidationSet.from_dataset(ds)
    # captions: no dropout, no shuffle; prefix, marker removal and one seeded wildcard choice
    assert v.captions == again.captions
    for item, caption in zip(v.items, v.captions):
        k = int(item.path.stem[3:])
        if item.subset_index == 0:
            assert caption == f"pre first, tag{k}, red, blue, green"
        else:
            assert caption in (f"{{x}}, a tag{k}", f"{{x}}, b tag{k}")  # literal braces, one alternative
    # batches: fixed, one bucket each, at most batch_size, every item exactly once
    plan = v.batches()
    assert plan == again.batches() and len(v) == len(plan)
    assert sorted(i for b in plan for i in b) == list(range(v.num_images))
    for indices in plan:
        assert len(indices) <= 2 and len({v.items[i].bucket for i in indices}) == 1
    # pixels: centre crop, no flip, no jitter — the plain load of the item, every time
    for indices in plan:
        batch = v.load_batch(indices)
        assert batch.flipped == [False] * len(indices) and batch.captions == [v.captions[i] for i in indices]
        for k, i in enumerate(indices):
            assert torch.equal(batch.images[k], v._data.load_item(i))
        assert torch.equal(batch.images, v.load_batch(indices).images)
    # noise seeds: stable, distinct per item, and follow validation_seed
    seeds = [v.noise_seed(i) for i in range(v.num_images)]
    assert seeds == [again.noise_seed(i) for i in range(v.num_images)] and len(set(seeds)) == len(seeds)
    other = ValidationSet.from_dataset(
        _build([{"validation_split": 0.5, "validation_seed": 99, "subsets": subsets}], general, seed=2))
    assert {other.noise_seed(i) for i in range(other.num_images)}.isdisjoint(seeds)
    assert ValidationSet.from_dataset(_build([{"subsets": subsets}], general)) is None
