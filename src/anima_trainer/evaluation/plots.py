"""The report's figures as PNG bytes: curves across checkpoints, drift and response against the strength, the
weight analysis' shares and norms (docs/evaluation.md, "The report").

Drawn with matplotlib's object API (`Figure` + `FigureCanvasAgg`), so rendering never touches `pyplot` or the
global backend of the process that calls it.  Every function returns None when its numbers were not measured,
and the page says so instead of showing an empty plot.  Checkpoints sit at their position in
`EvalResults.checkpoints` (training order); EMA checkpoints are their own series.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anima_trainer.evaluation.eval_results import CheckpointResult, EvalResults
from anima_trainer.evaluation.recommend import at_strength_one, overall
from anima_trainer.evaluation.results import SigmaMetric

RAW, EMA, BASE, LIMIT = "C0", "C1", "0.35", "C3"
METRIC_TITLES = {"heldout_loss": "held-out loss", "preservation_drift": "preservation drift",
                 "trigger_response": "trigger response", "leak_score": "leak score"}


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (Agg, 100 dpi; no software tag, so equal numbers give equal bytes)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI: the page stays one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _value(v: float | None) -> float:
    return math.nan if v is None or not math.isfinite(v) else v


def _checkpoint_axis(ax: Any, checkpoints: Sequence[CheckpointResult]) -> None:
    ax.set_xticks(range(len(checkpoints)))
    ax.set_xticklabels([c.label for c in checkpoints], rotation=35, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(checkpoints) - 0.5)
    ax.grid(True, alpha=0.3)


def _series(ax: Any, checkpoints: Sequence[CheckpointResult], value: Callable[[CheckpointResult], float | None],
            label: str = "") -> bool:
    """The raw checkpoints' values as one line, the EMA ones as another; False when nothing was measured."""
    drawn = False
    for ema, color, name in ((False, RAW, "raw"), (True, EMA, "EMA")):
        xs = [i for i, c in enumerate(checkpoints) if c.ema == ema]
        ys = [_value(value(checkpoints[i])) for i in xs]
        if any(math.isfinite(y) for y in ys):
            ax.plot(xs, ys, marker="o", color=color, linestyle="--" if ema else "-",
                    label=" ".join(x for x in (label, name) if x))
            drawn = True
    return drawn


def heldout_plot(results: EvalResults) -> bytes | None:
    """Overall held-out loss per checkpoint, the base model's as a horizontal line."""
    checkpoints = results.checkpoints
    if not any(overall(c.heldout_loss) is not None for c in checkpoints):
        return None
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    _series(ax, checkpoints, lambda c: overall(c.heldout_loss))
    base = overall(results.base_heldout)
    if base is not None:
        ax.axhline(base, color=BASE, linestyle=":", label="base model")
    ax.set_title("held-out loss (overall, strength 1; lower is better)", fontsize=10)
    _checkpoint_axis(ax, checkpoints)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def sigma_buckets(metrics: Iterable[SigmaMetric | None]) -> list[float]:
    """The σ buckets of `metrics` (None: not measured), in first-seen order: the columns of a σ table."""
    seen: list[float] = []
    for m in metrics:
        for s in () if m is None else m.sigmas:
            if s not in seen:
                seen.append(s)
    return seen


def _bucket(metric: SigmaMetric | None, sigma: float) -> float | None:
    if metric is None or sigma not in metric.sigmas:
        return None
    return metric.at(sigma)


def heldout_sigma_plot(results: EvalResults) -> bytes | None:
    """Held-out loss per σ bucket across checkpoints, one panel per σ (base as a line in each)."""
    checkpoints = results.checkpoints
    sigmas = sigma_buckets([c.heldout_loss for c in checkpoints])
    if not sigmas:
        return None
    fig = Figure(figsize=(max(9, 2.6 * len(sigmas)), 3.4), layout="constrained")
    axes = fig.subplots(1, len(sigmas), squeeze=False)[0]
    for ax, sigma in zip(axes, sigmas, strict=True):
        _series(ax, checkpoints, lambda c, s=sigma: _bucket(c.heldout_loss, s))
        base = _bucket(results.base_heldout, sigma)
        if base is not None and math.isfinite(base):
            ax.axhline(base, color=BASE, linestyle=":", label="base")
        ax.set_title(f"σ = {sigma:g}", fontsize=9)
        _checkpoint_axis(ax, checkpoints)
    axes[0].legend(fontsize=7)
    fig.suptitle("held-out loss per σ bucket (high σ: composition, low σ: detail)", fontsize=10)
    return png_bytes(fig)


