"""Bad-input corpus (issue 9): a valid tiny setup (the demo's models, a 4-image shapes dataset, kohya
train.toml + dataset.toml) is corrupted one way per entry and run through the user-facing path,
`anima-trainer train --config_file train.toml` (`cli.main`).  Every entry must stop at START-UP with exit
code 2 and an `error:` message naming the key or flag, the file, the reason and (where there is one) the
fix: never a traceback, a hang, a training step or an output file.

Each entry = (id, how to corrupt the setup, regexes the message must all match).  `training_step` is
replaced by a function that fails the test, so a bad input that reaches training cannot pass.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import shutil
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import anima_trainer.train.loop as loop
from anima_trainer import cli
from anima_trainer.config import TrainConfig
from anima_trainer.demo import write_demo_models, write_shapes_dataset
from anima_trainer.models import load_dit
from anima_trainer.networks import create_network

START_UP_SECONDS = 60  # generous for 2 shared CPU cores; a start-up failure takes a few seconds
HANG_GUARD_SECONDS = 180  # SIGALRM: a hang (e.g. reading a FIFO) fails the test instead of blocking CI


# --- the valid setup ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Read-only files shared by all entries: the demo models, images, and adapter files of this and of
    other models."""
    root = tmp_path_factory.mktemp("badinput_base")
    files: dict[str, Path] = dict(write_demo_models(root / "models", seed=0))
    files["images"] = write_shapes_dataset(root / "images", count=4, seed=0)
    dit = load_dit(files["dit"], dtype=torch.float32)
    for algo, name in (("lora", "lora_dim4"), ("lokr", "lokr")):
        net = create_network(dit, algo=algo, dim=4, alpha=4.0)
        files[algo] = net.save(root / f"{name}.safetensors")
        net.remove()
    # the same LoRA for a DiT twice as wide (every in/out width of 64 doubled): another Anima size
    wide = {}
    for key, t in load_file(files["lora"]).items():
        if key.endswith(".lora_down.weight") and t.shape[1] == 64:
            t = torch.cat([t, t], dim=1)
        elif key.endswith(".lora_up.weight") and t.shape[0] == 64:
            t = torch.cat([t, t], dim=0)
        wide[key] = t.contiguous()
    save_file(wide, root / "lora_wide.safetensors")
    files["lora_wide"] = root / "lora_wide.safetensors"
    # an SDXL LoRA in kohya's names
    sdxl_lora = {}
    for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out",
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        sdxl_lora[f"{name}.lora_down.weight"] = torch.zeros(4, 320)
        sdxl_lora[f"{name}.lora_up.weight"] = torch.zeros(320, 4)
        sdxl_lora[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(sdxl_lora, root / "sdxl_lora.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    files["sdxl_lora"] = root / "sdxl_lora.safetensors"
    # checkpoints of other model families (key sets as in the real files)
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}, root / "sdxl.safetensors")
    files["sdxl"] = root / "sdxl.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2),
               "single_blocks.0.linear1.weight": torch.zeros(2, 2)}, root / "flux.safetensors")
    files["flux"] = root / "flux.safetensors"
    return files


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_lines(table: dict[str, Any]) -> str:
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())


@dataclass
class Setup:
    """One entry's copy of the valid setup; entries edit the dicts (or replace a file's text) before it is
    written."""

    root: Path
    files: dict[str, Path]
    train: dict[str, Any] = field(default_factory=dict)
    general: dict[str, Any] = field(default_factory=dict)
    subset: dict[str, Any] = field(default_factory=dict)
    train_text: str | None = None
    dataset_text: str | None = None
    argv: list[str] = field(default_factory=list)
    after_write: list[Callable[[Setup], None]] = field(default_factory=list)

    @property
    def train_toml(self) -> Path:
        return self.root / "train.toml"

    @property
    def dataset_toml(self) -> Path:
        return self.root / "dataset.toml"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def output(self) -> Path:
        return self.root / "output"

    def write(self) -> None:
        self.train_toml.write_text(self.train_text if self.train_text is not None else
                                   "[training]\n" + toml_lines(self.train), encoding="utf-8")
        self.dataset_toml.write_text(self.dataset_text if self.dataset_text is not None else
                                     "[general]\n" + toml_lines(self.general) + "\n[[datasets]]\n"
                                     "  [[datasets.subsets]]\n" + toml_lines(self.subset), encoding="utf-8")
        for fn in self.after_write:
            fn(self)


