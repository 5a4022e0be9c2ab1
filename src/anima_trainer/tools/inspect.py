"""`anima-trainer inspect NETWORK_FILE`: what an adapter file holds and whether ComfyUI would apply it cleanly.

Everything is read the way ComfyUI reads it (`parse_patches` on the key map of a meta-device AnimaDiT, the
2B config unless a `--dit` header is given).  Per-module deltas use ComfyUI's math (`delta_weight`) on a zero
base weight, which is exact for every additive patch (LoRA, LoHa, LoKr, diff); DoRA and `set_weight` depend on
the base weights, so for them the norm of the stored tensor/branch is reported and marked.
Text-encoder modules (`text_encoders.qwen3_06b.transformer.model.*` as ComfyUI names them, kohya's
`lora_te_*`) are read against a Qwen3-0.6B on meta (or the given `text_encoder`) and counted per model;
kohya's `lora_te_*` keys are valid but ComfyUI skips them: a warning, not a break.
A file is *broken* (non-zero exit) when it has NaN/Inf values, keys ComfyUI would not load, patches that do not
fit the model's shapes, or the same module under two names.  All-zero factors or branches are warnings only
(a freshly initialised LoRA has a zero `lora_up`).
`format_analysis` prints networks/analysis.py's weight analysis (`inspect --analysis`): the update's energy per
block type and per block, effective ranks, and the largest modules.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

from anima_trainer.networks.analysis import GroupStats, NetworkAnalysis
from anima_trainer.networks.convert import build_meta_dit, build_meta_qwen3, linear_paths, read_network
from anima_trainer.networks.diffusers_format import diffusers_to_comfy, reads_as_diffusers, unmatched_diffusers_keys
from anima_trainer.networks.formats import (
    TE_NAME_PREFIX,
    comfy_key_map,
    comfy_skipped_keys,
    delta_weight,
    is_text_encoder_key,
    kohya_te_key_map,
    parse_patches,
    split_key,
)
from anima_trainer.tools.metadata_report import format_metadata_report, metadata_report

KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "diff": "diff", "set": "set_weight"}
METADATA_SHOWN = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                  "ss_base_model_version", "ss_output_name", "ss_steps", "ss_epoch", "ss_learning_rate",
                  "ss_training_comment", "ss_ema_decay", "ss_ema_updates", "modelspec.architecture", "modelspec.title",
                  "anima_trainer_version")


def _group(target: str) -> str:
    m = re.match(r"(llm_adapter\.blocks\.\d+|blocks\.\d+|text_encoder\.layers\.\d+)\.", target)
    if m:
        return m.group(1)
    return target.split(".")[0]


def _patch_shape(patch: tuple) -> tuple[int, ...] | None:
    """The weight shape a patch produces on its own (no model needed)."""
    kind = patch[0]
    if kind in ("set", "diff"):
        return tuple(patch[1].shape)
    if kind == "lora":
        up, down = patch[1], patch[2]
        return (up.shape[0], down.shape[1], *down.shape[2:]) if patch[4] is None else None
    if kind == "loha":
        return (patch[1].shape[0], patch[2].shape[1])
    if kind == "lokr":
        w1, w2, w1a, w1b, w2a, w2b = patch[1:7]
        a = w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1])
        b = w2.shape if w2 is not None else (w2a.shape[0], w2b.shape[1])
        return (a[0] * b[0], a[1] * b[1])
    return None


def _rank_alpha(patch: tuple) -> tuple[int | None, float | None, float]:
    kind = patch[0]
    if kind == "lora":
        rank, alpha = patch[2].shape[0], patch[3]
    elif kind == "loha":
        rank, alpha = patch[2].shape[0], patch[7]
    elif kind == "lokr":
        w1, w2, _, w1b, _, w2b, _, alpha = patch[1:9]
        rank = w2b.shape[0] if w2 is None else (w1b.shape[0] if w1 is None else None)
    else:
        return None, None, 1.0
    scale = alpha / rank if alpha is not None and rank else 1.0
    return rank, alpha, scale


def inspect_network(path: str | Path, dit: nn.Module | None = None, check_shapes: bool = True,
                    text_encoder: nn.Module | None = None) -> dict:
    """JSON-ready report on one adapter file; `report["broken"]` lists the reasons it is unusable.

    `check_shapes=False` when `dit` is only a guess of the model size (names are the same for every size).
    Text-encoder keys are read against `text_encoder` (default: Qwen3-0.6B on meta); their targets are named
    `text_encoder.<Qwen3 parameter>`, and `modules_by_model` counts modules per model.
    """
    dit = dit if dit is not None else build_meta_dit()
    sd, meta = read_network(path)
    layout, diffusers_bad, file_tensors = "comfy", [], len(sd)
    linears = linear_paths(dit)
    if reads_as_diffusers(sd, meta, linears):  # diffusers' layout: analysed under ComfyUI names
        layout, diffusers_bad = "diffusers", unmatched_diffusers_keys(sd, linears)
        if not diffusers_bad:
            sd = diffusers_to_comfy(sd, meta, linears)[0]
    if text_encoder is None and any(is_text_encoder_key(k) for k in sd):
        text_encoder = build_meta_qwen3()
    key_map = comfy_key_map(dit, text_encoder)
    skipped = comfy_skipped_keys(sd)
    if skipped:  # kohya's TE names: valid, read by kohya and our loaders, skipped by ComfyUI (listed below)
        key_map.update({k: TE_NAME_PREFIX + v for k, v in kohya_te_key_map(text_encoder).items()})
    patches, loaded = parse_patches(sd, key_map)
    params = dict(dit.state_dict(keep_vars=True))
    if text_encoder is not None:
        params.update({TE_NAME_PREFIX + k: v for k, v in text_encoder.state_dict(keep_vars=True).items()})

    nonfinite = {}
    zero_tensors = []
    for k, t in sd.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                nonfinite[k] = bad
            if t.numel() and not k.endswith(".alpha") and not bool(t.any()):
                zero_tensors.append(k)

    # the same DiT tensor named by two accepted prefixes: ComfyUI keeps one patch silently
    prefixes_per_target: dict[str, set[str]] = defaultdict(set)
    for k in sd:
        hit = split_key(k, key_map)
        if hit is not None:
            prefixes_per_target[key_map[hit[0]]].add(hit[0])
    duplicates = {t: sorted(p) for t, p in prefixes_per_target.items() if len(p) > 1}

    modules = {}
    shape_errors = {}
    for target, patch in sorted(patches.items()):
        rank, alpha, scale = _rank_alpha(patch)
        entry: dict = {"algorithm": KIND_NAMES[patch[0]], "group": _group(target)}
        if rank is not None:
            entry.update(rank=rank, alpha=alpha, scale=scale)
        shape = _patch_shape(patch)
        model_shape = tuple(params[target].shape) if target in params and check_shapes else None
        if target not in params:
            entry["not_in_model"] = True  # e.g. b_norm on a norm without bias: ComfyUI skips it
        dora = {"lora": patch[5] if patch[0] == "lora" else None, "loha": patch[-1],
                "lokr": patch[-1]}.get(patch[0]) is not None
        try:
            if model_shape is not None and shape is not None and math.prod(shape) != math.prod(model_shape):
                raise RuntimeError(f"patch shape {shape} does not fit weight {model_shape}")
            base_shape = shape if shape is not None else model_shape
            if patch[0] == "set" or dora:
                entry["delta_norm"] = None
                entry["note"] = "set_weight: replaces W" if patch[0] == "set" else "DoRA: depends on the base weight"
                branch = patch[1] if patch[0] == "set" else None
                entry["tensor_norm"] = float(branch.float().norm()) if branch is not None else None
            elif base_shape is not None:
                w = torch.zeros(base_shape, dtype=torch.float32)
                entry["delta_norm"] = float(delta_weight(patch, w, 1.0).norm())
        except (RuntimeError, ValueError) as e:
            shape_errors[target] = str(e)
            entry["error"] = str(e)
        modules[target] = entry

    zero_branches = sorted(t for t, e in modules.items() if e.get("delta_norm") == 0.0)
    norm_diffs = sorted(t for t, p in params.items() if t in patches and p.dim() == 1)
    by_group = Counter(e["group"] for e in modules.values())
    unknown = diffusers_bad or sorted(set(sd) - loaded)
    skip_notes = []
    if skipped:
        skip_notes.append(f"{len(skipped)} text-encoder key(s) use kohya's lora_te_* names, which ComfyUI does "
                          "not load for Anima (it applies the DiT part only); `convert-network --to comfy` renames "
                          "them")
    by_model = Counter("text_encoder" if t.startswith(TE_NAME_PREFIX) else "dit" for t in modules)
    broken = []
    if nonfinite:
        broken.append(f"{sum(nonfinite.values())} NaN/Inf value(s) in {len(nonfinite)} tensor(s)")
    if unknown:
        loader = "diffusers' Anima loader" if layout == "diffusers" else "ComfyUI"
        broken.append(f"{len(unknown)} key(s) {loader} would not load")
    if shape_errors:
        broken.append(f"{len(shape_errors)} patch(es) do not fit the model's weights")
    if duplicates:
        broken.append(f"{len(duplicates)} module(s) appear under two names (ComfyUI keeps one)")
    warnings = skip_notes
    if zero_tensors:
        warnings.append(f"{len(zero_tensors)} all-zero tensor(s): {zero_tensors[:5]}")
    if zero_branches:
        warnings.append(f"{len(zero_branches)} module(s) with a zero delta: {zero_branches[:5]}")
    ranks = Counter(e["rank"] for e in modules.values() if "rank" in e)
    alphas = Counter(e["alpha"] for e in modules.values() if "rank" in e)
    scales = Counter(e["scale"] for e in modules.values() if "rank" in e)
    return {
        "file": str(path), "kind": "network", "layout": layout,
        "algorithms": sorted({e["algorithm"] for e in modules.values()}),
        "tensors": file_tensors, "modules": len(modules), "modules_by_model": dict(sorted(by_model.items())),
        "comfy_skipped_keys": skipped,
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in alphas.items()},
        "scales": {f"{k:g}": v for k, v in scales.items()},
        "targets_by_group": dict(sorted(by_group.items())),
        "norm_diffs": norm_diffs,
        "metadata": {k: meta[k] for k in METADATA_SHOWN if k in meta},
        "metadata_keys": len(meta),
        "file_metadata": metadata_report(path, meta),  # issue 15: ss_* summary, tags, hashes, modelspec
        "nonfinite": nonfinite, "zero_tensors": zero_tensors, "zero_branches": zero_branches,
        "unknown_keys": unknown, "duplicate_modules": duplicates, "shape_errors": shape_errors,
        "per_module": modules,
        "warnings": warnings, "broken": broken,
    }


def format_report(r: dict) -> str:
    """Human-readable text for `anima-trainer inspect` (JSON with --json)."""
    lines = [(f"{r['file']}: network file, {', '.join(r['algorithms']) or 'no patches'}; "
              f"{r['modules']} module(s) from {r['tensors']} tensor(s)")]
    if r.get("layout") == "diffusers":
        lines.append("  layout: diffusers (transformer./text_conditioner. lora_A/lora_B, alpha/rank folded into "
                     "lora_B; shown below under ComfyUI names): diffusers' Anima loader reads it, ComfyUI and kohya "
                     "do not (convert-network --to comfy)")
    if r.get("modules_by_model", {}).get("text_encoder"):
        lines.append("  modules per model: " + ", ".join(f"{k} {v}" for k, v in r["modules_by_model"].items()))
    if r["ranks"]:
        lines.append(f"  ranks: {r['ranks']}  alphas: {r['alphas']}  scales: {r['scales']}")
    lines.append("  targets: " + ", ".join(f"{g} {n}" for g, n in r["targets_by_group"].items()))
    if r["norm_diffs"]:
        lines.append(f"  1-D params patched (norm gains, biases): {', '.join(r['norm_diffs'])}")
    kohya_lines = format_metadata_report(r["file_metadata"]) if r.get("file_metadata") else []
    if kohya_lines:  # the kohya metadata section (tools/metadata_report.py)
        lines.extend(kohya_lines)
    elif r["metadata"]:  # other trainers' files: the keys as they are
        lines.append("  metadata: " + "; ".join(f"{k}={v if len(v) < 80 else v[:77] + '...'}"
                                                for k, v in r["metadata"].items())
                     + f" ({r['metadata_keys']} keys in all)")
    lines.append("  per-module delta norm (ComfyUI math, strength 1):")
    for target, e in r["per_module"].items():
        extra = f" rank {e['rank']} alpha {e['alpha']} scale {e['scale']:g}" if "rank" in e else ""
        norm = e.get("delta_norm")
        shown = f"{norm:.6g}" if norm is not None else (e.get("note") or e.get("error") or "n/a")
        lines.append(f"    {target:<55} {e['algorithm']:<10}{extra}  |dW| {shown}")
    for k, n in r["nonfinite"].items():
        lines.append(f"  NaN/Inf: {k}: {n} value(s)")
    for k in r["unknown_keys"]:
        lines.append(f"  unknown key (ComfyUI: 'lora key not loaded'): {k}")
    for t, names in r["duplicate_modules"].items():
        lines.append(f"  duplicate module {t}: {names}")
    for t, msg in r["shape_errors"].items():
        lines.append(f"  shape error {t}: {msg}")
    for w in r["warnings"]:
        lines.append(f"  warning: {w}")
    loader = "diffusers' Anima loader" if r.get("layout") == "diffusers" else "ComfyUI"
    ok = (f"  OK: {loader} loads every key" if not r.get("comfy_skipped_keys") else
          "  OK: ComfyUI loads every key but the kohya-named text-encoder ones")
    lines.append("  BROKEN: " + "; ".join(r["broken"]) if r["broken"] else ok)
    return "\n".join(lines)


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def format_analysis(a: NetworkAnalysis, top: int = 10) -> str:
    """Text for `anima-trainer inspect --analysis`: the update's energy per block type and per block, and the
    largest modules (definitions: docs/evaluation.md, "Weight analysis")."""
    lines = [f"{a.file}: weight analysis of {len(a.modules)} module(s) at strength 1; total |dW|_F "
             f"{a.total_norm:.6g}",
             "  share = part of the total |dW|_F^2; erank = effective rank exp(H(s_i/sum s)) (Roy & Vetterli); "
             "top = s_1^2/sum s^2; srank = sum s^2/s_1^2"]

    def group_table(title: str, groups: list[GroupStats], bar: bool) -> None:
        lines.append(f"  {title:<22} {'modules':>7} {'share':>7} {'|dW|_F':>10} {'erank':>7} {'top':>6}")
        for g in groups:
            tail = "  " + "#" * round(g.share * 40) if bar else ""
            lines.append(f"  {g.name:<22} {g.modules:>7} {g.share:>7.1%} {g.norm:>10.4g} "
                         f"{_num(g.mean_effective_rank, '.3g'):>7} {_num(g.mean_top_energy, '.2f'):>6}{tail}")

    group_table("block type", a.by_type, bar=True)
    group_table("block", a.by_block, bar=True)
    lines.append(f"  top {min(top, len(a.modules))} module(s) by |dW|_F:")
    lines.append(f"    {'module':<48} {'algo':<6} {'shape':<12} {'|dW|_F':>10} {'share':>7} {'erank':>7} "
                 f"{'srank':>7} {'top':>6}")
    for m in a.top_modules(top):
        share = m.energy / a.total_energy if a.total_energy else 0.0
        shape = "x".join(str(d) for d in m.shape)
        lines.append(f"    {m.target:<48} {m.algorithm:<6} {shape:<12} {m.norm:>10.4g} {share:>7.1%} "
                     f"{_num(m.effective_rank):>7} {_num(m.stable_rank):>7} {_num(m.top_energy, '.2f'):>6}")
    notes = sorted({m.note for m in a.modules if m.note})
    for note in notes:
        lines.append(f"  note: {sum(m.note == note for m in a.modules)} module(s): {note}")
    for target, why in a.skipped.items():
        lines.append(f"  skipped {target}: {why}")
    return "\n".join(lines)
