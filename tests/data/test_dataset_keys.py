"""dataset.toml keys: metadata_file (JSON / JSONL), validation_split / validation_seed, resize_interpolation,
skip_image_resolution, custom_attributes, cache_info, and multi-resolution (several [[datasets]])."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anima_trainer.data import DatasetConfigError, build_dataset, parse_dataset_config
from anima_trainer.data.metadata import join_caption


def _img(path: Path, size=(64, 64), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _folder(root: Path, n: int, size=(64, 64), caption=True) -> Path:
    for k in range(n):
        _img(root / f"img{k:02d}.png", size, (10 * k, 100, 50))
        if caption:
            (root / f"img{k:02d}.txt").write_text(f"tag{k}", encoding="utf-8")
    return root


def _build(datasets: list[dict], general: dict | None = None, source_dir=None, **kw):
    raw = {"general": {"resolution": 64, "caption_extension": ".txt", **(general or {})}, "datasets": datasets}
    return build_dataset(parse_dataset_config(raw, source_dir=source_dir), **kw)


# --- metadata_file ---------------------------------------------------------------------------------------

def test_metadata_json_keys_with_and_without_extension_and_absolute(tmp_path):
    imgs = tmp_path / "imgs"
    _img(imgs / "a.png")
    _img(imgs / "b.jpg")
    _img(imgs / "sub" / "c.webp")
    other = _img(tmp_path / "elsewhere" / "d.png")
    meta = {
        "a": {"caption": "a photo", "tags": "1girl, solo"},  # no extension (kohya's merge scripts)
        "b.jpg": {"caption": "second"},  # with extension
        "sub/c": {"tags": "only tags"},  # relative sub-path, tags only
        str(other): {"caption": "absolute", "train_resolution": [64, 64], "image_size": [64, 64]},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    ds = _build([{"subsets": [{"image_dir": str(imgs), "metadata_file": str(tmp_path / "meta.json")}]}])
    got = {item.path: item.caption for item in ds.items}
    assert got == {
        imgs / "a.png": "a photo,1girl, solo",  # kohya: caption + caption_separator + tags
        imgs / "b.jpg": "second",
        imgs / "sub" / "c.webp": "only tags",
        other: "absolute",
    }
    assert ds.skipped == []


def test_metadata_jsonl_and_relative_paths_from_config_folder(tmp_path):
    imgs = tmp_path / "imgs"
    _img(imgs / "x.png")
    _img(imgs / "y.png")
    lines = [
        json.dumps({"image_path": "x.png", "caption": "first line\nsecond line", "tags": "t1"}),
        "",
        json.dumps({"image_path": "y", "caption": "why", "width": 64, "height": 64}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = _build([{"subsets": [{"image_dir": "imgs", "metadata_file": "m.jsonl"}]}], source_dir=tmp_path)
    assert {i.path.name: i.caption for i in ds.items} == {"x.png": "first line,t1", "y.png": "why"}
    # enable_wildcard keeps every line, each with the tags (kohya)
    ds = _build([{"subsets": [{"image_dir": "imgs", "metadata_file": "m.jsonl", "enable_wildcard": True}]}],
                source_dir=tmp_path)
    assert {i.path.name: i.caption for i in ds.items}["x.png"] == "first line,t1\nsecond line,t1"


def test_join_caption_rules():
    assert join_caption("", "a, b", ",", False) == "a, b"
    assert join_caption("cap", "", ",", False) == "cap"
    assert join_caption("cap", "t\nu", ";", True) == "cap;t;u"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("m.json", '{"a": {"caption": "x"},\n "b": {"caption": 3}}',
         r"m\.json:2 \(image 'b'\): 'caption' must be a string"),
        ("m.json", '{"a": {"caption": "x"},\n oops}', r"m\.json:2: not valid JSON"),
        ("m.json", '[{"image_path": "a"}]', r"must be a JSON object .*\*\.jsonl"),
        ("m.json", '{"a": "just a caption"}', r"entry must be an object"),
        ("m.json", '{"a": {"image_size": [64]}}', r"'image_size' must be \[width, height\]"),
        ("m.jsonl", '{"image_path": "a", "caption": "x"}\n{"caption": "no path"}\n', r"m\.jsonl:2: no \"image_path\""),
        ("m.jsonl", '{"image_path": "a"}\nnot json\n', r"m\.jsonl:2: not valid JSON"),
        ("m.jsonl", '{"image_path": "a", "tags": ["x"]}\n', r"m\.jsonl:1: 'tags' must be a string"),
        ("m.json", "{}", r"lists no images"),
    ],
)
def test_metadata_malformed(tmp_path, name, text, message):
    _img(tmp_path / "imgs" / "a.png")
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DatasetConfigError, match=message):
        _build([{"subsets": [{"image_dir": str(tmp_path / "imgs"), "metadata_file": str(tmp_path / name)}]}])


def test_metadata_missing_images_listed(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    (tmp_path / "m.jsonl").write_text(
        "\n".join(json.dumps({"image_path": k, "caption": "c"}) for k in ("a", "gone1", "gone2.png")), encoding="utf-8")
    with pytest.raises(DatasetConfigError, match=r"2 image\(s\) listed in metadata_file .* not found .*'gone1' "
                                                 r"\(.*m\.jsonl:2\); 'gone2\.png' \(.*m\.jsonl:3\)"):
        _build([{"subsets": [{"image_dir": str(tmp_path / "imgs"), "metadata_file": str(tmp_path / "m.jsonl")}]}])


def test_metadata_config_errors(tmp_path):
    (tmp_path / "m.json").write_text('{"rel/a": {"caption": "c"}}', encoding="utf-8")
    with pytest.raises(DatasetConfigError, match="is relative, so .* needs image_dir"):
        _build([{"subsets": [{"metadata_file": str(tmp_path / "m.json")}]}])
    with pytest.raises(DatasetConfigError, match="metadata_file .*nope.json is not a file"):
        _build([{"subsets": [{"metadata_file": str(tmp_path / "nope.json")}]}])
    with pytest.raises(DatasetConfigError, match="mixes subsets with and without metadata_file"):
        parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]}]})
    with pytest.raises(DatasetConfigError, match="'class_tokens' in .* no effect with metadata_file"):
        parse_dataset_config({"datasets": [{"subsets": [{"metadata_file": "m.json", "class_tokens": "x"}]}]})


# --- validation_split / validation_seed ------------------------------------------------------------------

def test_validation_split_sizes_and_determinism(tmp_path):
    _folder(tmp_path / "a", 10)
    _folder(tmp_path / "b", 5)
    subsets = [{"image_dir": str(tmp_path / "a")}, {"image_dir": str(tmp_path / "b")}]
    ds = _build([{"validation_split": 0.3, "validation_seed": 7, "subsets": subsets}])
    # per subset: floor(10 * 0.3) = 3 and floor(5 * 0.3) = 1
    assert len(ds.validation_items) == 4 and len(ds.items) == 11
    assert {i.path for i in ds.items}.isdisjoint({i.path for i in ds.validation_items})
    assert sorted(i.subset_index for i in ds.validation_items) == [0, 0, 0, 1]
    again = _build([{"validation_split": 0.3, "validation_seed": 7, "subsets": subsets}], seed=99)
    assert [i.path for i in again.validation_items] == [i.path for i in ds.validation_items]
    other = [_build([{"validation_split": 0.3, "validation_seed": s, "subsets": subsets}]) for s in range(1, 6)]
    assert any({i.path for i in o.validation_items} != {i.path for i in ds.validation_items} for o in other)
    # without validation_seed the dataset seed decides
    s1 = _build([{"validation_split": 0.3, "subsets": subsets}], seed=1)
    assert [i.path for i in s1.validation_items] == [
        i.path for i in _build([{"validation_split": 0.3, "subsets": subsets}], seed=1).validation_items]
    # the held-out items form their own dataset (same buckets / loading / captions)
    vds = ds.validation_dataset()
    assert vds.num_images == 4 and vds.load_batch([0]).images.shape == (1, 3, 64, 64)
    assert _build([{"subsets": subsets}]).validation_dataset() is None


def test_validation_split_range():
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(DatasetConfigError, match="'validation_split'"):
            parse_dataset_config({"general": {"validation_split": bad},
                                  "datasets": [{"subsets": [{"image_dir": "x"}]}]})
    with pytest.raises(DatasetConfigError, match="'validation_split' in .*subsets.* dataset-level"):
        parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "x", "validation_split": 0.1}]}]})


# --- resize_interpolation ---------------------------------------------------------------------------------

def test_resize_interpolation_changes_pixels(tmp_path):
    im = Image.new("RGB", (8, 8))
    im.putdata([(255, 255, 255) if (x + y) % 2 else (0, 0, 0) for y in range(8) for x in range(8)])
    (tmp_path / "a").mkdir()
    im.save(tmp_path / "a" / "c.png")
    (tmp_path / "a" / "c.txt").write_text("c")

    def pixels(**kw):
        ds = _build([{"subsets": [{"image_dir": str(tmp_path / "a"), **kw}]}], general={"resolution": 32})
        return ds.load_item(0).numpy()

    nearest = pixels(resize_interpolation="nearest")
    assert set(np.unique(nearest)) <= {0.0, 1.0}  # upscaled 4x: only the original colours
    assert nearest[0, 0, 0] == 0.0 and nearest[0, 0, 4] == 1.0  # 4x4 blocks
    bilinear = pixels(resize_interpolation="bilinear")
    assert len(np.unique(bilinear)) > 2  # blended values
    default = pixels()  # Lanczos when enlarging (kohya's default)
    assert not np.allclose(default, bilinear) and not np.allclose(default, nearest)
    assert np.allclose(pixels(resize_interpolation="Linear"), bilinear)  # kohya's alias, case-insensitive
    with pytest.raises(DatasetConfigError, match="unknown interpolation 'sinc'"):
        pixels(resize_interpolation="sinc")


# --- skip_image_resolution --------------------------------------------------------------------------------

def test_skip_image_resolution_skips_and_reports(tmp_path):
    _img(tmp_path / "a" / "small.png", (32, 32))
    _img(tmp_path / "a" / "edge.png", (48, 48))  # area == 48 * 48: skipped too (kohya: <=)
    _img(tmp_path / "a" / "big.png", (64, 64))
    for stem in ("small", "edge", "big"):
        (tmp_path / "a" / f"{stem}.txt").write_text(stem)
    ds = _build([{"skip_image_resolution": 48, "subsets": [{"image_dir": str(tmp_path / "a")}]}])
    assert [i.path.name for i in ds.items] == ["big.png"]
    assert sorted(p.name for p, _ in ds.skipped) == ["edge.png", "small.png"]
    assert all(r.startswith("below skip_image_resolution") for _, r in ds.skipped)
    # [W, H] form; an all-skipped subset in one dataset is dropped (multi-resolution use), not an error
    ds = _build([{"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "a")}]},
                 {"skip_image_resolution": [64, 64], "subsets": [{"image_dir": str(tmp_path / "a")}]}])
    assert {i.dataset_index for i in ds.items} == {0} and ds.num_images == 3


# --- custom_attributes / cache_info -----------------------------------------------------------------------

def test_custom_attributes_reach_items_and_batches(tmp_path):
    _folder(tmp_path / "a", 2)
    _folder(tmp_path / "b", 1)
    ds = _build([{"custom_attributes": {"style": "ds"},
                  "subsets": [{"image_dir": str(tmp_path / "a"), "custom_attributes": {"style": "x", "w": [1, 2]}},
                              {"image_dir": str(tmp_path / "b")}]}])
    by_dir = {i.path.parent.name: i.custom_attributes for i in ds.items}
    assert by_dir == {"a": {"style": "x", "w": [1, 2]}, "b": {"style": "ds"}}  # subset > dataset (whole table)
    batch = ds.load_batch([0])
    assert batch.items[0].custom_attributes["style"] == "x"
    ds.items[0].custom_attributes["w"].append(3)  # a copy per item
    assert ds.items[1].custom_attributes["w"] == [1, 2]
    with pytest.raises(DatasetConfigError, match="'custom_attributes'"):
        parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "x", "custom_attributes": 3}]}]})


def test_cache_info_accepted_without_effect(tmp_path, caplog):
    _folder(tmp_path / "a", 1)
    with caplog.at_level("INFO"):
        ds = _build([{"subsets": [{"image_dir": str(tmp_path / "a"), "cache_info": True}]}])
    assert ds.params[0].subsets[0].cache_info is True and "cache_info = true has no effect" in caplog.text
    assert not (tmp_path / "a" / "metadata_cache.json").exists()


# --- multi-resolution -------------------------------------------------------------------------------------

def test_multi_resolution_same_image_dir(tmp_path):
    _folder(tmp_path / "a", 3, size=(96, 64))
    bucket = {"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16}
    ds = _build([{"resolution": 64, "batch_size": 2, **bucket, "subsets": [{"image_dir": str(tmp_path / "a")}]},
                 {"resolution": 32, "batch_size": 1, **bucket, "subsets": [{"image_dir": str(tmp_path / "a")}]}])
    assert ds.num_images == 6
    per_ds = {d: {i.bucket for i in ds.items if i.dataset_index == d} for d in (0, 1)}
    assert all(w * h <= 64 * 64 for w, h in per_ds[0]) and all(w * h <= 32 * 32 for w, h in per_ds[1])
    assert per_ds[0].isdisjoint(per_ds[1])
    plan = ds.batch_plan(0)
    assert len(plan) == 2 + 3  # ceil(3 / 2) batches at 64, 3 at 32
    for indices in plan:
        assert len({ds.items[i].dataset_index for i in indices}) == 1
        assert len({ds.items[i].bucket for i in indices}) == 1
    for batch in ds.epoch(0):
        w, h = batch.bucket
        assert batch.images.shape[-2:] == (h, w)
    # validation holds out the same image in both resolutions
    subsets = [{"image_dir": str(tmp_path / "a")}]
    ds = _build([{"resolution": 64, "validation_split": 0.34, **bucket, "subsets": subsets},
                 {"resolution": 32, "validation_split": 0.34, **bucket, "subsets": subsets}])
    assert len({i.path for i in ds.validation_items}) == 1 and len(ds.validation_items) == 2


def test_network_multiplier_is_refused_with_the_reason_unless_it_is_kohyas_default(tmp_path):
    """Issue 14: no "not implemented yet" survives; a per-dataset LoRA strength would change the result, so it is
    refused with the reason and the fix, while kohya's default 1.0 is accepted."""
    from anima_trainer.data import load_dataset_config
    from anima_trainer.data.config import DatasetConfigError

    (tmp_path / "img").mkdir()
    path = tmp_path / "d.toml"
    path.write_text('[[datasets]]\nnetwork_multiplier = 0.5\n[[datasets.subsets]]\nimage_dir = "img"\n')
    with pytest.raises(DatasetConfigError, match=r"dataset option 'network_multiplier' is not supported \(found in "
                                                 r"\[\[datasets\]\] #1\): kohya trains that dataset with the LoRA at "
                                                 r"another strength .*remove it, or split the run by dataset"):
        load_dataset_config(path)
    path.write_text('[[datasets]]\nnetwork_multiplier = 1.0\n[[datasets.subsets]]\nimage_dir = "img"\n')
    assert str(load_dataset_config(path).datasets[0].subsets[0].image_dir).endswith("img")
