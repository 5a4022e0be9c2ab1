"""base_weights (kohya): adapter files merged into the frozen DiT before the trained network is injected.

kohya merges each `--base_weights` file with its `--base_weights_multiplier` (default 1.0 per file) into the
model, so the new network trains on top of W + m·ΔW.  The merge here is ComfyUI's (formats.apply_network_file:
LoRA, LoKr, LoHa, DoRA, diff, w_norm; fp32 math, cast back to each weight's dtype) — the same W + m·ΔW kohya's
merge_to computes for its own files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from anima_trainer.networks.convert import comfy_named_file
from anima_trainer.networks.formats import NetworkError, apply_network_file

logger = logging.getLogger(__name__)


def base_weight_multipliers(files: Sequence[str | Path], multipliers: Sequence[float] | None) -> list[float]:
    """kohya's pairing: the i-th multiplier for the i-th file, 1.0 where the list is shorter."""
    ms = list(multipliers or [])
    return [float(ms[i]) if i < len(ms) else 1.0 for i in range(len(files))]


def merge_base_weights(dit: nn.Module, files: Sequence[str | Path],
                       multipliers: Sequence[float] | None = None) -> list[tuple[Path, float, int]]:
    """Merge every file into `dit` in order; returns (file, multiplier, weights patched) per file and logs each.

    A file that cannot be merged whole is an error (NetworkError naming it): keys ComfyUI would not load for the
    DiT (kohya would merge `lora_te_*` text-encoder keys into Qwen3, which is frozen and cached here), patches
    for weights this DiT lacks, shape mismatches, or no DiT weight at all."""
    done = []
    for path, m in zip(files, base_weight_multipliers(files, multipliers), strict=True):
        path = Path(path)
        try:
            with comfy_named_file(path, dit) as comfy:  # a file in diffusers' layout: under ComfyUI names
                report = apply_network_file(dit, comfy, m)
        except NetworkError as e:
            raise NetworkError(f"base_weights: {e}") from None
        problems = []
        if report["errors"]:
            problems.append("cannot apply " + "; ".join(f"{k}: {v}" for k, v in list(report["errors"].items())[:4]))
        if report["not_loaded"]:
            problems.append(f"{len(report['not_loaded'])} key(s) are not DiT adapter keys (text-encoder LoRA keys "
                            f"cannot be merged here): {report['not_loaded'][:4]}")
        if report["not_in_model"]:
            problems.append(f"patches for weights this DiT lacks: {report['not_in_model'][:4]}")
        if problems or not report["patched"]:
            # the weights patched so far stay changed, but the run stops before anything trains on them
            raise NetworkError(f"base_weights: {path}: " + ("; ".join(problems) or "no weight of this DiT matches "
                               "(not an Anima network file?)") + "; remove it from base_weights or fix the file")
        logger.info("base_weights: merged %s × %g into the DiT (%d weights)", path, m, len(report["patched"]))
        done.append((path, m, len(report["patched"])))
    if len(multipliers or []) > len(files):
        logger.warning("base_weights_multiplier has %d values for %d file(s): the extra values have no file "
                       "(kohya ignores them too)", len(multipliers or []), len(files))
    return done
