"""issue 14 item 4: images without a caption file train as in kohya (class_tokens, else an empty caption) and
are listed, in full, in `<output_dir>/<output_name>.dataset_report.txt`; strict_captions makes them an error."""

from __future__ import annotations

import logging
import shutil

import pytest

from anima_trainer.config import parse_train_args
from anima_trainer.data import build_dataset
from anima_trainer.data.config import DatasetConfigError, parse_dataset_config
from anima_trainer.data.scan import dataset_report, write_dataset_report
from anima_trainer.demo import write_demo_configs, write_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 shapes with captions; shape_01 and shape_03 lose theirs."""
    folder = write_shapes_dataset(tmp_path_factory.mktemp("uncaptioned") / "images", count=4, seed=1)
    for n in ("shape_01", "shape_03"):
        (folder / f"{n}.txt").unlink()
    return folder


def _raw(folder, **subset):
    return {"general": {"caption_extension": ".txt"},
            "datasets": [{"resolution": 64, "subsets": [{"image_dir": str(folder), **subset}]}]}


def _captions(ds) -> dict[str, str]:
    return {it.path.stem: it.caption for it in ds.items}


def test_class_tokens_caption_the_images_without_a_caption_file(shapes, caplog):
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(parse_dataset_config(_raw(shapes, class_tokens="sks shape")), report_name="r.txt")
    caps = _captions(ds)
    assert caps["shape_01"] == caps["shape_03"] == "sks shape"
    assert caps["shape_00"] == (shapes / "shape_00.txt").read_text().strip()  # its own caption file
    assert ds.uncaptioned == [(shapes / "shape_01.png", "sks shape"), (shapes / "shape_03.png", "sks shape")]
    (line,) = [r.getMessage() for r in caplog.records if "no caption file" in r.getMessage()]
    assert line.startswith("dataset: 2 image(s) have no caption file and train with the subset's class_tokens or an "
                           "empty caption, as in kohya (strict_captions = true makes this an error; full list in "
                           "r.txt): 2 x caption 'sks shape': ")
    assert "shape_01.png" in line and "shape_03.png" in line


def test_no_class_tokens_means_an_empty_caption(shapes, tmp_path):
    ds = build_dataset(parse_dataset_config(_raw(shapes)))
    assert _captions(ds)["shape_01"] == "" and _captions(ds)["shape_03"] == ""
    report = tmp_path / "out" / "x.dataset_report.txt"
    (tmp_path / "out").mkdir()
    write_dataset_report(ds, report)
    assert report.read_text().splitlines() == [
        "no caption file (trains with the caption shown: the subset's class_tokens, else empty): 2",
        f"  {shapes / 'shape_01.png'}: caption ''", f"  {shapes / 'shape_03.png'}: caption ''"]
    clean = tmp_path / "clean"
    shutil.copytree(shapes, clean)
    for n in ("shape_01", "shape_03"):
        (clean / f"{n}.txt").write_text("a shape")
    assert write_dataset_report(build_dataset(parse_dataset_config(_raw(clean))), report) is None
    assert not report.exists()  # a report of another scan is not left behind


def test_strict_captions_is_one_error_naming_the_images_of_every_subset(shapes, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(shapes, other)
    (other / "shape_00.caption").write_text("x")
    raw = _raw(shapes, class_tokens="sks")
    raw["datasets"][0]["subsets"].append({"image_dir": str(other), "caption_extension": ".caption"})
    with pytest.raises(DatasetConfigError) as e:
        build_dataset(parse_dataset_config(raw), strict_captions=True)
    msg = str(e.value)
    # subset 1: shape_01, shape_03; subset 2 (.caption): shape_01..03 (shape_00 has its .caption)
    assert msg.startswith("5 image(s) have no caption file (.caption, .txt) and strict_captions is on: "
                          f"{shapes / 'shape_01.png'}, {shapes / 'shape_03.png'}, {other / 'shape_01.png'} and 2 more")
    assert msg.endswith("add the caption files, or set strict_captions = false to train them with their subset's "
                        "class_tokens, else an empty caption (kohya)")


def test_report_lists_skipped_and_uncaptioned_together(shapes, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(shapes, folder)
    (folder / "broken.png").write_bytes(b"")  # an empty file: skipped
    ds = build_dataset(parse_dataset_config(_raw(folder)))
    text = dataset_report(ds)
    assert text.startswith(f"skipped (not trained on): 1\n  {folder / 'broken.png'}: ")
    assert "no caption file (trains with the caption shown: the subset's class_tokens, else empty): 2\n" in text


def test_training_writes_the_report_and_strict_captions_stops_it(setup_models, shapes, tmp_path):
    from anima_trainer.train.loop import run_training

    toml = write_demo_configs(tmp_path / "run", setup_models, shapes, 1, seed=5)
    out = tmp_path / "run" / "output"
    with pytest.raises(DatasetConfigError, match="strict_captions is on"):
        run_training(parse_train_args(["--config_file", str(toml), "--strict_captions"]))
    assert not (out / "demo_lora.dataset_report.txt").exists()
    run_training(parse_train_args(["--config_file", str(toml)]))
    lines = (out / "demo_lora.dataset_report.txt").read_text().splitlines()
    assert lines[0] == "no caption file (trains with the caption shown: the subset's class_tokens, else empty): 2"


@pytest.fixture(scope="module")
def setup_models(tmp_path_factory):
    from anima_trainer.demo import write_demo_models

    return write_demo_models(tmp_path_factory.mktemp("models"), seed=3)