def strength_one_plot(results: EvalResults, threshold: float) -> bytes | None:
    """Preservation drift (threshold drawn), trigger response and leak score at strength 1 across checkpoints."""
    checkpoints = results.checkpoints
    names = [n for n in ("preservation_drift", "trigger_response", "leak_score")
             if any(at_strength_one(c, n) is not None for c in checkpoints)]
    if not names:
        return None
    fig = Figure(figsize=(max(9, 3.4 * len(names)), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        _series(ax, checkpoints, lambda c, n=name: at_strength_one(c, n))
        if name == "preservation_drift":
            ax.axhline(threshold, color=LIMIT, linestyle=":", label=f"threshold {threshold:g}")
        ax.set_title(METRIC_TITLES[name], fontsize=9)
        _checkpoint_axis(ax, checkpoints)
        ax.legend(fontsize=7)
    fig.suptitle("at strength 1, across checkpoints", fontsize=10)
    return png_bytes(fig)


def strength_plot(results: EvalResults, threshold: float) -> bytes | None:
    """Drift (threshold drawn) and response against the strength, one line per checkpoint (EMA dashed)."""
    checkpoints = [c for c in results.checkpoints if c.strengths]
    if not checkpoints:
        return None
    names = ["preservation_drift"]
    if any(s.trigger_response is not None for c in checkpoints for s in c.strengths):
        names.append("trigger_response")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    cmap = colormaps["viridis"]  # dark to green: its last 15 % (yellow) is too light on white
    for ax, name in zip(axes, names, strict=True):
        for k, c in enumerate(checkpoints):
            points = sorted((s.strength, _value(overall(getattr(s, name)))) for s in c.strengths)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                    color=cmap(0.85 * k / max(1, len(checkpoints) - 1)), linestyle="--" if c.ema else "-",
                    label=c.label + (" (EMA)" if c.ema else ""))
        if name == "preservation_drift":
            limit = ax.axhline(threshold, color=LIMIT, linestyle=":", label=f"threshold {threshold:g}")
            if len(names) > 1:  # the checkpoints' legend sits by the last panel
                ax.legend(handles=[limit], fontsize=7, loc="upper left")
        ax.set_xlabel("strength", fontsize=8)
        ax.set_title(METRIC_TITLES[name], fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("against the strength, per checkpoint", fontsize=10)
    return png_bytes(fig)


def block_type_share_plot(results: EvalResults, block_types: Sequence[str]) -> bytes | None:
    """The share of ‖ΔW‖² per block type, one stacked bar per checkpoint with a weight analysis."""
    analysed = [c for c in results.checkpoints if c.analysis and c.analysis.get("by_type")]
    if not analysed:
        return None
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.add_subplot()
    bottoms = [0.0] * len(analysed)
    for k, kind in enumerate(block_types):
        shares = [next((g.get("share", 0.0) for g in c.analysis["by_type"] if g.get("name") == kind), 0.0) or 0.0
                  for c in analysed]
        if not any(shares):
            continue
        ax.bar(range(len(analysed)), shares, bottom=bottoms, color=f"C{k}", label=kind)
        bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
    _checkpoint_axis(ax, analysed)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of ‖ΔW‖²", fontsize=8)
    ax.set_title("where the update goes: share of ‖ΔW‖² per block type", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return png_bytes(fig)


def block_norm_plot(checkpoint: CheckpointResult) -> bytes | None:
    """‖ΔW‖_F per block of one checkpoint (horizontal bars, in the model's block order)."""
    blocks = (checkpoint.analysis or {}).get("by_block") or []
    if not blocks:
        return None
    fig = Figure(figsize=(9, min(12.0, 1.2 + 0.22 * len(blocks))), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(blocks)), [_value(g.get("norm")) for g in blocks], color=RAW)
    ax.set_yticks(range(len(blocks)))
    ax.set_yticklabels([str(g.get("name")) for g in blocks], fontsize=7)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel("‖ΔW‖_F of the block's updates together", fontsize=8)
    ax.set_title(f"per-block update norm: {checkpoint.label}", fontsize=10)
    return png_bytes(fig)
