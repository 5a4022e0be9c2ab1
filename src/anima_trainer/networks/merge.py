"""base_weights (kohya): adapter files merged into the frozen DiT before the trained network is injected.

kohya merges each `--base_weights` file with its `--base_weights_multiplier` (default 1.0 per file) into the
model, so the new network trains on top of W + m·ΔW.  The merge here is ComfyUI's (formats.apply_network_file:
LoRA, LoKr, LoHa, DoRA, diff, w_norm; fp32 math, cast back to each weight's dtype) — the same W + m·ΔW kohya's
merge_to computes for its own files.  kohya's merge_to also merges a file's `lora_te_*` keys into the text
encoder; with `text_encoder=` they are merged here too (ComfyUI's CLIP names and kohya's names read).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from anima_trainer.networks.formats import (
    NetworkError,
    apply_network_file,
    apply_text_encoder_file,
    is_text_encoder_key,
)

logger = logging.getLogger(__name__)


def base_weight_multipliers(files: Sequence[str | Path], multipliers: Sequence[float] | None) -> list[float]:
    """kohya's pairing: the i-th multiplier for the i-th file, 1.0 where the list is shorter."""
    ms = list(multipliers or [])
    return [float(ms[i]) if i < len(ms) else 1.0 for i in range(len(files))]


def merge_base_weights(dit: nn.Module, files: Sequence[str | Path], multipliers: Sequence[float] | None = None,
                       text_encoder: nn.Module | None = None) -> list[tuple[Path, float, int]]:
    """Merge every file into `dit` (and its text-encoder keys into `text_encoder`, as kohya's merge_to does) in
    order; returns (file, multiplier, weights patched) per file and logs each.

    A file that cannot be merged whole is an error (NetworkError naming it): keys ComfyUI would not load,
    text-encoder keys (`lora_te_*`, `text_encoders.*`) when no text encoder is given (it is not loaded, or its
    outputs are cached), patches for weights the model lacks, shape mismatches, or no weight at all."""
    done = []
    for path, m in zip(files, base_weight_multipliers(files, multipliers), strict=True):
        path = Path(path)
        try:
            report = apply_network_file(dit, path, m)
            te_report = apply_text_encoder_file(text_encoder, path, m) if text_encoder is not None else None
        except NetworkError as e:
            raise NetworkError(f"base_weights: {e}") from None
        not_loaded = report["not_loaded"]
        errors, not_in_model, patched = dict(report["errors"]), list(report["not_in_model"]), len(report["patched"])
        if te_report is not None:  # a key is unloaded only if neither model took it
            not_loaded = sorted(set(not_loaded) & set(te_report["not_loaded"]))
            errors.update({f"text encoder {k}": v for k, v in te_report["errors"].items()})
            not_in_model += [f"text encoder {k}" for k in te_report["not_in_model"]]
            patched += len(te_report["patched"])
        problems = []
        if errors:
            problems.append("cannot apply " + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:4]))
        te_keys = [k for k in not_loaded if is_text_encoder_key(k)]
        if te_keys and text_encoder is None:
            problems.append(f"{len(te_keys)} text-encoder key(s) and no text encoder to merge them into (it is "
                            f"not trained, or its outputs are cached): {te_keys[:4]}")
            not_loaded = [k for k in not_loaded if k not in te_keys]
        if not_loaded:
            problems.append(f"{len(not_loaded)} key(s) are not adapter keys of the DiT or the text encoder: "
                            f"{not_loaded[:4]}")
        if not_in_model:
            problems.append(f"patches for weights the model lacks: {not_in_model[:4]}")
        if problems or not patched:
            # the weights patched so far stay changed, but the run stops before anything trains on them
            raise NetworkError(f"base_weights: {path}: " + ("; ".join(problems) or "no weight of this DiT matches "
                               "(not an Anima network file?)") + "; remove it from base_weights or fix the file")
        te_part = f", {len(te_report['patched'])} of the text encoder" if te_report and te_report["patched"] else ""
        logger.info("base_weights: merged %s × %g (%d DiT weights%s)", path, m, len(report["patched"]), te_part)
        done.append((path, m, patched))
    if len(multipliers or []) > len(files):
        logger.warning("base_weights_multiplier has %d values for %d file(s): the extra values have no file "
                       "(kohya ignores them too)", len(multipliers or []), len(files))
    return done
