"""report.html (evaluation/report.py, plots.py) and its recommendation (recommend.py), on synthetic results built
from real SigmaMetric / StrengthMetrics objects, a real weight analysis and real PNG grids: the rules pick what
docs/evaluation.md says, the page is well-formed and self-contained, its numbers equal the results' to the shown
precision, it degrades when numbers are missing, and a real browser opens it without an error."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from anima_trainer.evaluation.drift import leak_score
from anima_trainer.evaluation.eval_results import CheckpointResult, EvalResults, GridImage
from anima_trainer.evaluation.probe import StrengthMetrics
from anima_trainer.evaluation.recommend import DEFAULT_DRIFT_THRESHOLD, Recommendation, recommend
from anima_trainer.evaluation.report import REPORT_NAME, write_report
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.networks.analysis import analyse_network
from tests.support.small_dit import lora, small_dit

SIGMAS = (0.2, 0.4, 0.6, 0.8)
SHAPE = (1.0, 1.25, 0.875, 0.5)  # per-σ profile; its mean is 0.90625
STRENGTHS = (0.0, 0.5, 0.8, 1.0)


def metric(name: str, level: float, strength: float | None = 1.0, samples: int = 6) -> SigmaMetric:
    per_sigma = tuple(level * k for k in SHAPE)
    return SigmaMetric(name, SIGMAS, per_sigma, sum(per_sigma) / len(per_sigma), samples, strength)


def strengths(drift_one: float, response_one: float | None, at: tuple[float, ...] = STRENGTHS,
              drifts: dict[float, float] | None = None) -> list[StrengthMetrics]:
    """Drift and response growing with the strength's square (as for a small update); `drifts` overrides the
    drift level at given strengths.  The leak score is drift.py's own (NaN at strength 0, where response is 0)."""
    out = []
    for s in at:
        drift = metric("preservation_drift", (drifts or {}).get(s, drift_one * s * s), s)
        if response_one is None:
            out.append(StrengthMetrics(s, drift))
            continue
        response = metric("trigger_response", response_one * s * s, s)
        out.append(StrengthMetrics(s, drift, response, leak_score(drift, response)))
    return out


def checkpoint(label: str, loss: float | None, drift_one: float, response_one: float | None = 0.2, *,
               step: int | None = None, ema: bool = False, analysis: dict | None = None,
               **kwargs) -> CheckpointResult:
    return CheckpointResult(label, f"/runs/x/{label}.safetensors", step=step, epoch=None, ema=ema,
                            heldout_loss=None if loss is None else metric("heldout_loss", loss, samples=3),
                            strengths=strengths(drift_one, response_one, **kwargs), analysis=analysis)


@pytest.fixture(scope="module")
def analysis() -> dict:
    return analyse_network(lora(small_dit())).to_dict()


def write_png(path: Path, size: tuple[int, int] = (24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 90)).save(path)


def full_results(folder: Path, analysis: dict) -> EvalResults:
    """Four checkpoints (one EMA), held-out loss, a trigger, an analysis per checkpoint, three real grids."""
    grids = [GridImage("grids/prompts.png", "prompts", "prompts × checkpoints", ["a cat", "sks, a cat"],
                       ["s100", "s200", "s300", "s300-ema"]),
             GridImage("grids/p00 cat.png", "strengths", "a cat <b>", ["s100", "s200"], ["0", "0.5", "1"], "a cat"),
             GridImage("grids/p01.png", "strengths", "the empty prompt", ["s100"], ["0", "1"], "")]
    for g in grids:
        write_png(folder / g.path)
    return EvalResults(
        command="anima-trainer eval --base dit.safetensors --network /runs/x --trigger sks </script>",
        settings={"trigger": "sks", "seeds": [0, 1], "strengths": list(STRENGTHS),
                  "prompts_without_trigger": [f"prompt {i}" for i in range(12)], "sample_steps": 20},
        checkpoints=[checkpoint("s100", 0.30, 0.002, 0.05, step=100, analysis=analysis),
                     checkpoint("s200", 0.25, 0.008, 0.12, step=200, analysis=analysis),
                     checkpoint("s300", 0.26, 0.030, 0.20, step=300, analysis=analysis),
                     checkpoint("s300-ema", 0.2412345678, 0.020, 0.18, step=300, ema=True, analysis=analysis)],
        base_heldout=metric("heldout_loss", 0.32, strength=None, samples=3), grids=grids,
        created="2026-12-07T02:00:00Z")


# ---------------------------------------------------------------------------------------------- recommendation

