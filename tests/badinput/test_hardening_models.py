"""Issue 13 (models): scaled-fp8 model files, a DiT missing a key, forged safetensors headers.

Items 13, 15 (deeply nested safetensors header) and 17 (an unknown dtype in a header).  Synthetic files in the
real formats: ComfyUI's scaled-fp8 layout (float8 weights + per-tensor `weight_scale` / `scale_weight`,
`comfy_quant` layer configs, the `scaled_fp8` marker, `input_scale`), and raw safetensors bytes with forged
headers.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer import cli
from anima_trainer.demo import write_tiny_vae
from anima_trainer.models import inspect_file, load_dit, model_files
from anima_trainer.models.model_files import ModelFileError, load_state_dict, read_header
from anima_trainer.models.vae import load_vae
from tests.support.fp8 import quantise as _quantise
from tests.support.fp8 import within_fp8 as _within_fp8

@pytest.mark.parametrize("style", ["comfy_quant", "old", "metadata"])
def test_scaled_fp8_dit_is_dequantised_like_comfyui(dit_file: Path, tmp_path: Path, style: str, caplog) -> None:
    original = load_file(dit_file)
    tensors, meta, quantised = _quantise(original, style)
    assert len(quantised) > 20
    path = tmp_path / f"dit_fp8_scaled_{style}.safetensors"
    save_file(tensors, path, metadata=meta)

    assert inspect_file(path).fp8_scaled_weights == len(quantised)
    with caplog.at_level("INFO", logger="anima_trainer.models.model_files"):
        got = load_dit(path, dtype=torch.float32).state_dict()
    for key, w in original.items():
        name = key.removeprefix("net.")
        if key in quantised:
            assert _within_fp8(got[name], w) <= 1, name
        else:
            assert torch.equal(got[name], w), name
    assert f"dequantised {len(quantised)} scaled float8 weights" in caplog.text
    bookkeeping = len(quantised) * (1 + (style == "comfy_quant")) + (style == "old")
    assert f"({bookkeeping} quantisation keys" in caplog.text  # input scales, layer configs, marker: counted

    # negative control: the same float8 weights with the scales dropped are far off (what the old loader did)
    dropped = {k: v for k, v in tensors.items() if k in original}
    save_file(dropped, tmp_path / "no_scales.safetensors")
    wrong = load_dit(tmp_path / "no_scales.safetensors", dtype=torch.float32).state_dict()
    assert min(_within_fp8(wrong[k.removeprefix("net.")], original[k]) for k in quantised) > 100


def test_scaled_fp8_vae_and_llm_adapter_files_are_dequantised(dit_file: Path, tmp_path: Path) -> None:
    """The same rule for every model file: a scaled VAE and a separate scaled LLM-adapter file."""
    vae_file = write_tiny_vae(tmp_path / "vae.safetensors")
    tensors, _, quantised = _quantise(load_file(vae_file), "comfy_quant")
    save_file(tensors, tmp_path / "vae_fp8.safetensors")
    ref = load_vae(vae_file, dtype=torch.float32).model.state_dict()
    got = load_vae(tmp_path / "vae_fp8.safetensors", dtype=torch.float32).model.state_dict()
    assert quantised and ref.keys() == got.keys()
    assert max(float(_within_fp8(got[k], ref[k])) for k in ref) <= 1
    assert sum(not torch.equal(got[k], ref[k]) for k in ref) >= len(quantised) // 2  # really went through fp8

    original = load_file(dit_file)
    llm_adapter = {k.removeprefix("net."): v for k, v in original.items() if k.startswith("net.llm_adapter.")}
    tensors, _, quantised = _quantise(llm_adapter, "old")
    save_file(tensors, tmp_path / "adapter_fp8.safetensors")
    got = load_dit(dit_file, dtype=torch.float32, llm_adapter_path=tmp_path / "adapter_fp8.safetensors").state_dict()
    assert quantised and all(_within_fp8(got[k], llm_adapter[k]) <= 1 for k in quantised)


def _dit_with(dit_file: Path, tmp_path: Path, change) -> Path:  # change: dict -> None
    tensors = load_file(dit_file)
    change(tensors)
    save_file(tensors, tmp_path / "odd.safetensors")
    return tmp_path / "odd.safetensors"


W = "net.blocks.0.mlp.layer1.weight"


def _fp8(t: dict) -> None:
    t[W] = t[W].to(torch.float8_e4m3fn)


REFUSED = [
    ("nvfp4", lambda t: t.update({W: t[W].to(torch.uint8), W + "_scale": torch.ones(4),
                                  W + "_scale_2": torch.ones(())}),
     r"'net\.blocks\.0\.mlp\.layer1\.weight_scale_2' belongs to a block-quantised \(NVFP4\) weight"),
    ("int8_format", lambda t: (_fp8(t), t.update({"net.blocks.0.mlp.layer1.comfy_quant": torch.tensor(
        list(b'{"format": "int8_tensorwise"}'), dtype=torch.uint8)})),
     r"layer 'net\.blocks\.0\.mlp\.layer1' is quantised as 'int8_tensorwise'"),
    ("per_channel", lambda t: (_fp8(t), t.update({W + "_scale": torch.ones(t[W].shape[0])})),
     r"'net\.blocks\.0\.mlp\.layer1\.weight_scale' is not one per-tensor scale \(F32, shape \[256\]\)"),
    ("scaled_f32", lambda t: t.update({"net.blocks.0.mlp.layer1.scale_weight": torch.ones(())}),
     r"'net\.blocks\.0\.mlp\.layer1\.scale_weight' scales a F32 weight"),
    ("orphan_scale", lambda t: t.update({"net.blocks.0.mlp.layer9.weight_scale": torch.ones(())}),
     r"'net\.blocks\.0\.mlp\.layer9\.weight_scale' scales 'net\.blocks\.0\.mlp\.layer9\.weight', which the file "
     r"does not have"),
    ("format_mismatch", lambda t: (_fp8(t), t.update({"net.blocks.0.mlp.layer1.comfy_quant": torch.tensor(
        list(b'{"format": "float8_e5m2"}'), dtype=torch.uint8)})),
     r"says float8_e5m2 but its weight is stored as F8_E4M3"),
]


@pytest.mark.parametrize("name,change,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_quantisation_that_cannot_be_dequantised_is_refused(dit_file, tmp_path, name, change, message) -> None:
    path = _dit_with(dit_file, tmp_path, change)
    with pytest.raises(ModelFileError, match=message) as e:
        load_dit(path, dtype=torch.float32)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["x_embedder.proj.1.weight", "blocks.0.mlp.layer1.weight",
                                 "blocks.1.mlp.layer2.weight", "t_embedder.1.linear_1.weight"])
def test_dit_missing_one_key_names_the_key(dit_file: Path, tmp_path: Path, key: str, capsys) -> None:
    path = _dit_with(dit_file, tmp_path, lambda t: t.pop("net." + key))
    with pytest.raises(ModelFileError) as e:
        load_dit(path, dtype=torch.float32)
    assert key in str(e.value) and str(path) in str(e.value) and "LLM-adapter" not in str(e.value)
    assert cli.main(["inspect", str(path)]) == (0 if key.startswith(("blocks.1", "t_")) else 2)
    out = capsys.readouterr()
    if key.startswith(("blocks.1", "t_")):  # the config does not need it: inspect still says what the file is
        assert json.loads(out.out)["kind"] == "anima_dit"
    else:  # the config needs it: inspect names it
        assert out.err.count("\n") == 1 and key in out.err and "LLM-adapter" not in out.err


# ------------------------------------------------------------------------------------ forged headers

def _raw(path: Path, header: bytes | dict, data: bytes) -> Path:
    """A .safetensors file from a header written by hand (so it can lie)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
