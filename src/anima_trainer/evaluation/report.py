"""`report.html`: an evaluation on one self-contained page (docs/evaluation.md, "The report").

The page holds the recommendation (recommend.py), the command that reproduces the folder and its settings, the
curves across checkpoints and against the strength (plots.py, embedded as PNG data URIs), the image grids (the
folder's own PNG files, by relative path), the weight analysis and a table of every number.  No server, no
script, nothing loaded from elsewhere: it opens from the disk in any browser.

Every number in a table carries `data-json`, a JSON pointer (RFC 6901) into the `results` data island — the
whole `EvalResults.as_dict()`, what results.json holds — and shows that value to 6 significant digits ("—" for
null), so a test or a user can check the page against the file.  The recommendation is a second island.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from anima_trainer.evaluation import plots
from anima_trainer.evaluation.eval_results import CheckpointResult, EvalResults, GridImage
from anima_trainer.evaluation.recommend import (
    DEFAULT_DRIFT_THRESHOLD,
    Recommendation,
    fmt,
    overall,
    recommend,
)
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.fileio import atomic_write_bytes
from anima_trainer.networks.analysis import BLOCK_TYPES

REPORT_NAME = "report.html"
DIGITS = 6  # significant digits of every number on the page
TOP_MODULES = 10
STRENGTH_METRICS = ("preservation_drift", "trigger_response", "leak_score")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta, .note { color: #555; } .missing { color: #a33; }
.rec { background: #eef6ee; border: 1px solid #8b8; border-radius: 6px; padding: 0.6em 1.2em; }
.rec p { margin: 0.35em 0; } .rec p:first-child { font-weight: bold; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.picked td { background: #eef6ee; font-weight: bold; }
img { max-width: 100%; height: auto; } figure { margin: 1em 0; } figcaption { color: #444; font-size: 0.9em; }
.scroll { overflow-x: auto; } summary { cursor: pointer; margin: 0.4em 0; }
"""


def pointer(*parts: object) -> str:
    """A JSON pointer (RFC 6901) to `parts` in the results island."""
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def num(value: float | int | None, at: str | None = None) -> str:
    """A number cell: 6 significant digits (ints as written), "—" for None or NaN, its JSON pointer when given."""
    if isinstance(value, bool) or value is None or (isinstance(value, float) and not math.isfinite(value)):
        text = "—"
    elif isinstance(value, int):
        text = str(value)
    else:
        text = fmt(float(value), DIGITS)
    ref = f' data-json="{_e(at)}"' if at is not None else ""
    return f'<td class="n"{ref}>{text}</td>'