def results_of(*checkpoints: CheckpointResult, base: float | None = None) -> EvalResults:
    return EvalResults("anima-trainer eval", {}, list(checkpoints),
                       None if base is None else metric("heldout_loss", base, strength=None))


def test_lowest_heldout_loss_wins_ties_go_to_lower_drift_then_earlier():
    rec = recommend(results_of(checkpoint("a", 0.3, 0.001), checkpoint("b", 0.2, 0.02), checkpoint("c", 0.25, 0.0),
                               base=0.25))
    assert (rec.checkpoint, rec.index, rec.rule) == ("b", 1, "heldout_loss")
    assert rec.lines[0] == "Recommended: b — /runs/x/b.safetensors"
    assert "lowest overall held-out loss (0.18125) of the 3 checkpoints" in rec.lines[1]
    assert "this checkpoint's is 20.00 % lower than it" in rec.lines[2]
    tie = recommend(results_of(checkpoint("a", 0.2, 0.02), checkpoint("b", 0.2, 0.01), checkpoint("c", 0.2, 0.01)))
    assert tie.checkpoint == "b"  # equal loss: lower drift at strength 1, then the earlier one
    nan = checkpoint("n", 0.1, 0.0)
    nan = CheckpointResult(nan.label, nan.path, heldout_loss=SigmaMetric("heldout_loss", SIGMAS, (math.nan,) * 4,
                                                                         math.nan, 3, 1.0), strengths=nan.strengths)
    assert recommend(results_of(nan, checkpoint("a", 0.4, 0.0))).checkpoint == "a"  # NaN never wins
    worse = recommend(results_of(checkpoint("a", 0.3, 0.001), base=0.2))
    assert "50.00 % higher than it" in worse.lines[2] and "No checkpoint beats the base" in worse.lines[3]


def test_without_heldout_loss_the_highest_response_within_the_drift_budget():
    rec = recommend(results_of(checkpoint("a", None, 0.001, 0.05), checkpoint("b", None, 0.009, 0.15),
                               checkpoint("c", None, 0.05, 0.4)))
    assert (rec.checkpoint, rec.rule) == ("b", "trigger_response")
    response = f"{metric('trigger_response', 0.15).overall:.6g}"
    assert f"highest trigger response ({response}) among the 2 checkpoints" in rec.lines[1]
    over = recommend(results_of(checkpoint("a", None, 0.05, 0.1), checkpoint("b", None, 0.06, 0.3),
                                checkpoint("c", None, 0.03, 0.1)))
    assert over.checkpoint == "b"  # every drift over 0.01: the lowest leak score (0.2 vs 0.5 and 0.3)
    assert "lowest leak score (0.2)" in over.lines[1]
    assert recommend(results_of(checkpoint("a", None, 0.05, 0.1)), drift_threshold=0.1).checkpoint == "a"


def test_without_heldout_loss_or_trigger_the_last_checkpoint_and_why():
    rec = recommend(results_of(checkpoint("a", None, 0.001, None), checkpoint("b", None, 0.5, None, step=9,
                                                                              ema=True)))
    assert (rec.checkpoint, rec.index, rec.rule) == ("b", 1, "last")
    assert rec.lines[0] == "Recommended: b (step 9, EMA weights) — /runs/x/b.safetensors"
    assert "nothing here ranks the checkpoints by quality" in rec.lines[1]
    none = recommend(results_of())
    assert (none.checkpoint, none.index, none.rule, none.lines) == (
        None, None, "none", ("No checkpoints were evaluated: nothing to recommend.",))
    with pytest.raises(ValueError, match="drift_threshold must be a positive number"):
        recommend(results_of(), drift_threshold=math.nan)


