"""Issue 14 item 7: the compatibility corpus.  Real configs and command lines for kohya's `anima_train_network.py`,
sd-scripts-anima and the GUIs (sources in tests/compat/SOURCES.md and each file's header) train one step
unchanged through the drop-in `anima_train_network.py`, and print a start-up notice for each option listed in
their `<name>.expect.toml`; an entry with `text_encoder = true` there trains text-encoder modules too (kohya's
default), the others do not.

What the harness changes, and only this:
* the `@NAME@` path placeholders (the files keep everything else as found) become the tiny demo models, one shared
  one-image dataset and per-entry output folders (`_paths`);
* the run length: `--max_train_steps 1` is appended to every command line, and `--max_train_epochs 1` where the
  entry sets an epoch count (kohya's `max_train_epochs` overrides `max_train_steps`, so those entries run one
  epoch: num_repeats x one image / batch size steps, at most 10);
* the tokenizers: `--qwen3` is a Hugging Face Qwen3 folder holding the tiny tokenizers (`qwen/`, `t5/`), which
  kohya also accepts for `--qwen3`, so entries that name only the model files need no download;
* the image size, in the copies the harness writes (the stored files keep theirs): `resolution` becomes 64 and the
  bucket range 64-128 in steps of 16 (`_small`), because one step at 1024 px takes ~25 s on two CPU cores even with
  the tiny models.  ANIMA_COMPAT_FULL_SIZE=1 keeps the sizes as found (for a run on a GPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest

from anima_trainer.demo import TINY_QWEN3_SHAPES, write_demo_models, write_shapes_dataset

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "anima_train_network.py"
CORPUS = Path(__file__).resolve().parent / "corpus"
SUPPORT = Path(__file__).resolve().parent / "support"
ENTRIES = sorted(p.name[: -len(".expect.toml")] for p in CORPUS.glob("*.expect.toml"))
ADAPTER_KEY_ENDINGS = (".lora_down.weight", ".lokr_w1", ".hada_w1_a")


def _load_script():
    spec = importlib.util.spec_from_file_location("anima_train_network", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _qwen3_folder(models: dict[str, Path], folder: Path) -> Path:
    """The tiny Qwen3 as a Hugging Face folder (config.json + weights) with the tiny tokenizers under qwen/, t5/."""
    from transformers import Qwen3Config

    folder.mkdir(parents=True)
    config = Qwen3Config(**TINY_QWEN3_SHAPES, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    (folder / "config.json").write_text(config.to_json_string(), encoding="utf-8")
    shutil.copyfile(models["qwen3"], folder / "model.safetensors")
    for sub in ("qwen", "t5"):
        shutil.copytree(models["tokenizers"] / sub, folder / sub)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Built once for the whole corpus: the demo models and one image (kohya layout `img/1_shapes/`) with a mask."""
    from PIL import Image

    root = tmp_path_factory.mktemp("compat")
    models = write_demo_models(root / "models", seed=3)
    images = write_shapes_dataset(root / "img" / "1_shapes", count=1, seed=4)
    (root / "masks").mkdir()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 56, 56))
    mask.save(root / "masks" / "shape_00.png")
    return {"DIT": models["dit"], "VAE": models["vae"], "QWEN3": _qwen3_folder(models, root / "qwen3_hf"),
            "T5_TOKENIZER": models["tokenizers"] / "t5", "IMAGES": images, "TRAIN_DATA_DIR": images.parent,
            "MASKS": root / "masks"}


def _paths(world: dict[str, Path], work: Path, files: dict[str, Path]) -> dict[str, str]:
    paths = {**world, "OUTPUT_DIR": work / "out", "LOGGING_DIR": work / "logs",
             "TOKENIZER_CACHE": work / "tokenizer_cache", **{k.upper(): v for k, v in files.items()}}
    return {k: str(v) for k, v in paths.items()}


def _substitute(text: str, paths: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in paths:
            raise KeyError(f"unknown placeholder @{name}@")
        return json.dumps(paths[name])[1:-1]  # safe inside TOML basic strings and shell quotes

    return re.sub(r"@([A-Z0-9_]+)@", sub, text)


FULL_SIZE = os.environ.get("ANIMA_COMPAT_FULL_SIZE", "") == "1"
SMALL = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 16,
         "min_reso": 64, "max_reso": 128, "reso_step": 16}  # kohya's names and the root-style ones; min 64 >= any step


def _small_value(name: str, value: str) -> str:
    """A size value in its own notation (N, "N", "W,H", [W, H]) with the demo's size."""
    n = str(SMALL[name])
    if value.lstrip().startswith("["):
        return f"[{n}, {n}]"
    if "," in value:
        quote = value.strip()[0] if value.strip()[0] in "'\"" else ""
        return f"{quote}{n},{n}{quote}"
    return re.sub(r"\d+", n, value, count=1)


