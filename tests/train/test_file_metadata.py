"""issue 15 item 3: the metadata of saved network files at kohya parity — every ss_* key kohya's Anima trainer
writes (train_network.py with a dataset_config, anima_train_network.py update_metadata), ss_tag_frequency /
ss_dataset_dirs / ss_datasets / ss_bucket_info built from the data as kohya builds them, the base model hashes,
no local paths, and `inspect` showing it all."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from anima_trainer.config import parse_train_args
from anima_trainer.data import build_dataset, load_dataset_config
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.tools.inspect import format_report, inspect_network
from anima_trainer.train.file_metadata import dataset_metadata
from anima_trainer.train.loop import run_training

# Every ss_* key kohya-ss/sd-scripts writes for an Anima LoRA trained with a dataset_config and without
# network_args: train_network.py's metadata dict, the use_user_config branch, the model names and hashes,
# the save-time keys, and anima_train_network.py's update_metadata.
KOHYA_ANIMA_SS_KEYS = """
ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr
ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs
ss_gradient_checkpointing ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler
ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2
ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset
ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate
ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight
ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength
ss_ip_noise_gamma_random_strength ss_loss_type ss_huber_schedule ss_huber_scale ss_huber_c ss_fp8_base
ss_fp8_base_unet ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs
ss_validate_every_n_steps ss_resize_interpolation
ss_weighting_scheme ss_logit_mean ss_logit_std ss_mode_scale ss_timestep_sampling ss_sigmoid_scale
ss_discrete_flow_shift
ss_datasets ss_tag_frequency ss_dataset_dirs
ss_sd_model_hash ss_new_sd_model_hash ss_sd_model_name ss_vae_hash ss_new_vae_hash ss_vae_name
ss_training_finished_at ss_steps ss_epoch
""".split()
# kohya's modelspec keys for Anima (sai_model_spec.build_metadata_dataclass via get_sai_model_spec_dataclass),
# less prediction_type: kohya writes "epsilon" for every non-Flux model; Anima is rectified flow (as Flux), so
# the false value is left out
KOHYA_MODELSPEC_KEYS = {"modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                        "modelspec.title", "modelspec.resolution", "modelspec.date",
                        "modelspec.implementation_version"}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _webui_hashes(path: Path) -> tuple[str, str]:
    raw = path.read_bytes()
    return hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8], hashlib.sha256(raw).hexdigest()


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A short run with the demo's config as users get it (no network_args, one dataset, 4 images)."""
    out = tmp_path_factory.mktemp("meta_run")
    toml = write_demo_configs(out, setup["models"], setup["images"], 2, seed=5)
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=4)
    path = run_training(parse_train_args(["--config_file", str(toml)])).final_path
    return path, _metadata(path)


