"""`anima-trainer download` end to end against the local fake Hub / ModelScope."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save

from anima_trainer.cli import main
from anima_trainer.tools.download import sources
from anima_trainer.tools.download.command import RECORD, selected

ANIMA = {"dit": b"D" * 5000, "qwen3": b"Q" * 3000, "vae": b"V" * 2000}
T5_JSON = json.dumps({"model": {"type": "Unigram", "vocab": []}}).encode()


def model_bytes(tag: str) -> bytes:
    """A small valid .safetensors file, different for each tag (what an unpinned model download must be)."""
    return save({tag: torch.arange(len(tag), dtype=torch.float32)})


def _serve_all(hub):
    for name, data in ANIMA.items():
        hub.add_hf(sources.ANIMA_REPO, sources.ENTRIES[name].path, data, lfs=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        hub.add_hf("Qwen/Qwen3-0.6B-Base", name, b"{}" if name.endswith(".json") else b"#merges\n")
    hub.add_hf("google/t5-v1_1-base", "tokenizer.json", T5_JSON, lfs=True)
    hub.add_hf("google/t5-v1_1-base", "tokenizer_config.json", b"{}")


def _run(hub, dest, *args):
    return main(["download", "--dest", str(dest), "--hf-endpoint", hub.hf_url, "--modelscope-endpoint", hub.ms_url,
                 "--no-progress", "--timeout", "5", *args])


@pytest.fixture
def test_pins(monkeypatch):
    """The table's pins for the fake files (the real ones are the 4 GB files' hashes)."""
    for name, data in ANIMA.items():
        entry = replace(sources.ENTRIES[name], sha256=hashlib.sha256(data).hexdigest())
        monkeypatch.setitem(sources.ENTRIES, name, entry)


def test_download_everything_then_nothing(hub, tmp_path, capsys, test_pins):
    _serve_all(hub)
    dest = tmp_path / "models"
    assert _run(hub, dest) == 0
    out = capsys.readouterr().out
    files = {"dit": dest / "diffusion_models" / "anima-base-v1.0.safetensors",
             "qwen3": dest / "text_encoders" / "qwen_3_06b_base.safetensors",
             "vae": dest / "vae" / "qwen_image_vae.safetensors"}
    for name, path in files.items():
        assert path.read_bytes() == ANIMA[name]
        assert f"{path.name} <- Hugging Face {sources.ANIMA_REPO}@main {sources.ENTRIES[name].path}, SHA-256 " \
               f"{hashlib.sha256(ANIMA[name]).hexdigest()}" in out
    assert sorted(p.name for p in (dest / "tokenizers" / "qwen").iterdir()) == ["merges.txt",
                                                                                "tokenizer_config.json", "vocab.json"]
    assert (dest / "tokenizers" / "t5" / "tokenizer.json").read_bytes() == T5_JSON
    toml = tomllib.loads(out.split("train.toml:\n", 1)[1])["model"]
    assert toml == {"pretrained_model_name_or_path": str(files["dit"]), "qwen3": str(files["qwen3"]),
                    "vae": str(files["vae"]), "qwen3_tokenizer_path": str(dest / "tokenizers" / "qwen"),
                    "t5_tokenizer_path": str(dest / "tokenizers" / "t5")}
    n = len(hub.seen)
    assert _run(hub, dest) == 0  # everything present: not one request
    assert len(hub.seen) == n and capsys.readouterr().out.count("(present)") == 5
    (dest / RECORD).unlink()  # no record: the pinned files are re-hashed, still no request
    assert _run(hub, dest, "--only", "dit,vae") == 0 and len(hub.seen) == n
    files["vae"].write_bytes(b"x" * 2000)
    (dest / RECORD).unlink()
    assert _run(hub, dest, "--only", "vae") == 2
    assert "exists but its SHA-256 is" in capsys.readouterr().err
    assert _run(hub, dest, "--only", "vae", "--force") == 0 and files["vae"].read_bytes() == ANIMA["vae"]


def test_overrides_fallback_and_errors(hub, tmp_path, capsys, test_pins):
    hub.add_hf("me/mirror", "vae/qwen_image_vae.safetensors", model_bytes("mirror"), lfs=True)
    assert _run(hub, tmp_path, "--only", "vae", "--source", "vae=https://huggingface.co/me/mirror/tree/main/vae") == 0
    assert (tmp_path / "vae" / "qwen_image_vae.safetensors").read_bytes() == model_bytes("mirror")
    capsys.readouterr()
    hub.status[sources.ANIMA_REPO] = (403, "GatedRepo")
    hub.add_ms("ms/anima", "dit.safetensors", ANIMA["dit"])  # the pinned bytes, under another name
    assert _run(hub, tmp_path, "--only", "dit", "--modelscope-source",
                "dit=https://www.modelscope.cn/models/ms/anima/resolve/master/dit.safetensors") == 0
    # the file keeps the primary source's name, whatever the mirror calls it
    assert (tmp_path / "diffusion_models" / "anima-base-v1.0.safetensors").read_bytes() == ANIMA["dit"]
    assert _run(hub, tmp_path, "--only", "qwen3") == 2
    err = capsys.readouterr().err
    assert "error: could not download the Qwen3-0.6B text encoder (qwen_3_06b_base.safetensors):" in err
    assert "gated repo (HTTP 403)" in err and "no ModelScope fallback: pass --modelscope-source qwen3=" in err
    # a ModelScope file with the table's (versioned) name is checked against the table's SHA-256
    hub.add_ms("ms/anima", sources.QWEN3.path, model_bytes("not the real text encoder"))
    assert _run(hub, tmp_path, "--only", "qwen3", "--modelscope-source", "qwen3=ms/anima") == 2
    assert f"ModelScope ms/anima@master {sources.QWEN3.path}: SHA-256 " in capsys.readouterr().err
    assert not (tmp_path / "text_encoders").exists() or not any((tmp_path / "text_encoders").iterdir())
    assert _run(hub, tmp_path, "--source", "vae=https://example.com/x") == 2
    assert "unsupported host 'example.com'" in capsys.readouterr().err
    assert _run(hub, tmp_path, "--source", "unet=a/b") == 2
    assert "expected NAME=SPEC with NAME one of dit, qwen3, vae" in capsys.readouterr().err


def test_selection():
    assert selected(None) == ["dit", "qwen3", "vae", "qwen_tokenizer", "t5_tokenizer"]
    assert selected(["tokenizers", "dit"]) == ["dit", "qwen_tokenizer", "t5_tokenizer"]
    with pytest.raises(ValueError, match="--only 'unet'"):
        selected(["unet"])


def test_file_updated_upstream_at_a_named_revision_is_kept_on_rerun(hub, tmp_path):
    """The way to take a file that no longer matches the pin on purpose: name its revision (checked against the
    Hub's own hash); a re-run with that source finds it present."""
    newer = model_bytes("a newer VAE")  # not the table's SHA-256
    hub.add_hf(sources.ANIMA_REPO, sources.VAE.path, newer, lfs=True, rev="abc123")
    source = f"vae=https://huggingface.co/{sources.ANIMA_REPO}/blob/abc123/{sources.VAE.path}"
    assert _run(hub, tmp_path, "--only", "vae", "--source", source) == 0
    assert (tmp_path / "vae" / "qwen_image_vae.safetensors").read_bytes() == newer
    n = len(hub.seen)
    assert _run(hub, tmp_path, "--only", "vae", "--source", source) == 0 and len(hub.seen) == n  # verified: kept


def test_a_failing_part_does_not_stop_the_others(hub, tmp_path, capsys):
    hub.status[sources.ANIMA_REPO] = (403, "GatedRepo")
    hub.add_hf("me/mirror", sources.VAE.path, model_bytes("vae"), lfs=True)  # a repo id: the table's layout
    assert _run(hub, tmp_path, "--only", "dit", "vae", "--source", "vae=me/mirror") == 2
    captured = capsys.readouterr()
    assert "could not download the Anima DiT" in captured.err
    vae = tmp_path / "vae" / "qwen_image_vae.safetensors"
    assert vae.read_bytes() == model_bytes("vae") and f"vae = {json.dumps(str(vae))}" in captured.out