def _small(text: str) -> str:
    """TOML lines `name = value` for the size keys in SMALL, demo-sized; the rest of the line is kept."""
    keys = "|".join(SMALL)
    pattern = rf"(?m)^(\s*({keys})\s*=\s*)(\[[^\]]*\]|\"[^\"]*\"|'[^']*'|[0-9]+)"
    return text if FULL_SIZE else re.sub(pattern, lambda m: m.group(1) + _small_value(m.group(2), m.group(3)), text)


def _small_tokens(tokens: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(tokens):
        name, eq, value = tokens[i].partition("=")
        key = name[2:] if name.startswith("--") else ""
        if FULL_SIZE or key not in SMALL:
            out.append(tokens[i])
        elif eq:
            out.append(f"{name}={_small_value(key, value)}")
        else:
            out += [name, _small_value(key, tokens[i + 1])]
            i += 1
        i += 1
    return out


def _command_tokens(path: Path, text: str) -> list[str]:
    """A stored command line → its arguments after the script name (launcher tokens dropped)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if path.suffix == ".cmd":  # one argument a line, as a Python argument list shows them
        tokens = [ln.strip() for ln in lines]
    else:
        cont = "`" if path.suffix == ".ps1" else "\\"
        joined = " ".join(ln.rstrip()[:-1] if ln.rstrip().endswith(cont) else ln for ln in lines)
        tokens = shlex.split(joined)
    cut = next(i for i, t in enumerate(tokens) if t.endswith("anima_train_network.py"))
    return tokens[cut + 1:]


def _sets_epochs(texts: list[str], tokens: list[str]) -> bool:
    in_files = any(re.search(r"(?m)^\s*(max_train_epochs|epochs)\s*=", t) for t in texts)
    return in_files or any(t.split("=")[0] == "--max_train_epochs" for t in tokens)


def _adapter_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


@pytest.mark.parametrize("name", ENTRIES)
def test_corpus_entry_trains_one_step_unchanged(name, world, tmp_path, monkeypatch, capfd):
    from anima_trainer.networks.convert import read_network

    expect = tomllib.loads((CORPUS / f"{name}.expect.toml").read_text(encoding="utf-8"))
    files = {k: tmp_path / Path(expect[k]).name for k in ("config_file", "dataset_config") if k in expect}
    paths = _paths(world, tmp_path, files)
    texts = []
    for key, target in files.items():
        text = _small(_substitute((CORPUS / expect[key]).read_text(encoding="utf-8"), paths))
        target.write_text(text, encoding="utf-8")
        texts.append(text)
    command = CORPUS / expect["command"]
    tokens = _small_tokens(_command_tokens(command, _substitute(command.read_text(encoding="utf-8"), paths)))
    argv = tokens + ["--max_train_steps", "1"]
    if _sets_epochs(texts, tokens):
        argv += ["--max_train_epochs", "1"]
    shutil.copytree(SUPPORT / "customized_optimizers", tmp_path / "customized_optimizers")  # a user's own module
    monkeypatch.chdir(tmp_path)  # kohya resolves relative paths against the working directory

    rc = _load_script().main(argv)
    err = capfd.readouterr().err
    assert rc == 0, f"{name}: exit {rc}\n{err[-3000:]}"
    missing = [n for n in expect["notices"] if n not in err]
    assert not missing, f"{name}: no start-up notice naming {missing}\n{err[-3000:]}"
    written = _adapter_files(tmp_path / "out")
    assert written, f"{name}: no adapter file in {tmp_path / 'out'}"
    state, _ = read_network(written[-1])
    assert any(k.endswith(ADAPTER_KEY_ENDINGS) for k in state), sorted(state)[:5]
    # issue 15: kohya trains a text-encoder LoRA unless network_train_unet_only or a text cache (or the
    # sd-scripts-anima flavour) says otherwise; `text_encoder = true` in the expect file marks those entries
    te = any(k.startswith(("text_encoders.", "lora_te_")) for k in state)
    assert te == expect.get("text_encoder", False), f"{name}: text-encoder modules {te}"


def test_the_corpus_is_complete():
    """Every entry names files that exist and carry their source; the corpus keeps growing (at least 20)."""
    assert len(ENTRIES) >= 20, ENTRIES
    sources = (CORPUS.parent / "SOURCES.md").read_text(encoding="utf-8")
    for name in ENTRIES:
        expect = tomllib.loads((CORPUS / f"{name}.expect.toml").read_text(encoding="utf-8"))
        assert f"`{name}`" in sources, name
        for key in ("command", "config_file", "dataset_config"):
            if key in expect:
                head = (CORPUS / expect[key]).read_text(encoding="utf-8").lstrip()
                assert head.startswith("#") and ("source:" in head.split("\n", 3)[0] + head.split("\n", 3)[1]
                                                 or "launch:" in head.split("\n", 1)[0]
                                                 or "harness's own" in head.split("\n", 1)[0]), expect[key]