def make_setup(root: Path, files: dict[str, Path]) -> Setup:
    shutil.copytree(files["images"], root / "images")
    s = Setup(root, files)
    s.train = {
        "pretrained_model_name_or_path": files["dit"], "qwen3": files["qwen3"], "vae": files["vae"],
        "qwen3_tokenizer_path": files["tokenizers"] / "qwen", "t5_tokenizer_path": files["tokenizers"] / "t5",
        "network_module": "networks.lora_anima", "network_dim": 4, "network_alpha": 4,
        "dataset_config": s.dataset_toml, "output_dir": s.output, "output_name": "bad_lora",
        "learning_rate": 1e-3, "max_train_steps": 2, "train_batch_size": 4, "seed": 0,
        "max_data_loader_n_workers": 0, "log_with": "none",
    }
    if "auto_download_t5_tokenizer" in TrainConfig.model_fields:
        s.train["auto_download_t5_tokenizer"] = False  # offline: a missing tokenizer is an error, not a download
    s.general = {"caption_extension": ".txt", "enable_bucket": True, "resolution": 64, "min_bucket_reso": 32,
                 "max_bucket_reso": 128, "bucket_reso_steps": 16}
    s.subset = {"image_dir": s.images, "num_repeats": 1}
    return s


class StepReached(BaseException):  # not an Exception: cli.main reports every Exception as an error line
    pass