def test_every_kohya_key_in_kohyas_formats(trained, setup):
    path, meta = trained
    assert set(KOHYA_ANIMA_SS_KEYS) - set(meta) == set()
    assert KOHYA_MODELSPEC_KEYS - set(meta) == set()
    assert "ss_network_args" not in meta  # kohya writes it only when network_args are given
    assert all(isinstance(v, str) for v in meta.values())
    # str(value) as kohya: booleans, None, numbers
    assert (meta["ss_v2"], meta["ss_full_fp16"], meta["ss_cache_latents"], meta["ss_lowram"]) == (
        "False", "False", "False", "False")
    assert (meta["ss_clip_skip"], meta["ss_text_encoder_lr"], meta["ss_noise_offset"]) == ("None", "None", "None")
    assert (meta["ss_seed"], meta["ss_learning_rate"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "5", "0.002", "8", "8.0")
    assert (meta["ss_network_module"], meta["ss_base_model_version"]) == ("networks.lora_anima", "anima")
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_max_train_steps"], meta["ss_num_epochs"]) == (
        "2", "2", "2", "2")
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_num_validation_images"],
            meta["ss_num_batches_per_epoch"]) == ("4", "0", "0", "1")
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"
    assert 0 <= int(meta["ss_session_id"]) <= 2**32
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    # base models: basenames, and the webui hashes kohya computes (model_hash, calculate_sha256)
    dit, vae = Path(setup["models"]["dit"]), Path(setup["models"]["vae"])
    assert (meta["ss_sd_model_name"], meta["ss_vae_name"]) == (dit.name, vae.name)
    assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == _webui_hashes(dit)
    assert (meta["ss_vae_hash"], meta["ss_new_vae_hash"]) == _webui_hashes(vae)
    # the data: captions "a <colour> <shape> on a white background" (no comma: one tag each), 1 repeat
    captions = [p.read_text() for p in sorted(Path(setup["images"]).glob("*.txt"))]
    assert json.loads(meta["ss_tag_frequency"]) == {"images": {c.lower(): captions.count(c) for c in captions}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {}
    (ds,) = json.loads(meta["ss_datasets"])
    assert {k: v for k, v in ds.items() if k not in ("subsets", "tag_frequency", "bucket_info")} == {
        "is_dreambooth": True, "batch_size_per_device": 4, "num_train_images": 4, "num_reg_images": 0,
        "resolution": [64, 64], "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
        "resize_interpolation": None}
    assert ds["subsets"] == [{
        "img_count": 4, "num_repeats": 1, "color_aug": False, "flip_aug": False, "random_crop": False,
        "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "", "secondary_separator": None,
        "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "resize_interpolation": None,
        "image_dir": "images", "class_tokens": None, "is_reg": False}]
    # the demo's images are 64x64 squares: one bucket, no aspect error
    assert json.loads(meta["ss_bucket_info"]) == ds["bucket_info"] == {
        "buckets": {"0": {"resolution": [64, 64], "count": 4}}, "mean_img_ar_error": 0.0}
    assert meta["modelspec.resolution"] == "64x64" and "modelspec.prediction_type" not in meta


def test_no_local_path_in_any_value(trained, setup):
    _, meta = trained
    roots = {str(Path(setup["root"])), str(Path(setup["root"]).resolve()), str(Path.home())}
    leaks = {k: v for k, v in meta.items() for r in roots if r in v}
    assert leaks == {}


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)


def test_tag_frequency_dirs_and_buckets_of_a_hand_made_dataset(tmp_path):
    # dataset 1: "chars" (3 images, 2 repeats), a second folder also named "chars", a reg folder;
    # dataset 2: a metadata_file subset (kohya counts its entries' tags only)
    a, b, reg = tmp_path / "one" / "chars", tmp_path / "two" / "chars", tmp_path / "reg"
    _image(a / "i0.png", (64, 64))
    (a / "i0.txt").write_text("1girl, Solo,  smile\nsecond line, not counted")
    _image(a / "i1.png", (96, 64))
    (a / "i1.txt").write_text("1girl, blue hair,, SOLO")
    _image(a / "i2.png", (64, 96))  # no caption file: the class tokens are its caption
    _image(b / "j0.png", (64, 64))
    (b / "j0.txt").write_text("Smile")
    _image(reg / "r0.png", (64, 64))
    (reg / "r0.txt").write_text("person")
    meta_dir = tmp_path / "ft"
    _image(meta_dir / "m0.png", (64, 64))
    _image(meta_dir / "m1.png", (64, 64))
    (meta_dir / "meta.json").write_text(json.dumps({"m0": {"caption": "not counted", "tags": "Tag A, tag b"},
                                                    "m1": {"caption": "only a caption"}}))
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""[general]
caption_extension = ".txt"
enable_bucket = true
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
batch_size = 1

[[datasets]]
  [[datasets.subsets]]
  image_dir = {json.dumps(str(a))}
  num_repeats = 2
  class_tokens = "sks, Person"
  [[datasets.subsets]]
  image_dir = {json.dumps(str(b))}
  [[datasets.subsets]]
  image_dir = {json.dumps(str(reg))}
  is_reg = true