FORGED = [
    ("unknown_dtype", {"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 2]}}, 2,
     r"tensor 'w' declares the unknown dtype 'Q4_K'"),
    ("size_mismatch", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4,
     r"tensor 'w' \(F32, shape \[2\]\) needs 8 bytes but its data_offsets \[0, 4\] span 4"),
    ("overlap", {"a": F32x2, "b": F32x2}, 8,
     r"starts at byte 0 of the data, expected 8 \(overlapping another tensor\)"),
    ("gap", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, r"tensor 'w' starts at byte 4 of the "
     r"data, expected 0 \(a gap\)"),
    ("bool_shape", {"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, r"needs dtype, shape"),
    ("deep_json", b"[" * 100_000, 0, r"is not a safetensors file: bad header \(JSON nested too deeply\)"),
    ("deep_metadata", {"__metadata__": {"x": {"y": 1}}}, 0, r"__metadata__ values must be strings"),
]


@pytest.mark.parametrize("name,header,size,message", FORGED, ids=[f[0] for f in FORGED])
def test_forged_header_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch, capsys, name, header, size,
                                                            message) -> None:
    path = _raw(tmp_path / f"{name}.safetensors", header, bytes(size))

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("a tensor was read from a file whose header is invalid")

    monkeypatch.setattr(model_files, "safe_open", no_tensor_reads)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}") and "Traceback" not in err
    assert re.search(message, err), err
    for read in (read_header, load_state_dict, lambda p: load_dit(p, dtype=torch.float32)):
        with pytest.raises(ModelFileError, match=message):
            read(path)


def test_deeply_nested_quantisation_metadata_and_index_are_one_line_errors(dit_file: Path, tmp_path: Path) -> None:
    deep = "[" * 100_000
    tensors = load_file(dit_file)
    save_file(tensors, tmp_path / "m.safetensors", metadata={"_quantization_metadata": deep})
    with pytest.raises(ModelFileError, match=r"bad _quantization_metadata metadata \(JSON nested too deeply\)"):
        load_dit(tmp_path / "m.safetensors", dtype=torch.float32)

    from anima_trainer.models.diffusers_layout import weight_files

    (tmp_path / "model.safetensors.index.json").write_text(deep)
    with pytest.raises(ModelFileError, match=r"model\.safetensors\.index\.json is not a valid safetensors index "
                                              r"\(JSON nested too deeply\)"):
        weight_files(tmp_path, "--qwen3")
    (tmp_path / "config.json").write_text(deep)  # a folder with a hostile config.json is just not a model folder
    assert inspect_file(tmp_path).kind == "unknown"


@pytest.mark.parametrize("style", ["comfy_quant", "old", "metadata"])
def test_merge_over_a_scaled_fp8_base_writes_dequantised_weights_without_scales(dit_file: Path, tmp_path: Path,
                                                                                 style: str) -> None:
    """`merge` on a scaled-fp8 DiT: the merged weights are the dequantised ones patched, and no scale, marker or
    quantisation metadata is copied (ComfyUI would scale the merged weights a second time)."""
    from anima_trainer.networks import apply_network_file
    from tests.support.networks import random_network

    tensors, meta, quantised = _quantise(load_file(dit_file), style)
    base = tmp_path / "dit_fp8.safetensors"
    save_file(tensors, base, metadata=meta)
    lora = random_network(load_dit(dit_file, dtype=torch.float32)).save(tmp_path / "lora.safetensors")
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", "--dit", str(base), "--network", str(lora), "--out", str(out)]) == 0

    header, out_meta = read_header(out)
    assert not [k for k in header if k.endswith(("scale", "_scale", "scale_weight", "scale_input", "comfy_quant",
                                                "scaled_fp8"))]
    assert "_quantization_metadata" not in out_meta
    assert {dt for k, (dt, _) in header.items() if k in quantised} == {"F32"}  # dequantised, not float8
    reference = load_dit(base, dtype=torch.float32)  # the dequantised base, patched with ComfyUI's math
    apply_network_file(reference, lora, 1.0)
    merged = load_dit(out, dtype=torch.float32).state_dict()  # loads: no scale applied a second time
    for k, v in reference.state_dict().items():
        assert torch.equal(merged[k], v), k