def test_strength_range_from_the_measured_strengths():
    def rec(c: CheckpointResult, threshold: float = DEFAULT_DRIFT_THRESHOLD) -> Recommendation:
        return recommend(results_of(c), drift_threshold=threshold)

    every = rec(checkpoint("a", 0.2, 0.008))
    assert every.safe_strengths == (0.5, 0.8, 1.0) and every.max_strength == 1.0
    assert every.estimated_max_strength is None
    assert "Drift stays under the threshold at every measured strength (up to 1)." in every.lines
    assert any("1 (0.00725)" in line and "threshold 0.01 (≈ 10 %" in line for line in every.lines)
    partial = rec(checkpoint("a", 0.2, 0.02))  # drift 0.005, 0.0128, 0.02 (levels × 0.90625)
    assert partial.safe_strengths == (0.5,) and partial.max_strength == 0.5
    assert partial.estimated_max_strength == pytest.approx(math.sqrt(0.01 / (0.02 * 0.90625)))
    assert "Drift stays under the threshold up to strength 0.5." in partial.lines
    assert any("threshold is reached near strength 0.74" in line for line in partial.lines)
    none = rec(checkpoint("a", 0.2, 1.0))
    assert none.safe_strengths == () and none.max_strength is None
    assert any("exceeds the threshold at every measured strength (the lowest is 0.5)" in x for x in none.lines)
    bumpy = rec(checkpoint("a", 0.2, 0.0, drifts={0.5: 0.001, 0.8: 0.5, 1.0: 0.002}))
    assert bumpy.safe_strengths == (0.5, 1.0) and bumpy.max_strength == 0.5
    assert "It is not monotonic in the strength: also under the threshold at 1." in bumpy.lines
    nothing = rec(checkpoint("a", 0.2, 0.01, at=()))
    assert nothing.lines[-1] == "No preservation drift was measured for it: no strength range to give."
    assert json.loads(json.dumps(partial.as_dict()))["safe_strengths"] == [0.5]


# ---------------------------------------------------------------------------------------------- the page

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Balanced tags, the images' sources, the numbers' cells and the JSON islands of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: list[tuple[str, str]] = []  # (data-json pointer, shown text)
        self.islands: dict[str, str] = {}
        self._cell: str | None = None
        self._island: str | None = None
        self._text = ""
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])
        if a.get("data-json") is not None:
            self._cell, self._text = a["data-json"], ""
        if tag == "script":
            assert a.get("type") == "application/json", "the page runs no script"
            self._island, self._text = a["id"], ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.errors.append(f"self-closing <{tag}/>")

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if self._cell is not None and tag in ("td", "span"):
            self.cells.append((self._cell, self._text))
            self._cell = None
        if tag == "script":
            self.islands[self._island] = self._text
            self._island = None

    def handle_data(self, data):
        self._text += data