def txt(value: object) -> str:
    return f"<td>{_e('—' if value is None else value)}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table of pre-rendered cells (`num` / `txt`)."""
    rows = list(rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    classes = list(row_classes or [""] * len(rows))
    body = "".join((f'<tr class="{_e(css)}">' if css else "<tr>") + "".join(cells) + "</tr>"
                   for css, cells in zip(classes, rows, strict=True))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def image(png: bytes | None, alt: str, absent: str) -> str:
    """An embedded plot, or the sentence saying why there is none."""
    if png is None:
        return f'<p class="note">{_e(absent)}</p>'
    return f'<figure><img src="{plots.data_uri(png)}" alt="{_e(alt)}"></figure>'


def _island(name: str, data: Any) -> str:
    """A JSON data island; `<` escaped as \\u003c so no text in it can close the script element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, indent=1).replace("<", "\\u003c")
    return f'<script type="application/json" id="{name}">{text}</script>'


def _metric_cells(metric: SigmaMetric | None, sigmas: Sequence[float], *at: object) -> list[str]:
    """overall, each σ bucket, samples of a metric, pointing into `at` (its place in the results)."""
    if metric is None:
        return [num(None)] * (len(sigmas) + 2)
    cells = [num(metric.overall, pointer(*at, "overall"))]
    for s in sigmas:
        cells.append(num(metric.at(s), pointer(*at, "per_sigma", f"{s:g}")) if s in metric.sigmas else num(None))
    return [*cells, num(metric.samples, pointer(*at, "samples"))]


def _checkpoint_name(c: CheckpointResult) -> str:
    return c.label + (" (EMA)" if c.ema else "")


def _strength_one_index(c: CheckpointResult) -> int | None:
    return next((j for j, s in enumerate(c.strengths) if s.strength == 1.0), None)


def _settings_section(results: EvalResults) -> str:
    rows = []
    for key, value in results.settings.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            cell = txt(value)
        elif (isinstance(value, list) and len(value) <= 8
              and all(isinstance(v, (int, float, str)) and len(str(v)) < 40 for v in value)):
            cell = txt(", ".join(str(v) for v in value))
        else:
            size = f"{len(value)} items" if isinstance(value, (list, dict)) else "value"
            cell = (f"<td><details><summary>{_e(size)}</summary><pre>"
                    f"{_e(json.dumps(value, ensure_ascii=False, indent=1))}</pre></details></td>")
        rows.append([txt(key), cell])
    settings = table(["setting", "value"], rows) if rows else '<p class="note">No settings were recorded.</p>'
    command = results.command or "(not recorded)"
    return (f"<h2>Reproduce</h2><p>This command writes this folder again (same numbers, same images):</p>"
            f"<pre><code>{_e(command)}</code></pre><h3>Settings</h3>{settings}")


def _overview(results: EvalResults, rec: Recommendation) -> str:
    if not results.checkpoints:
        return '<h2>Checkpoints</h2><p class="note">No checkpoints were evaluated.</p>'
    headers = ["#", "checkpoint", "step", "epoch", "EMA", "held-out loss", "drift @1", "response @1", "leak @1",
               "‖ΔW‖_F", "file"]
    rows, classes = [], []
    for i, c in enumerate(results.checkpoints):
        j = _strength_one_index(c)
        one = None if j is None else c.strengths[j]
        at_one = [num(None) if one is None or getattr(one, n) is None
                  else num(getattr(one, n).overall, pointer("checkpoints", i, "strengths", j, n, "overall"))
                  for n in STRENGTH_METRICS]
        heldout = (num(None) if c.heldout_loss is None
                   else num(c.heldout_loss.overall, pointer("checkpoints", i, "heldout_loss", "overall")))
        norm = ((c.analysis or {}).get("total_norm"))
        rows.append([num(i), txt(c.label), num(c.step, pointer("checkpoints", i, "step")),
                     num(c.epoch, pointer("checkpoints", i, "epoch")), txt("yes" if c.ema else ""), heldout, *at_one,
                     num(norm, pointer("checkpoints", i, "analysis", "total_norm") if norm is not None else None),
                     txt(c.path)])
        classes.append("picked" if i == rec.index else "")
    base = ""
    if results.base_heldout is not None:
        base = (f'<p>Base model (strength 0): held-out loss <span data-json="{pointer("base_heldout", "overall")}">'
                f"{fmt(results.base_heldout.overall, DIGITS)}</span>.</p>")
    return (f"<h2>Checkpoints</h2><p class=\"note\">In training order; the recommended one is highlighted. "
            f"@1: at strength 1.</p>{base}{table(headers, rows, classes)}")


def _curves(results: EvalResults, threshold: float, has_heldout: bool, has_trigger: bool) -> str:
    parts = ["<h2>Across checkpoints</h2>"]
    if has_heldout:
        parts.append(image(plots.heldout_plot(results), "held-out loss across checkpoints", ""))
        parts.append(image(plots.heldout_sigma_plot(results), "held-out loss per σ bucket", ""))
        parts.append(_heldout_table(results))
    else:
        parts.append('<p class="note">No held-out loss: no held-out images were given (a validation split or an '
                     "image folder).</p>")
    if not has_trigger:
        parts.append('<p class="note">No trigger was given: preservation drift only, no trigger response or leak '
                     "score.</p>")
    parts.append(image(plots.strength_one_plot(results, threshold), "drift, response and leak at strength 1",
                       "No drift was measured at strength 1."))
    return "".join(parts)


def _strength_section(results: EvalResults, threshold: float) -> str:
    parts = ["<h2>By strength</h2>",
             f'<p class="note">Preservation drift should stay under the threshold ({fmt(threshold)}, dotted); it grows'
             " about with the square of the strength.</p>",
             image(plots.strength_plot(results, threshold), "drift and response against the strength",
                   "No strengths were measured.")]
    for name in STRENGTH_METRICS:
        metrics = [getattr(s, name) for c in results.checkpoints for s in c.strengths]
        if not any(m is not None for m in metrics):
            continue
        sigmas = plots.sigma_buckets(metrics)
        rows = [[txt(_checkpoint_name(c)), num(s.strength, pointer("checkpoints", i, "strengths", j, "strength")),
                 *_metric_cells(getattr(s, name), sigmas, "checkpoints", i, "strengths", j, name)]
                for i, c in enumerate(results.checkpoints) for j, s in enumerate(c.strengths)]
        parts.append(f"<details><summary>{_e(plots.METRIC_TITLES[name])}: every checkpoint and strength, per σ"
                     "</summary>"
                     + table(["checkpoint", "strength", "overall", *(f"σ {s:g}" for s in sigmas), "samples"], rows)
                     + "</details>")
    return "".join(parts)


def _heldout_table(results: EvalResults) -> str:
    sigmas = plots.sigma_buckets([results.base_heldout, *(c.heldout_loss for c in results.checkpoints)])
    rows = []
    if results.base_heldout is not None:
        rows.append([txt("base model (strength 0)"), *_metric_cells(results.base_heldout, sigmas, "base_heldout")])
    rows += [[txt(_checkpoint_name(c)), *_metric_cells(c.heldout_loss, sigmas, "checkpoints", i, "heldout_loss")]
             for i, c in enumerate(results.checkpoints)]
    return ("<h3>held-out loss</h3>"
            + table(["model", "overall", *(f"σ {s:g}" for s in sigmas), "images"], rows))


def _grid_figure(grid: GridImage, folder: Path | None) -> str:
    caption = [f"<strong>{_e(grid.title)}</strong>"]
    if grid.prompt is not None:
        caption.append(f"prompt: <code>{_e(grid.prompt or '(empty)')}</code>")
    caption.append(f"rows: {_e(', '.join(grid.rows))}; columns: {_e(', '.join(grid.columns))}")
    if folder is not None and not (folder / grid.path).is_file():
        return f'<p class="missing">Grid {_e(grid.title)}: the file {_e(grid.path)} is missing from this folder.</p>'
    src = quote(Path(grid.path).as_posix())
    return (f'<figure><img src="{_e(src)}" alt="{_e(grid.title)}"><figcaption>{"<br>".join(caption)}'
            "</figcaption></figure>")


def _grids(results: EvalResults, folder: Path | None) -> str:
    if not results.grids:
        return '<h2>Image grids</h2><p class="note">No image grids were drawn.</p>'
    parts = ["<h2>Image grids</h2>"]
    groups = (("prompts", "Prompts × checkpoints at strength 1"), ("strengths", "Checkpoints × strengths per prompt"))
    other = [g for g in results.grids if g.kind not in {k for k, _ in groups}]
    for kind, title in (*groups, ("", "Other grids")):
        chosen = [g for g in results.grids if g.kind == kind] if kind else other
        if chosen:
            parts.append(f"<h3>{_e(title)}</h3>" + "".join(_grid_figure(g, folder) for g in chosen))
    return "".join(parts)


def _analysis_section(results: EvalResults, rec: Recommendation) -> str:
    parts = ["<h2>Weight analysis</h2>"]
    analysed = [(i, c) for i, c in enumerate(results.checkpoints) if c.analysis]
    if not analysed:
        return "".join(parts) + '<p class="note">No weight analysis was computed.</p>'
    parts.append(image(plots.block_type_share_plot(results, BLOCK_TYPES), "share of the update per block type",
                       "The analyses hold no per-type numbers."))
    kinds = [k for k in BLOCK_TYPES if any(g.get("name") == k for _, c in analysed
                                           for g in c.analysis.get("by_type") or [])]
    rows = []
    for i, c in analysed:
        by_type = c.analysis.get("by_type") or []
        cells = []
        for kind in kinds:
            k = next((k for k, g in enumerate(by_type) if g.get("name") == kind), None)
            cells.append(num(None) if k is None else
                         num(by_type[k].get("share"), pointer("checkpoints", i, "analysis", "by_type", k, "share")))
        total = c.analysis.get("total_norm")
        rows.append([txt(_checkpoint_name(c)), *cells,
                     num(total, None if total is None else pointer("checkpoints", i, "analysis", "total_norm"))])
    parts.append("<h3>share of ‖ΔW‖² per block type</h3>" + table(["checkpoint", *kinds, "total ‖ΔW‖_F"], rows))

    index = rec.index if rec.index is not None and results.checkpoints[rec.index].analysis else analysed[-1][0]
    chosen = results.checkpoints[index]
    which = ("the recommended checkpoint" if index == rec.index
             else "the last analysed checkpoint (the recommended one has no analysis)")
    parts.append(f"<h3>{_e(chosen.label)}: per block and top modules</h3><p class=\"note\">Shown for {which}.</p>")
    parts.append(image(plots.block_norm_plot(chosen), f"per-block norms of {chosen.label}",
                       "Its analysis holds no per-block numbers."))
    at = ("checkpoints", index, "analysis")
    blocks = chosen.analysis.get("by_block") or []
    if blocks:
        parts.append(table(["block", "modules", "‖ΔW‖_F", "share", "mean erank", "mean top energy"],
                           [[txt(g.get("name")), num(g.get("modules"), pointer(*at, "by_block", k, "modules")),
                             *(num(g.get(f), pointer(*at, "by_block", k, f))
                               for f in ("norm", "share", "mean_effective_rank", "mean_top_energy"))]
                            for k, g in enumerate(blocks)]))
    modules = chosen.analysis.get("modules") or []
    top = sorted(range(len(modules)), key=lambda k: modules[k].get("energy") or 0.0, reverse=True)[:TOP_MODULES]
    if top:
        fields = ("norm", "energy", "effective_rank", "stable_rank", "top_energy")
        parts.append(f"<p>The {len(top)} modules with the largest update (of {len(modules)}):</p>")
        parts.append(table(["module", "block type", "algorithm", "shape", "‖ΔW‖_F", "‖ΔW‖²", "erank", "stable rank",
                            "top energy", "note"],
                           [[txt(modules[k].get("target")), txt(modules[k].get("block_type")),
                             txt(modules[k].get("algorithm")),
                             txt("×".join(str(d) for d in modules[k].get("shape") or [])),
                             *(num(modules[k].get(f), pointer(*at, "modules", k, f)) for f in fields),
                             txt(modules[k].get("note") or "")] for k in top]))
    skipped = chosen.analysis.get("skipped") or {}
    if skipped:
        parts.append(f'<p class="note">{len(skipped)} module(s) without a ΔW (e.g. set_weight) are left out.</p>')
    return "".join(parts)


def render_report(results: EvalResults, folder: str | Path | None = None, *,
                  drift_threshold: float = DEFAULT_DRIFT_THRESHOLD) -> str:
    """The page's HTML.  `folder`: where the grids live (a grid whose file is missing there is named as missing
    instead of shown as a broken image); None: taken as present."""
    folder = None if folder is None else Path(folder)
    rec = recommend(results, drift_threshold=drift_threshold)
    has_heldout = any(overall(c.heldout_loss) is not None for c in results.checkpoints)
    has_trigger = any(s.trigger_response is not None for c in results.checkpoints for s in c.strengths)
    box = "".join(f"<p>{_e(line)}</p>" for line in rec.lines)
    created = f"written {_e(results.created)}; " if results.created else ""
    body = [
        "<h1>Evaluation report</h1>",
        f'<p class="meta">{created}{len(results.checkpoints)} checkpoint(s); every number here is in the '
        "<code>results</code> data island at the end of this page and in <code>results.json</code>. What each "
        "number means: docs/evaluation.md of anima-trainer.</p>",
        f'<h2>Recommendation</h2><section class="rec">{box}</section>',
        _settings_section(results),
        _overview(results, rec),
        _curves(results, drift_threshold, has_heldout, has_trigger),
        _strength_section(results, drift_threshold),
        _grids(results, folder),
        _analysis_section(results, rec),
        _island("results", results.as_dict()),
        _island("recommendation", rec.as_dict()),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="generator" content="anima-trainer eval">'
            '<link rel="icon" href="data:,">'
            f"<title>Evaluation report</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(results: EvalResults, folder: str | Path, *,
                 drift_threshold: float = DEFAULT_DRIFT_THRESHOLD) -> Path:
    """Write `<folder>/report.html` (through the one atomic write path) and return its path."""
    folder = Path(folder)
    page = render_report(results, folder, drift_threshold=drift_threshold)
    return atomic_write_bytes(page.encode("utf-8"), folder / REPORT_NAME, what="evaluation report ")
