"""issue 15 item 3: kohya's sshs_model_hash / sshs_legacy_hash (train_util.precalculate_safetensors_hashes) on
every saved network file, checked against sha256 computed here by hand from the bytes kohya hashes."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import safe_open

from anima_trainer.tensor_files import atomic_save
from anima_trainer.networks import create_network
from anima_trainer.networks.hashes import precalculate_hashes, verify_hashes, with_hashes


def _metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # > 1 MiB + 64 KiB of data, so kohya's legacy window (64 KiB at 1 MiB) lies in the tensor data
    return {"b.lora_up.weight": torch.randn(600, 512, generator=g),
            "a.lora_down.weight": torch.randn(8, 64, generator=g), "a.alpha": torch.tensor(4.0),
            "c.half": torch.randn(16, generator=g).to(torch.bfloat16)}


def _by_hand(tensors: dict[str, torch.Tensor], ss: dict[str, str]) -> tuple[str, str]:
    """The file kohya hashes, laid out by hand as safetensors writes it: 8-byte header length, the JSON header
    (its own key order is irrelevant to the length), space padding to 8, then the tensors largest dtype first and
    by name.  Model hash: sha256 of the data; legacy: sha256 of the 64 KiB at 1 MiB, 8 hex digits."""
    names = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    data = b"".join(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k in names)
    header, offset = {"__metadata__": ss}, 0
    for k in names:
        size = tensors[k].numel() * tensors[k].dtype.itemsize
        header[k] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[tensors[k].dtype],
                     "shape": list(tensors[k].shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    whole = len(head).to_bytes(8, "little") + head + data
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(whole[0x100000:0x110000]).hexdigest()[:8]


def test_hashes_equal_the_hand_computed_sha256_of_the_tensors_and_ss_keys():
    tensors = _tensors()
    ss = {"ss_network_dim": "8", "ss_tag_frequency": json.dumps({"imgs": {"1girl": 3}})}
    meta = {**ss, "modelspec.title": "x", "anima_trainer_version": "0"}
    model, legacy = _by_hand(tensors, ss)
    assert precalculate_hashes(tensors, meta) == (model, legacy)
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]  # the window is in the data, not past the end
    # only ss_* keys count: user metadata (modelspec, ours) changes neither; an ss_* key of another length shifts
    # the data in kohya's legacy window but not the data hash
    assert precalculate_hashes(tensors, {**ss, "modelspec.title": "a much longer title"}) == (model, legacy)
    longer = precalculate_hashes(tensors, {**ss, "ss_training_comment": "shifted by this comment"})
    assert longer[0] == model and longer[1] != legacy
    out = with_hashes(tensors, meta)
    assert (out["sshs_model_hash"], out["sshs_legacy_hash"], out["modelspec.hash_sha256"]) == (model, legacy,
                                                                                             "0x" + model)
    assert "modelspec.hash_sha256" not in with_hashes(tensors, ss)  # no modelspec block, none added


def test_a_small_file_has_the_empty_window_legacy_hash():
    t = {"x": torch.ones(4)}
    assert precalculate_hashes(t, {"ss_v2": "False"})[1] == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_saved_network_hashes_are_the_files_and_verify(tmp_path, dit):
    net = create_network(dit, dim=4, alpha=2.0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(generator=torch.Generator().manual_seed(3))
    path = net.save(tmp_path / "n.safetensors", metadata={"ss_steps": "5", "modelspec.title": "t"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    # what A1111's additional-networks computes from the file: sha256 of everything after the header
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert verify_hashes(path) == {"sshs_model_hash": "ok", "modelspec.hash_sha256": "ok", "sshs_legacy_hash": "ok"}
    # bf16 weights with fp32 alphas: our writer lays the data out as safetensors does, so the hashes hold too
    half = net.save(tmp_path / "half.safetensors", metadata={"ss_steps": "5"}, dtype=torch.bfloat16)
    raw = half.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert _metadata_of(half)["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    assert verify_hashes(half) == {"sshs_model_hash": "ok", "sshs_legacy_hash": "ok"}
    # a file edited afterwards (one weight changed, metadata kept) is reported
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    atomic_save(tensors, tmp_path / "edited.safetensors", meta)
    report = verify_hashes(tmp_path / "edited.safetensors")
    assert report["sshs_model_hash"].startswith("differs (recomputed ")