def run_train(s: Setup, monkeypatch, capsys, *, step_ok: bool = False) -> tuple[int, str, float]:
    """cli.main(["train", "--config_file", ...]) → (exit code, stderr, seconds).  A training step fails the
    test (or, with `step_ok`, ends the run with StepReached)."""

    def no_training_step(*args, **kwargs):
        if step_ok:
            raise StepReached
        pytest.fail("a training step ran: the bad input was not caught at start-up")

    def hang(signum, frame):
        raise TimeoutError(f"no answer after {HANG_GUARD_SECONDS} s: start-up hangs")

    monkeypatch.setattr(loop, "training_step", no_training_step)
    s.write()
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(HANG_GUARD_SECONDS)
    t0 = time.monotonic()
    try:
        rc = cli.main(["train", "--config_file", str(s.train_toml), *s.argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - t0
    return rc, capsys.readouterr().err, elapsed


def error_message(stderr: str) -> str:
    """The text after `error: ` (the one message cli.main prints for a user error)."""
    assert stderr.count("error: ") >= 1, f"no 'error:' line in stderr:\n{stderr}"
    return stderr[stderr.rindex("error: ") + len("error: "):].strip()


# --- corruptions ------------------------------------------------------------------------------------------

def train(**kv: Any) -> Callable[[Setup], None]:
    return lambda s: s.train.update(kv)


def general(**kv: Any) -> Callable[[Setup], None]:
    return lambda s: s.general.update(kv)


def subset(**kv: Any) -> Callable[[Setup], None]:
    return lambda s: s.subset.update(kv)


def model(flag: str, name: str) -> Callable[[Setup], None]:
    """Point a model flag at one of the shared files (`base`)."""
    return lambda s: s.train.update({flag: s.files[name]})


def both(*fns: Callable[[Setup], None]) -> Callable[[Setup], None]:
    def run(s: Setup) -> None:
        for fn in fns:
            fn(s)
    return run


def derived(flag: str, source: str, name: str, make: Callable[[bytes], bytes]) -> Callable[[Setup], None]:
    """Write `make(bytes of the shared file source)` as `name` in the entry's folder and point `flag` at it."""
    def run(s: Setup) -> None:
        path = s.root / name
        path.write_bytes(make(s.files[source].read_bytes()))
        s.train[flag] = path
    return run


def header_size(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def cut_in_data(data: bytes) -> bytes:
    start = 8 + header_size(data)
    return data[: start + (len(data) - start) // 2]


def cut_in_header(data: bytes) -> bytes:
    return data[: 8 + header_size(data) // 2]


def garbage_header(data: bytes) -> bytes:
    n = header_size(data)
    return data[:8] + b"{\"net.x\": {\"dtype\": \"F32\", \"sha\x00\xff" + b" " * (n - 31) + data[8 + n:]


def header_past_eof(data: bytes) -> bytes:
    return struct.pack("<Q", len(data) * 3) + data[8:]


def json_header(header: Any) -> Callable[[bytes], bytes]:
    def make(_: bytes) -> bytes:
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + b"\x00" * 16
    return make


def not_a_file(flag: str, name: str, kind: str) -> Callable[[Setup], None]:
    """`flag` points at something that exists but cannot be read as a file: `chmod 000` (a directory where a
    file is expected when running as root, for which permissions do not apply) or a FIFO (reading it would
    block forever)."""
    def run(s: Setup) -> None:
        path = s.root / name
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        else:
            path.write_bytes(b"\x00" * 64)
            path.chmod(0)
            if os.access(path, os.R_OK):  # root: chmod 000 does not stop reading
                path.unlink()
                path.mkdir()
        s.train[flag] = path
    return run


def unreadable_dataset_toml(kind: str) -> Callable[[Setup], None]:
    def run(s: Setup) -> None:
        path = s.root / f"dataset_{kind}.toml"
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
        s.train["dataset_config"] = path
    return run


def empty_image_dir(s: Setup) -> None:
    folder = s.root / "no_images"
    folder.mkdir()
    (folder / "notes.txt").write_text("captions without images", encoding="utf-8")
    (folder / "photo.gif").write_bytes(b"GIF89a")  # not one of kohya's image extensions
    s.subset["image_dir"] = folder


def corrupt_all_images(s: Setup) -> None:
    def run(s: Setup) -> None:
        for png in s.images.glob("*.png"):
            png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    s.after_write.append(run)


def damage_inside_png_data(path: Path) -> None:
    """Overwrite bytes inside the zlib stream of a PNG, keeping its length and end marker: only decoding finds it."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=0)
    png = bytearray(buf.getvalue())
    start = png.index(b"IDAT") + 4
    png[start + 2: start + 400] = b"\xff" * 398
    path.write_bytes(bytes(png))


def metadata_escaping(s: Setup) -> None:
    """A fine-tuning subset whose metadata_file lists `../outside.png`: a file outside image_dir."""
    shutil.copy(s.images / "shape_00.png", s.root / "outside.png")
    meta = {"shape_01.png": {"caption": "a green square"}, "../outside.png": {"caption": "escaped"}}
    (s.root / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    s.subset = {"image_dir": s.images, "metadata_file": s.root / "meta.json"}


def metadata_missing_file(s: Setup) -> None:
    s.subset = {"image_dir": s.images, "metadata_file": s.root / "absent_meta.json"}


def nested_escape(s: Setup) -> None:
    """`sub/../../outside.png`: the escape hidden behind a folder that exists."""
    (s.images / "sub").mkdir()
    shutil.copy(s.images / "shape_00.png", s.root / "outside.png")
    meta = {"shape_01.png": {"caption": "a green square"}, "sub/../../outside.png": {"caption": "escaped"}}
    (s.root / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    s.subset = {"image_dir": s.images, "metadata_file": s.root / "meta.json"}


def config_file_replaced(kind: str) -> Callable[[Setup], None]:
    """train.toml itself is a folder or a FIFO (after the setup is written)."""
    def run(s: Setup) -> None:
        def replace(s: Setup) -> None:
            s.train_toml.unlink()
            os.mkfifo(s.train_toml) if kind == "fifo" else s.train_toml.mkdir()
        s.after_write.append(replace)
    return run


def caption_is_a_folder(s: Setup) -> None:
    def run(s: Setup) -> None:
        (s.images / "shape_02.txt").unlink()
        (s.images / "shape_02.txt").mkdir()
    s.after_write.append(run)


def malformed_toml(s: Setup) -> None:
    s.train_text = "[training]\n" + toml_lines(s.train) + "network_dim = = 8\n"


def malformed_dataset_toml(s: Setup) -> None:
    s.dataset_text = "[general]\nresolution = 64\n[[datasets]\n"


def not_utf8_toml(s: Setup) -> None:
    s.train_text = "[training]\n" + toml_lines(s.train) + "output_name = \"caf\xe9\"\n"

    def run(s: Setup) -> None:
        s.train_toml.write_bytes(s.train_toml.read_text(encoding="utf-8").encode("latin-1"))
    s.after_write.append(run)


def nested_table(s: Setup) -> None:
    s.train_text = "[training]\n" + toml_lines(s.train) + "[training.optimizer]\nlearning_rate = 1e-4\n"


# --- the corpus ---------------------------------------------------------------------------------------------
# Each message must name the key (or flag), the file where one is involved, the reason, and the fix where the
# reason alone does not say it.

TOML = r"train\.toml"
DS = r"dataset\.toml"

CORPUS: list[tuple[str, Callable[[Setup], None], tuple[str, ...]]] = [
    # malformed TOML
    ("toml_syntax", malformed_toml, (r"config_file", TOML, r"not valid TOML", r"line \d+")),
    ("dataset_toml_syntax", malformed_dataset_toml, (r"dataset", DS, r"not valid TOML", r"line \d+")),
    ("toml_not_utf8", not_utf8_toml, (r"config_file", TOML, r"not valid TOML", r"position \d+", r"save it as UTF-8")),
    ("toml_nested_table", nested_table, (r"'optimizer'", TOML, r"only one level of tables")),
    # wrong types
    ("type_network_dim_string", train(network_dim="big"), (r"network_dim", TOML, r"expected an integer, got 'big'")),
    ("type_lr_string", train(learning_rate="fast"), (r"learning_rate", TOML, r"expected a number, got 'fast'")),
    ("type_bool_string", train(gradient_checkpointing="maybe"),
     (r"gradient_checkpointing", TOML, r"expected true or false, got 'maybe'")),
    ("type_float_for_int", train(max_train_steps=2.5), (r"max_train_steps", TOML, r"expected an integer, got 2\.5")),
    ("type_network_args_int", train(network_args=5), (r"network_args", TOML, r"key=value")),
    ("type_dataset_batch_size_string", general(batch_size="4"),
     (r"'batch_size'", r"\[general\]", DS, r"valid integer", r"str '4'")),
    ("type_dataset_resolution", general(resolution="64"), (r"'resolution'", DS, r"\[width, height\]")),
    # unknown keys
    ("unknown_key", train(learning_rat=1e-4), (r"unknown key 'learning_rat'", TOML, r"did you mean 'learning_rate'")),
    ("unknown_dataset_key", general(resolutoin=64),
     (r"unknown dataset option 'resolutoin'", r"\[general\]", DS, r"did you mean 'resolution'")),
    ("unknown_subset_key", subset(image_dri="x"),
     (r"'image_dri'", r"\[\[datasets.subsets\]\]", DS, r"did you mean 'image_dir'")),
    ("unknown_flag", lambda s: s.argv.extend(["--network_dimm", "8"]),
     (r"unknown option '--network_dimm'", r"did you mean '--network_dim'")),
    # out-of-range values
    ("network_dim_negative", train(network_dim=-4), (r"network_dim", TOML, r"must be >= 1, got -4")),
    ("network_dim_negative_on_command_line", lambda s: s.argv.extend(["--network_dim", "-4"]),
     (r"^network_dim: must be >= 1, got '-4'$",)),  # the command line wins over the TOML: no file is named
    ("network_dim_zero", train(network_dim=0), (r"network_dim", TOML, r"must be >= 1, got 0")),
    ("learning_rate_zero", train(learning_rate=0.0), (r"learning_rate", TOML, r"must be > 0\.0, got 0\.0")),
    ("learning_rate_negative", train(learning_rate=-1e-4), (r"learning_rate", TOML, r"must be > 0\.0, got -0\.0001")),
    ("unet_lr_zero", train(unet_lr=0), (r"unet_lr", TOML, r"must be > 0\.0, got 0")),
    ("learning_rate_nan", train(learning_rate=float("nan")), (r"learning_rate", TOML, r"finite number, got nan")),
    ("learning_rate_inf", train(learning_rate=float("inf")), (r"learning_rate", TOML, r"finite number, got inf")),
    ("train_batch_size_zero", train(train_batch_size=0), (r"train_batch_size", TOML, r"must be >= 1, got 0")),
    ("dataset_batch_size_zero", general(batch_size=0),
     (r"'batch_size'", r"\[general\]", DS, r"greater than or equal to 1", r"int 0")),
    ("max_train_steps_zero", train(max_train_steps=0), (r"max_train_steps", TOML, r"must be >= 1, got 0")),
    ("gradient_accumulation_zero", train(gradient_accumulation_steps=0),
     (r"gradient_accumulation_steps", TOML, r"must be >= 1, got 0")),
    ("network_dropout_one", train(network_dropout=1.0), (r"network_dropout", TOML, r"must be < 1\.0, got 1\.0")),
    ("seed_negative", train(seed=-1), (r"seed", TOML, r"must be >= 0, got -1")),
    ("network_dim_huge", train(network_dim=2**63 - 1),
     (r"network_dim", r"dim 9223372036854775807 is larger than the rank", r"use a dim <= 64")),
    ("dataset_resolution_zero", general(resolution=0), (r"'resolution'", DS, r"must be positive")),
    ("dataset_bucket_steps", general(bucket_reso_steps=10),
     (r"'bucket_reso_steps'", DS, r"multiple of 16", r"try 16 or 64")),
    ("caption_dropout_rate_range", subset(caption_dropout_rate=1.5),
     (r"'caption_dropout_rate'", DS, r"between 0 and 1, got 1\.5")),
    # contradictory options
    ("cache_latents_with_random_crop", both(train(cache_latents=True), subset(random_crop=True)),
     (r"cache_latents", r"random_crop", r"turn the latent cache or those options off")),
    ("schedule_free_with_cosine", train(optimizer_type="RAdamScheduleFree", lr_scheduler="cosine"),
     (r"optimizer_type", TOML, r"schedule-free", r"lr_scheduler = \"constant\"", r"got lr_scheduler = 'cosine'")),
    ("validate_without_split", train(validate_every_n_steps=10),
     (r"validate_every_n_steps", r"no validation images", r"set validation_split")),
    ("cache_adapter_outputs_with_train_adapter",
     train(cache_llm_adapter_outputs=True, network_args=["train_llm_adapter=True"]),
     (r"cache_llm_adapter_outputs", r"train_llm_adapter", r"cannot be cached", r"turn one of them off")),
    ("dim_from_weights_without_weights", train(dim_from_weights=True),
     (r"dim_from_weights", TOML, r"needs network_weights")),
    ("two_legacy_optimizers", train(use_8bit_adam=True, use_lion_optimizer=True),
     (r"use_8bit_adam and use_lion_optimizer", TOML, r"only one of them")),
    ("warmup_with_constant", train(lr_warmup_steps=10, max_train_steps=100),
     (r"lr_warmup_steps", TOML, r"'constant' scheduler has no warm-up", r"constant_with_warmup")),
    ("lycoris_without_algo", train(network_module="lycoris.kohya"),
     (r"network_module", TOML, r"algo=lokr or algo=loha")),
    # missing files
    ("config_file_missing", lambda s: s.after_write.append(lambda s: s.train_toml.unlink()),
     (r"config_file", TOML, r"not found")),
    ("dataset_config_missing", train(dataset_config="absent_dataset.toml"),
     (r"dataset_config", r"absent_dataset\.toml", r"does not exist")),
    ("dit_missing", train(pretrained_model_name_or_path="absent_dit.safetensors"),
     (r"pretrained_model_name_or_path", r"absent_dit\.safetensors", r"no such file")),
    ("qwen3_missing", train(qwen3="absent_qwen3.safetensors"), (r"qwen3", r"absent_qwen3\.safetensors")),
    ("vae_missing", train(vae="absent_vae.safetensors"), (r"--vae", r"absent_vae\.safetensors", r"no such file")),
    ("llm_adapter_missing", train(llm_adapter_path="absent_adapter.safetensors"),
     (r"llm_adapter_path", r"absent_adapter\.safetensors", r"no such file")),
    ("network_weights_missing", train(network_weights="absent_lora.safetensors"),
     (r"absent_lora\.safetensors", r"does not exist")),
    ("qwen_tokenizer_missing", train(qwen3_tokenizer_path="absent_tokenizer"),
     (r"qwen3_tokenizer_path", r"absent_tokenizer does not exist", r"vocab\.json", r"point qwen3_tokenizer_path at")),
    ("image_dir_missing", subset(image_dir="absent_images"),
     (r"image_dir absent_images", r"\[\[datasets.subsets\]\] #1", r"is not a folder", r"looked for .*absent_images")),
    ("metadata_file_missing", metadata_missing_file,
     (r"metadata_file", r"absent_meta\.json", r"\[\[datasets.subsets\]\] #1", r"is not a file")),
    # unreadable files
    ("dit_unreadable", not_a_file("pretrained_model_name_or_path", "dit_000.safetensors", "chmod"),
     (r"pretrained_model_name_or_path", r"dit_000\.safetensors", r"is a folder|cannot be read")),
    ("dit_is_a_folder", not_a_file("pretrained_model_name_or_path", "dit_dir.safetensors", "dir"),
     (r"pretrained_model_name_or_path", r"dit_dir\.safetensors", r"is a folder", r"pass the \.safetensors file")),
    ("dit_is_a_fifo", not_a_file("pretrained_model_name_or_path", "dit_fifo.safetensors", "fifo"),
     (r"pretrained_model_name_or_path", r"dit_fifo\.safetensors", r"not a regular file", r"pass a \.safetensors")),
    ("vae_is_a_fifo", not_a_file("vae", "vae_fifo.safetensors", "fifo"),
     (r"--vae", r"vae_fifo\.safetensors", r"not a regular file")),
    ("network_weights_unreadable", not_a_file("network_weights", "lora_000.safetensors", "chmod"),
     (r"network file .*lora_000\.safetensors (is a folder|cannot be read)",)),
    ("network_weights_is_a_fifo", not_a_file("network_weights", "lora_fifo.safetensors", "fifo"),
     (r"network file .*lora_fifo\.safetensors is not a regular file",)),
    ("config_file_is_a_folder", config_file_replaced("dir"), (r"config_file", TOML, r"is a folder, not a TOML file")),
    ("config_file_is_a_fifo", config_file_replaced("fifo"), (r"config_file", TOML, r"is not a regular file")),
    ("caption_file_is_a_folder", caption_is_a_folder,
     (r"\[\[datasets.subsets\]\] #1", r"1 image\(s\) have no caption file \(\.txt\)", r"shape_02\.png",
      r"class_tokens")),
    ("dataset_config_is_a_folder", unreadable_dataset_toml("dir"),
     (r"dataset_config", r"dataset_dir\.toml", r"is a folder, not a TOML file")),
    ("dataset_config_is_a_fifo", unreadable_dataset_toml("fifo"),
     (r"dataset_config", r"dataset_fifo\.toml", r"not a file")),
    # truncated / header-corrupt safetensors
    ("dit_truncated_in_data", derived("pretrained_model_name_or_path", "dit", "cut_data.safetensors", cut_in_data),
     (r"pretrained_model_name_or_path", r"cut_data\.safetensors", r"truncated", r"describes \d+ bytes of tensor "
      r"data, the file holds \d+", r"get the file again")),
    ("dit_truncated_in_header",
     derived("pretrained_model_name_or_path", "dit", "cut_header.safetensors", cut_in_header),
     (r"pretrained_model_name_or_path", r"cut_header\.safetensors", r"header length \d+ points past the end",
      r"truncated", r"download or copy it again")),
    ("dit_garbage_header", derived("pretrained_model_name_or_path", "dit", "garbage.safetensors", garbage_header),
     (r"pretrained_model_name_or_path", r"garbage\.safetensors", r"bad header")),
    ("dit_header_past_eof", derived("pretrained_model_name_or_path", "dit", "past_eof.safetensors", header_past_eof),
     (r"pretrained_model_name_or_path", r"past_eof\.safetensors", r"header length \d+ points past the end of the "
      r"file \(\d+ bytes\)")),
    ("dit_header_not_an_object",
     derived("pretrained_model_name_or_path", "dit", "list_header.safetensors", json_header([1, 2, 3])),
     (r"pretrained_model_name_or_path", r"list_header\.safetensors", r"bad header \(a JSON list, not an object\)")),
    ("dit_header_bad_entry",
     derived("pretrained_model_name_or_path", "dit", "bad_entry.safetensors",
             json_header({"net.blocks.0.x": {"dtype": "F32"}})),
     (r"pretrained_model_name_or_path", r"bad_entry\.safetensors", r"bad header", r"net\.blocks\.0\.x")),
    ("dit_trailing_garbage", derived("pretrained_model_name_or_path", "dit", "trailing.safetensors",
                                     lambda d: d + b"\x00" * 100),
     (r"pretrained_model_name_or_path", r"trailing\.safetensors", r"is corrupt: 100 bytes follow",
      r"get the file again")),
    ("dit_without_tensors", derived("pretrained_model_name_or_path", "dit", "none.safetensors", json_header({})),
     (r"pretrained_model_name_or_path", r"none\.safetensors", r"is corrupt|no tensors")),
    ("dit_empty_file", derived("pretrained_model_name_or_path", "dit", "empty.safetensors", lambda d: b""),
     (r"pretrained_model_name_or_path", r"empty\.safetensors", r"not a safetensors file \(too short: 0 bytes\)")),
    ("dit_pickle", derived("pretrained_model_name_or_path", "dit", "model.ckpt", lambda d: b"\x80\x04\x95" + d[:64]),
     (r"pretrained_model_name_or_path", r"model\.ckpt", r"not a safetensors file", r"convert")),
    ("qwen3_truncated_in_data", derived("qwen3", "qwen3", "qwen_cut.safetensors", cut_in_data),
     (r"qwen3", r"qwen_cut\.safetensors", r"truncated")),
    ("vae_truncated_in_data", derived("vae", "vae", "vae_cut.safetensors", cut_in_data),
     (r"--vae", r"vae_cut\.safetensors", r"truncated")),
    ("network_weights_truncated", derived("network_weights", "lora", "lora_cut.safetensors", cut_in_data),
     (r"network file .*lora_cut\.safetensors is truncated", r"get the file again")),
    # a file of the wrong model family for each model flag
    ("vae_as_dit", model("pretrained_model_name_or_path", "vae"),
     (r"--pretrained_model_name_or_path expects an Anima DiT", r"tiny_vae\.safetensors", r"Qwen-Image / Wan 2\.1 VAE")),
    ("qwen3_as_dit", model("pretrained_model_name_or_path", "qwen3"),
     (r"--pretrained_model_name_or_path expects an Anima DiT", r"tiny_qwen3\.safetensors", r"Qwen3-0\.6B")),
    ("lora_as_dit", model("pretrained_model_name_or_path", "lora"),
     (r"--pretrained_model_name_or_path expects", r"lora_dim4\.safetensors", r"LoRA")),
    ("sdxl_as_dit", model("pretrained_model_name_or_path", "sdxl"),
     (r"--pretrained_model_name_or_path expects", r"sdxl\.safetensors", r"Stable Diffusion XL")),
    ("flux_as_dit", model("pretrained_model_name_or_path", "flux"),
     (r"--pretrained_model_name_or_path expects", r"flux\.safetensors", r"Flux")),
    ("dit_as_qwen3", model("qwen3", "dit"), (r"--qwen3 expects", r"tiny_anima_dit\.safetensors", r"Anima DiT")),
    ("vae_as_qwen3", model("qwen3", "vae"), (r"--qwen3 expects", r"tiny_vae\.safetensors", r"VAE")),
    ("flux_as_qwen3", model("qwen3", "flux"), (r"--qwen3 expects", r"flux\.safetensors", r"Flux")),
    ("lora_as_vae", model("vae", "lora"), (r"--vae expects", r"lora_dim4\.safetensors", r"LoRA")),
    ("dit_as_vae", model("vae", "dit"), (r"--vae expects", r"tiny_anima_dit\.safetensors", r"Anima DiT")),
    ("sdxl_as_vae", model("vae", "sdxl"), (r"--vae expects", r"sdxl\.safetensors", r"Stable Diffusion XL")),
    ("vae_as_llm_adapter", model("llm_adapter_path", "vae"),
     (r"--llm_adapter_path expects", r"tiny_vae\.safetensors", r"VAE")),
    ("dit_as_network_weights", model("network_weights", "dit"), (r"tiny_anima_dit\.safetensors",)),
    ("vae_as_network_weights", model("network_weights", "vae"), (r"tiny_vae\.safetensors",)),
    # a LoRA trained for another model (or another network) as network_weights
    ("sdxl_lora_as_network_weights", model("network_weights", "sdxl_lora"),
     (r"sdxl_lora\.safetensors", r"lora_unet_down_blocks_0", r"no module of this DiT")),
    ("sdxl_lora_dim_from_weights", both(model("network_weights", "sdxl_lora"), train(dim_from_weights=True)),
     (r"sdxl_lora\.safetensors", r"lora_unet_down_blocks_0", r"no module of this DiT")),
    ("wide_anima_lora", model("network_weights", "lora_wide"),
     (r"lora_wide\.safetensors", r"blocks\.0\.self_attn\.q_proj", r"down \(4, 128\) / up \(128, 4\) do not fit "
      r"Linear\(64->64\)")),
    ("wide_anima_lora_dim_from_weights", both(model("network_weights", "lora_wide"), train(dim_from_weights=True)),
     (r"lora_wide\.safetensors", r"128")),
    ("lora_of_other_dim", both(model("network_weights", "lora"), train(network_dim=8)),
     (r"lora_dim4\.safetensors", r"file has dim \(rank\) 4, network has dim 8", r"create the network with dim=4")),
    ("lokr_as_lora_weights", model("network_weights", "lokr"), (r"lokr\.safetensors", r"not lora weights")),
    ("lokr_dim_from_weights_as_lora", both(model("network_weights", "lokr"), train(dim_from_weights=True)),
     (r"dim_from_weights", r"lokr\.safetensors", r"is a lokr network but network_module is lora")),
    # datasets
    ("dataset_without_images", empty_image_dir,
     (r"\[\[datasets.subsets\]\] #1", r"no images", r"\.png", r"no_images")),
    ("corrupt_image_with_latent_cache",
     both(train(cache_latents=True), lambda s: s.after_write.append(lambda s: damage_inside_png_data(
         s.images / "shape_01.png"))),
     (r"cannot decode image .*shape_01\.png", r"broken data stream", r"remove or re-export the file")),
    ("dataset_all_images_corrupt", corrupt_all_images,
     (r"\[\[datasets.subsets\]\] #1", r"no usable images", r"shape_00\.png")),
    ("metadata_escapes_dataset_root", metadata_escaping,
     (r"metadata_file .*meta\.json", r"'\.\./outside\.png' \(.*meta\.json:\d+\)", r"lead outside image_dir .*images",
      r"move the images into image_dir, or write absolute paths")),
    ("metadata_escape_behind_folder", nested_escape,
     (r"meta\.json", r"'sub/\.\./\.\./outside\.png'", r"lead outside image_dir")),
]


@pytest.mark.parametrize("corrupt, expected", [pytest.param(c, e, id=i) for i, c, e in CORPUS])
def test_bad_input_stops_at_start_up(base, tmp_path, monkeypatch, capsys, corrupt, expected):
    s = make_setup(tmp_path, base)
    corrupt(s)
    rc, err, elapsed = run_train(s, monkeypatch, capsys)
    assert "Traceback" not in err, err
    assert rc == 2, err
    msg = error_message(err)
    missing = [p for p in expected if not re.search(p, msg)]
    assert not missing, f"message {msg!r} does not match {missing}"
    assert elapsed < START_UP_SECONDS
    assert not list(s.output.rglob("*.safetensors")), "a network file was written"


def test_corpus_ids_are_unique():
    ids = [i for i, _, _ in CORPUS]
    assert len(ids) == len(set(ids))


def test_the_valid_setup_reaches_training(base, tmp_path, monkeypatch, capsys):
    """The corpus corrupts a setup that is otherwise fine: uncorrupted, it gets to the first training step."""
    s = make_setup(tmp_path, base)
    with pytest.raises(StepReached):
        run_train(s, monkeypatch, capsys, step_ok=True)


def test_corrupt_image_is_reported_and_skipped(base, tmp_path, monkeypatch, capsys, caplog):
    """Documented behaviour (data/images.py, data/dataset.py): an image that cannot be decoded is skipped at
    start-up with a report naming it and the reason, and training goes on with the others."""
    s = make_setup(tmp_path, base)
    s.after_write.append(lambda s: (s.images / "shape_01.png").write_bytes(
        (s.images / "shape_01.png").read_bytes()[:60]))
    with pytest.raises(StepReached):
        run_train(s, monkeypatch, capsys, step_ok=True)
    report = [line for line in caplog.text.splitlines() if "that cannot be trained on" in line]
    assert len(report) == 1, caplog.text
    assert re.search(r"skipped 1 file\(s\) .*: 1 x truncated or corrupt PNG: \S*shape_01\.png$", report[0]), report


@pytest.mark.parametrize("target, key", [("config_file", r"config_file: "), ("dataset_config", r"dataset_config: "),
                                         ("dit", r"--pretrained_model_name_or_path: "), ("caption", r"caption file ")])
def test_permission_denied_is_a_message(base, tmp_path, monkeypatch, capsys, target, key):
    """EACCES on open (chmod 000 for a normal user; simulated here because root ignores permissions):
    one `error:` line naming the file, exit 2, no traceback."""
    s = make_setup(tmp_path, base)
    denied = {"config_file": s.train_toml, "dataset_config": s.dataset_toml,
              "caption": s.images / "shape_02.txt"}.get(target)
    if target == "dit":
        denied = tmp_path / "dit_copy.safetensors"
        shutil.copy(base["dit"], denied)
        s.train["pretrained_model_name_or_path"] = denied
    real_open, real_io_open = builtins.open, io.open

    def guarded(opener):
        def open_(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file) == denied:
                raise PermissionError(13, "Permission denied", str(file))
            return opener(file, *args, **kwargs)
        return open_

    s.write()
    monkeypatch.setattr(s, "write", lambda: None)
    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_io_open))
    rc, err, _ = run_train(s, monkeypatch, capsys)
    assert "Traceback" not in err, err
    assert rc == 2, err
    msg = error_message(err)
    assert re.search(key + r"\S*" + re.escape(denied.name) + r".* cannot be read: Permission denied", msg), msg
