"""The metadata part of `anima-trainer inspect`: kohya's ss_* summary, tag frequency, dataset folders, the sshs_*
hashes checked against the file, and the modelspec block — what a user wants to know before sharing a file."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from anima_trainer.networks.hashes import verify_hashes

TRAINING_KEYS = ("ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                 "ss_network_dropout", "ss_steps", "ss_epoch", "ss_num_epochs", "ss_max_train_steps",
                 "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler",
                 "ss_lr_warmup_steps", "ss_mixed_precision", "ss_seed", "ss_timestep_sampling",
                 "ss_discrete_flow_shift", "ss_num_train_images", "ss_num_reg_images", "ss_num_validation_images",
                 "ss_num_batches_per_epoch", "ss_sd_model_name", "ss_vae_name", "ss_base_model_version",
                 "ss_training_comment")
TOP_TAGS = 10


def _json(meta: dict[str, str], key: str) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _when(value: str | None) -> str | None:
    try:
        return datetime.datetime.fromtimestamp(float(value)).isoformat(sep=" ", timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return value


def metadata_report(path: str | Path, meta: dict[str, str], top: int = TOP_TAGS) -> dict:
    """JSON-ready summary of a network file's metadata (`meta`: its header metadata)."""
    training = {k: meta[k] for k in TRAINING_KEYS if k in meta}
    for key in ("ss_training_started_at", "ss_training_finished_at"):
        if key in meta:
            training[key] = _when(meta[key])
    tags = {}
    for folder, freq in _json(meta, "ss_tag_frequency").items():
        if isinstance(freq, dict):
            ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))
            tags[folder] = {"tags": len(freq), "top": ranked[:top]}
    dirs = {name: info for name, info in _json(meta, "ss_dataset_dirs").items() if isinstance(info, dict)}
    reg = {name: info for name, info in _json(meta, "ss_reg_dataset_dirs").items() if isinstance(info, dict)}
    try:
        hashes = verify_hashes(path)
    except Exception as e:  # noqa: BLE001 (a report, not a check: say why instead of failing the inspect)
        hashes = {"error": f"could not recompute: {e}"}
    for key in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        if key not in meta:
            hashes.setdefault(key, "missing")
    modelspec = {k.removeprefix("modelspec."): v for k, v in meta.items() if k.startswith("modelspec.")}
    return {"training": training, "tag_frequency": tags, "dataset_dirs": dirs, "reg_dataset_dirs": reg,
            "hashes": {k: {"value": meta.get(k), "check": v} for k, v in hashes.items()}, "modelspec": modelspec}


def _short(value: str, limit: int = 100) -> str:
    return value if len(value) <= limit else f"{value[:limit - 3]}... ({len(value)} chars)"


def format_metadata_report(r: dict) -> list[str]:
    """The report's lines (indented like inspect's)."""
    lines = ["  metadata:"]
    if r["training"]:
        lines.append("    training: " + "; ".join(f"{k.removeprefix('ss_')}={_short(v or '', 80)}"
                                                  for k, v in r["training"].items()))
    for title, dirs in (("dataset dirs", r["dataset_dirs"]), ("reg dataset dirs", r["reg_dataset_dirs"])):
        if dirs:
            lines.append(f"    {title}: " + ", ".join(
                f"{name} ({info.get('img_count')} images x {info.get('n_repeats')} repeats)"
                for name, info in dirs.items()))
    for folder, t in r["tag_frequency"].items():
        shown = ", ".join(f"{tag} ({n})" for tag, n in t["top"])
        lines.append(f"    tags in {folder} ({t['tags']} distinct): {shown or '(none)'}")
    for key, h in r["hashes"].items():
        lines.append(f"    hash {key}: {h['value'] or '-'} [{h['check']}]")
    if r["modelspec"]:
        lines.append("    modelspec: " + "; ".join(f"{k}={_short(v, 60)}" for k, v in r["modelspec"].items()))
    return lines