[[datasets]]
  [[datasets.subsets]]
  image_dir = {json.dumps(str(meta_dir))}
  metadata_file = {json.dumps(str(meta_dir / "meta.json"))}
""")
    ds = build_dataset(load_dataset_config(toml))
    meta = dataset_metadata(ds)
    # hand count (kohya's set_tag_frequency: first caption line, split at ",", stripped, lower-cased)
    assert json.loads(meta["ss_tag_frequency"]) == {
        "chars": {"1girl": 2, "solo": 2, "smile": 2, "blue hair": 1, "sks": 1, "person": 1},
        "reg": {"person": 1},
        "meta.json": {"tag a": 1, "tag b": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"chars": {"n_repeats": 2, "img_count": 3},
                                                  "chars (2)": {"n_repeats": 1, "img_count": 1},
                                                  "meta.json": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 1}}
    # kohya counts images x repeats, the reg images before they are balanced against the 7 training items
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == (3 * 2 + 1 + 2, 1)
    first, second = json.loads(meta["ss_datasets"])
    assert (first["is_dreambooth"], second["is_dreambooth"]) == (True, False)
    assert [(s["image_dir"], s["img_count"], s["is_reg"], s["class_tokens"]) for s in first["subsets"]] == [
        ("chars", 3, False, "sks, Person"), ("chars", 1, False, None), ("reg", 1, True, None)]
    assert second["subsets"][0]["metadata_file"] == "meta.json" and "is_reg" not in second["subsets"][0]
    # buckets of dataset 1: 96x64 -> 80x48 (aspect error 5/3 - 3/2), 64x96 -> 48x80 (|3/5 - 2/3|), the rest
    # 64x64; counts with repeats, the reg image balanced to 7 repeats (kohya counts after balancing)
    info = first["bucket_info"]
    assert info["buckets"] == {"0": {"resolution": [48, 80], "count": 2}, "1": {"resolution": [64, 64],
                               "count": 2 + 1 + 7}, "2": {"resolution": [80, 48], "count": 2}}
    assert info["mean_img_ar_error"] == pytest.approx((5 / 3 - 3 / 2 + 2 / 3 - 3 / 5) / 5)
    assert json.loads(meta["ss_bucket_info"])["buckets"]["1"] == {"resolution": [64, 64], "count": 12}  # merged
    assert all(str(tmp_path) not in str(v) for v in meta.values())


def test_inspect_prints_the_metadata_sections(trained):
    path, meta = trained
    report = inspect_network(path)
    text = format_report(report)
    assert "  metadata:" in text
    assert "    training: output_name=demo_lora; network_module=networks.lora_anima;" in text
    assert "    dataset dirs: images (4 images x 1 repeats)" in text
    assert "    tags in images (4 distinct): " in text
    assert f"    hash sshs_model_hash: {meta['sshs_model_hash']} [ok]" in text
    assert f"    hash sshs_legacy_hash: {meta['sshs_legacy_hash']} [ok]" in text
    assert "    modelspec: " in text and "architecture=anima-preview/lora" in text
    json.dumps(report)  # --json output stays serialisable


def test_converted_file_gets_its_own_hashes(trained, tmp_path):
    from anima_trainer.cli import main
    from anima_trainer.networks.hashes import verify_hashes

    path, meta = trained
    kohya = tmp_path / "kohya.safetensors"
    assert main(["convert-network", str(path), str(kohya), "--to", "kohya"]) == 0
    assert verify_hashes(kohya) == {"sshs_model_hash": "ok", "modelspec.hash_sha256": "ok", "sshs_legacy_hash": "ok"}
    back = tmp_path / "back.safetensors"
    assert main(["convert-network", str(kohya), str(back), "--to", "comfy"]) == 0
    assert _metadata(back)["sshs_model_hash"] == meta["sshs_model_hash"]  # same tensors, same names: same hash
