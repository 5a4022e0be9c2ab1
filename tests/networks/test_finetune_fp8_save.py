"""A fine-tune checkpoint with fp8-stored frozen Linears (fp8_base) writes the base file's values for them: from a
single file only those tensors are read (not the whole DiT again, as every save once did), and the file is
byte-identical to one written from the whole base DiT loaded again (networks/full_finetune.py
`read_base_tensors`)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import anima_trainer.models.model_files as model_files
import anima_trainer.networks.full_finetune as full_finetune
from anima_trainer.demo import write_demo_models, write_tiny_dit
from anima_trainer.models import load_dit
from anima_trainer.models.fp8 import Fp8Linear, fp8_targets, quantize_linear_
from anima_trainer.networks.full_finetune import DiTFinetune


class _SpiedFile:
    """safe_open's handle, recording every tensor read."""

    def __init__(self, handle, read: list[str]) -> None:
        self._handle, self._read = handle, read

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def metadata(self):
        return self._handle.metadata()

    def get_tensor(self, key: str) -> torch.Tensor:
        self._read.append(key)
        return self._handle.get_tensor(key)


def _finetune(base) -> DiTFinetune:
    """Block 1 trained (moved off the base), block 0's attention/MLP Linears stored in fp8 as fp8_base does."""
    dit = load_dit(base, dtype=torch.float32)
    finetune = DiTFinetune(dit, trainable_patterns=[r"^blocks\.1\."], base_file=base)
    for path, linear in fp8_targets(dit).items():
        if path.startswith("blocks.0."):
            quantize_linear_(linear)
    with torch.no_grad():
        for p in finetune.selected.values():
            p.add_(0.01)
    return finetune


def _whole_base_state(finetune: DiTFinetune, base) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as the whole base DiT loaded again gives them (what every save read before)."""
    state = finetune.dit.state_dict()
    reference = load_dit(base, dtype=torch.float32).state_dict()
    for path, m in finetune.dit.named_modules():
        if isinstance(m, Fp8Linear):
            state[f"{path}.weight"] = reference[f"{path}.weight"]
            del state[f"{path}.weight_scale"]
    return state


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model.", ""])
def test_only_the_fp8_targets_are_read_and_the_file_is_identical(tmp_path, monkeypatch, prefix):
    base = write_tiny_dit(tmp_path / "base.safetensors", prefix=prefix, seed=6)
    finetune = _finetune(base)
    fp8 = sorted(f"{p}.weight" for p, m in finetune.dit.named_modules() if isinstance(m, Fp8Linear))
    assert fp8 and all(n.startswith("blocks.0.") for n in fp8)
    read: list[str] = []
    real_open = model_files.safe_open
    monkeypatch.setattr(model_files, "safe_open", lambda *a, **k: _SpiedFile(real_open(*a, **k), read))
    monkeypatch.setattr(full_finetune, "load_dit", None)  # a single file is never loaded whole at a save
    saved = finetune.save(tmp_path / "tuned.safetensors")
    monkeypatch.undo()
    assert sorted(read) == [prefix + n for n in fp8]
    reference = finetune.save(tmp_path / "reference.safetensors", state=_whole_base_state(finetune, base))
    assert saved.read_bytes() == reference.read_bytes()
    with safe_open(str(saved), "pt") as f:
        assert torch.equal(f.get_tensor(f"{prefix}blocks.0.mlp.layer1.weight"),
                           load_dit(base, dtype=torch.float32).blocks[0].mlp.layer1.weight)


def test_a_diffusers_folder_base_is_loaded_whole_with_the_same_file(tmp_path):
    from tests.support.diffusers_folder import write_diffusers_anima

    root = write_diffusers_anima(tmp_path / "anima", write_demo_models(tmp_path / "models", seed=6))
    finetune = _finetune(root)
    saved = finetune.save(tmp_path / "tuned.safetensors")
    reference = finetune.save(tmp_path / "reference.safetensors", state=_whole_base_state(finetune, root))
    assert saved.read_bytes() == reference.read_bytes()
