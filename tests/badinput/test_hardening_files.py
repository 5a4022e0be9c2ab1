"""Issue 13 item 6 (files): NaN/Inf never reaches a network file, merged checkpoint or converted network — checked
on the values as written (after the save dtype's cast), refused with one line naming file and tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer import tensor_files
from anima_trainer.cli import main
from anima_trainer.tools.convert import parse_network_arg
from anima_trainer.networks.formats import NetworkError
from tests.support.networks import random_network


def _good_file(dit, path: Path) -> Path:
    net = random_network(dit)
    try:
        return net.save(path)
    finally:
        net.remove()


def _nan_file(dit, tmp_path: Path) -> tuple[Path, str]:
    """A network file holding a NaN (as a diverged run or another tool may have written it)."""
    tensors = load_file(_good_file(dit, tmp_path / "good.safetensors"))
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    return tmp_path / "nan.safetensors", key


def test_fp16_save_of_weights_beyond_fp16s_range_is_refused_and_keeps_the_previous_file(dit, tmp_path):
    net = random_network(dit)
    try:
        path = net.save(tmp_path / "lora.safetensors", dtype=torch.float16)
        before = path.read_bytes()
        module = net.lora_modules[0]
        with torch.no_grad():
            module.lora_up.weight[0, 0] = 1e5  # finite in fp32, Inf in fp16
        key = f"diffusion_model.{module.path}.lora_up.weight"
        with pytest.raises(tensor_files.NonFiniteError) as info:
            net.save(path, dtype=torch.float16, overwrite=True)
        message = str(info.value)
        assert str(path) in message and key in message and "1 tensor(s) hold NaN/Inf" in message, message
        assert "float16" in message and "fp32 or bf16" in message and "\n" not in message, message
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
        with pytest.raises(tensor_files.NonFiniteError):  # a new name: nothing appears under it
            net.save(tmp_path / "new.safetensors", dtype=torch.float16)
        assert not (tmp_path / "new.safetensors").exists()
        # fp32 and bf16 hold 1e5: written, value kept
        assert load_file(net.save(tmp_path / "fp32.safetensors"))[key][0, 0] == 1e5
        assert load_file(net.save(tmp_path / "bf16.safetensors", dtype=torch.bfloat16))[key].isfinite().all()
    finally:
        net.remove()


def test_a_nan_weight_is_never_saved(dit, tmp_path):
    net = random_network(dit)
    try:
        with torch.no_grad():
            net.lora_modules[1].lora_down.weight[0, 0] = float("nan")
        with pytest.raises(tensor_files.NonFiniteError, match=r"lora\.safetensors: not written"):
            net.save(tmp_path / "lora.safetensors")
        assert list(tmp_path.iterdir()) == []
    finally:
        net.remove()


def test_merge_refuses_a_nan_network(dit, dit_file, tmp_path, capsys):
    nan, key = _nan_file(dit, tmp_path)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--dit", str(dit_file), "--network", str(nan), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(nan) in err and key in err and "NaN" in err, err
    assert not out.exists()


@pytest.mark.parametrize("tail", ["nan", "inf", "-inf", "NaN"])
def test_merge_refuses_a_non_finite_multiplier_when_the_arguments_are_read(dit, dit_file, tmp_path, capsys, tail):
    good = _good_file(dit, tmp_path / "good.safetensors")
    with pytest.raises(NetworkError, match=f"multiplier '{tail}' is not a finite number"):
        parse_network_arg(f"{good}:{tail}")
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--dit", str(dit_file), "--network", f"{good}:{tail}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --network ") and "\n" not in err and "not a finite number" in err, err
    assert not out.exists()
    assert parse_network_arg(f"{good}:0.5") == (str(good), 0.5)


def test_merge_refuses_a_result_that_is_not_finite_as_written(dit, dit_file, tmp_path, capsys):
    good = _good_file(dit, tmp_path / "good.safetensors")
    out = tmp_path / "merged.safetensors"
    # a finite multiplier whose product overflows the fp16 the checkpoint is written in
    assert main(["merge", "--dit", str(dit_file), "--network", f"{good}:1e8", "--out", str(out),
                 "--save_precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: merged checkpoint {out}: not written") and "hold NaN/Inf" in err, err
    assert "\n" not in err and not out.exists() and [p.name for p in tmp_path.iterdir()] == ["good.safetensors"]


def test_convert_network_refuses_a_nan_input(dit, dit_file, tmp_path, capsys):
    nan, key = _nan_file(dit, tmp_path)
    for to in ("kohya", "comfy"):
        out = tmp_path / f"{to}.safetensors"
        assert main(["convert-network", str(nan), str(out), "--to", to, "--dit", str(dit_file)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {nan}: 1 tensor(s) hold NaN/Inf ({key})") and "nothing written" in err, err
        assert "\n" not in err and not out.exists()


def test_atomic_save_opt_out_for_files_that_may_hold_non_finite_values(tmp_path):
    tensors = {"best_loss": torch.tensor(float("inf")), "w": torch.ones(2)}
    with pytest.raises(tensor_files.NonFiniteError, match=r"s\.safetensors: not written, 1 tensor\(s\) hold NaN/Inf: "
                                                    r"best_loss"):
        tensor_files.atomic_save(tensors, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()
    path = tensor_files.atomic_save(tensors, tmp_path / "s.safetensors", require_finite=False)
    assert load_file(path)["best_loss"].isinf().all()


def test_a_non_finite_cache_entry_is_refused_naming_its_image(tmp_path):
    from anima_trainer.cache.store import CacheStore

    store = CacheStore(tmp_path / ".anima_cache")
    latent = torch.zeros(16, 1, 2, 2)
    latent[3, 0, 1, 1] = float("nan")
    with pytest.raises(tensor_files.NonFiniteError, match=r"^cache entry of /data/a\.png: .*not written, 1 tensor\(s\) "
                                                    r"hold NaN/Inf: latent$"):
        store.put("k", {"latent": latent}, source="/data/a.png")
    assert store.get("k") is None and list((tmp_path / ".anima_cache").iterdir()) == []