def resolve(data, pointer: str):
    for part in pointer.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def check_page(folder: Path, results: EvalResults, threshold: float = DEFAULT_DRIFT_THRESHOLD) -> Page:
    """The invariants every page keeps, whatever it holds; returns the parsed page."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a glyph matplotlib lacks, a layout it cannot do: a warning, here a failure
        path = write_report(results, folder, drift_threshold=threshold)
    assert path == folder / REPORT_NAME
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary left
    page = Page(path.read_text(encoding="utf-8"))
    assert page.errors == []
    for link in page.links:  # self-contained: data URIs and the folder's own files only
        assert link.startswith("data:") or ("://" not in link and not link.startswith("//")), link
    for src in page.images:
        if src.startswith("data:"):
            head, payload = src.split(",", 1)
            assert head == "data:image/png;base64"
            png = base64.b64decode(payload, validate=True)
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and Image.open(__import__("io").BytesIO(png)).size[0] > 0
        else:
            from urllib.parse import unquote
            assert (folder / unquote(src)).is_file(), src
    data = json.loads(page.islands["results"])
    assert data == results.as_dict()
    assert EvalResults.from_dict(data).as_dict() == results.as_dict()
    assert json.loads(page.islands["recommendation"]) == recommend(results, drift_threshold=threshold).as_dict()
    for at, shown in page.cells:
        value = resolve(data, at)
        if value is None:
            assert shown == "—", at
        elif isinstance(value, int) and not isinstance(value, bool):
            assert shown == str(value), at
        else:
            assert float(shown) == float(f"{value:.6g}"), (at, shown, value)
    return page


def test_the_full_page(tmp_path, analysis):
    results = full_results(tmp_path, analysis)
    page = check_page(tmp_path, results)
    assert page.images.count("grids/prompts.png") == 1 and "grids/p00%20cat.png" in page.images
    assert sum(src.startswith("data:") for src in page.images) == 6  # held-out ×2, @1, strength, types, blocks
    shown = dict(page.cells)
    # every measured number of every checkpoint is on the page, under its pointer
    for i, c in enumerate(results.checkpoints):
        assert shown[f"/checkpoints/{i}/heldout_loss/overall"] == f"{c.heldout_loss.overall:.6g}"
        for j, s in enumerate(c.strengths):
            for name in s.metrics():
                for sigma in ("0.2", "0.4", "0.6", "0.8"):
                    assert f"/checkpoints/{i}/strengths/{j}/{name}/per_sigma/{sigma}" in shown
                assert f"/checkpoints/{i}/strengths/{j}/{name}/overall" in shown
        assert f"/checkpoints/{i}/analysis/total_norm" in shown
    assert shown["/checkpoints/3/heldout_loss/overall"] == "0.218619"  # 0.2412345678 × 0.90625 = 0.2186188…
    assert shown["/checkpoints/0/strengths/0/leak_score/overall"] == "—"  # NaN (no response at strength 0)
    assert "/base_heldout/per_sigma/0.8" in shown
    assert any(at.startswith("/checkpoints/3/analysis/modules/") for at in shown)  # the recommended one's top modules
    text = (tmp_path / REPORT_NAME).read_text(encoding="utf-8")
    assert "Recommended: s300-ema (step 300, EMA weights)" in text  # lowest held-out loss
    assert "--trigger sks &lt;/script&gt;" in text and "a cat &lt;b&gt;" in text  # escaped, the island intact
    assert '<tr class="picked">' in text and "12 items" in text


def test_graceful_without_heldout_trigger_analysis_or_grids(tmp_path):
    results = EvalResults("anima-trainer eval --network a.safetensors", {},
                          [checkpoint("only", None, 0.004, None)])
    page = check_page(tmp_path, results)
    text = (tmp_path / REPORT_NAME).read_text(encoding="utf-8")
    for note in ("No held-out loss: no held-out images were given", "No trigger was given",
                 "No weight analysis was computed.", "No image grids were drawn.", "No settings were recorded.",
                 "Recommended: only — /runs/x/only.safetensors"):
        assert note in text, note
    assert len(page.images) == 2  # drift at strength 1 and against the strength: one checkpoint, one point each
    assert "/checkpoints/0/strengths/3/preservation_drift/overall" in dict(page.cells)


def test_graceful_with_nothing_measured_and_a_missing_grid(tmp_path):
    results = EvalResults("", {}, [CheckpointResult("a", "a.safetensors", analysis={"total_energy": 0.0})],
                          grids=[GridImage("gone.png", "prompts", "lost grid", ["a"], ["a"])])
    page = check_page(tmp_path, results)
    text = (tmp_path / REPORT_NAME).read_text(encoding="utf-8")
    assert page.images == [] and "the file gone.png is missing from this folder" in text
    assert "No preservation drift was measured for it" in text and "(not recorded)" in text
    empty = check_page(tmp_path / "empty", EvalResults("x", {}, []))
    assert empty.images == [] and "No checkpoints were evaluated" in (tmp_path / "empty" / REPORT_NAME).read_text()


def test_the_page_in_a_real_browser(tmp_path, analysis):
    """Chromium opens the page from the disk: every image loads, no console or page error, nothing fetched from
    anywhere but the folder and the page's own data URIs."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = os.environ.get("CHROMIUM_PATH") or "/usr/bin/chromium"
    if not (Path(chromium).is_file() or shutil.which(chromium)):
        pytest.skip(f"no chromium binary at {chromium} (set CHROMIUM_PATH)")
    results = full_results(tmp_path, analysis)
    path = write_report(results, tmp_path)
    problems, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console error: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.currentSrc.slice(0, 40), e.complete, "
                                                      "e.naturalWidth])")
            data = page.eval_on_selector("#results", "e => JSON.parse(e.textContent)")
            found = list(problems)
            page.set_content("<script>console.error('seen'); null.x;</script>")  # the listeners do listen
            page.wait_for_timeout(100)
            control = problems[len(found):]
        finally:
            browser.close()
    assert found == []
    assert control[0] == "console error: seen" and control[1].startswith("page error:"), control
    assert len(images) == 9 and all(complete and width > 0 for _, complete, width in images), images
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    assert data == results.as_dict()


def test_analysis_of_another_checkpoint_when_the_recommended_has_none(tmp_path, analysis):
    results = EvalResults("anima-trainer eval", {"trigger": "sks"},
                          [checkpoint("a", 0.3, 0.001, analysis=analysis), checkpoint("b", 0.2, 0.002)],
                          grids=[GridImage("g.png", "other", "a custom grid", ["a"], ["b"])])
    write_png(tmp_path / "g.png")
    page = check_page(tmp_path, results, threshold=0.5)
    text = (tmp_path / REPORT_NAME).read_text(encoding="utf-8")
    assert "Recommended: b" in text and "Shown for the last analysed checkpoint (the recommended one has no" in text
    assert "<h3>Other grids</h3>" in text and "g.png" in page.images
    shown = dict(page.cells)
    assert "/checkpoints/0/analysis/by_block/0/norm" in shown and shown["/checkpoints/1/heldout_loss/overall"]
    assert "threshold 0.5 (≈ 71 %" in text
