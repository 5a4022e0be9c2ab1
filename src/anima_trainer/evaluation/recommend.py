"""The report's recommendation: which checkpoint to use and up to which strength, from an evaluation's numbers
(docs/evaluation.md, "The report").

The checkpoint, by the first rule whose numbers were measured:

1. **held-out loss**: the lowest overall held-out loss (at strength 1).  It is the one number that says how well
   a checkpoint does the trained task on images it never saw; ties go to the lower preservation drift at
   strength 1, then to the earlier checkpoint (fewer steps, less to forget).
2. **trigger response within the drift budget** (no held-out images, but a trigger): among the checkpoints whose
   preservation drift at strength 1 stays under the threshold, the one with the highest trigger response — the
   most learnt while the prompts without the trigger are kept; ties go to the lower leak score, then the earlier
   checkpoint.  When every checkpoint drifts past the threshold: the lowest leak score (the most
   trigger-specific one), ties to the higher response, then the earlier checkpoint.
3. **the last checkpoint** (neither held-out loss nor trigger response): nothing measures quality, so the most
   trained one is named and the page says to judge by the grids.

NaN (an undefined leak score) and missing numbers never win a comparison: a checkpoint without the number a rule
ranks by is left out of that rule.

The strength range: the recommended checkpoint's measured strengths above 0 (0 is the base itself) whose
preservation drift stays at or under the threshold.  `max_strength` is the largest measured strength up to which
every measured strength stays under it.  Drift is ‖Δv‖² / ‖v_base‖², a relative *squared* change; the default
threshold 0.01 is a 10 % change of the velocity's norm on prompts without the trigger (√0.01), the level the one
public Anima trainer with this metric (Anima-training-framework) calls healthy — strict on purpose: a LoRA
should leave prompts that do not ask for it close to the base.  For a small update drift grows with the
strength's square, so a checkpoint over the threshold at strength 1 is often under it at a lower strength; the
page gives that estimate, marked as one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from anima_trainer.evaluation.eval_results import CheckpointResult, EvalResults
from anima_trainer.evaluation.results import SigmaMetric

DEFAULT_DRIFT_THRESHOLD = 0.01
RULES = ("heldout_loss", "trigger_response", "last", "none")


@dataclass(frozen=True)
class Recommendation:
    """The pick and why.  `index`: the checkpoint's position in `EvalResults.checkpoints` (None: none to pick);
    `rule`: one of RULES; `safe_strengths`: the measured strengths > 0 whose drift is ≤ the threshold;
    `max_strength`: the largest measured strength with every measured strength up to it under the threshold
    (None: none is); `estimated_max_strength`: drift(1)·s² = threshold solved for s, when a strength went over;
    `lines`: the sentences the page shows."""

    checkpoint: str | None
    index: int | None
    rule: str
    drift_threshold: float
    safe_strengths: tuple[float, ...]
    max_strength: float | None
    estimated_max_strength: float | None
    lines: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON (the page's `recommendation` data island)."""
        d = asdict(self)
        d["safe_strengths"] = list(self.safe_strengths)
        d["lines"] = list(self.lines)
        return d


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def overall(metric: SigmaMetric | None) -> float | None:
    """A metric's overall value, None when it was not measured or is undefined (NaN)."""
    return metric.overall if metric is not None and finite(metric.overall) else None


def at_strength_one(checkpoint: CheckpointResult, name: str) -> float | None:
    """`name`'s overall value at strength 1 (None: not measured, or NaN)."""
    measured = checkpoint.at_strength(1.0)
    return None if measured is None else overall(getattr(measured, name))


def fmt(value: float | None, digits: int = 6) -> str:
    """A number as the page shows it: `digits` significant digits, "—" for None and NaN."""
    return f"{value:.{digits}g}" if finite(value) else "—"


def _pick(candidates: list[tuple[int, CheckpointResult]],
          key: Callable[[CheckpointResult], tuple]) -> tuple[int, CheckpointResult]:
    """The candidate with the smallest key, the earlier one on a tie (the index is the last key)."""
    return min(candidates, key=lambda item: (*key(item[1]), item[0]))


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _by_heldout(results: EvalResults) -> tuple[int, list[str]] | None:
    measured = [(i, c) for i, c in enumerate(results.checkpoints) if overall(c.heldout_loss) is not None]
    if not measured:
        return None
    index, best = _pick(measured, lambda c: (overall(c.heldout_loss),
                                             _or_inf(at_strength_one(c, "preservation_drift"))))
    loss = overall(best.heldout_loss)
    lines = [f"Chosen for the lowest overall held-out loss ({fmt(loss)}) of the {len(measured)} checkpoint"
             f"{'s' if len(measured) != 1 else ''} with a held-out loss."]
    base = overall(results.base_heldout)
    if base is not None and base != 0:
        change = (loss - base) / abs(base) * 100
        relation = (f"{-change:.2f} % lower than" if change < 0 else f"{change:.2f} % higher than" if change > 0
                    else "equal to")
        lines.append(f"The base model's held-out loss is {fmt(base)}: this checkpoint's is {relation} it.")
        if loss >= base:
            lines.append("No checkpoint beats the base on the held-out images: the network does not (yet) help "
                         "there — check the held-out images match the training concept, or train longer.")
    return index, lines


def _by_response(results: EvalResults, threshold: float) -> tuple[int, list[str]] | None:
    measured = [(i, c) for i, c in enumerate(results.checkpoints)
                if at_strength_one(c, "trigger_response") is not None
                and at_strength_one(c, "preservation_drift") is not None]
    if not measured:
        return None
    within = [(i, c) for i, c in measured if at_strength_one(c, "preservation_drift") <= threshold]
    head = "No held-out images were given, so there is no held-out loss to rank by. "
    if within:
        index, best = _pick(within, lambda c: (-at_strength_one(c, "trigger_response"),
                                               _or_inf(at_strength_one(c, "leak_score"))))
        response = fmt(at_strength_one(best, "trigger_response"))
        return index, [head + f"Chosen for the highest trigger response ({response})"
                       f" among the {len(within)} checkpoint{'s' if len(within) != 1 else ''} whose preservation "
                       f"drift at strength 1 stays under {fmt(threshold)}: the most learnt while prompts without the "
                       "trigger are kept."]
    leaky = [(i, c) for i, c in measured if at_strength_one(c, "leak_score") is not None]
    if not leaky:
        return None
    index, best = _pick(leaky, lambda c: (at_strength_one(c, "leak_score"),
                                          -at_strength_one(c, "trigger_response")))
    return index, [head + f"Every checkpoint's preservation drift at strength 1 exceeds {fmt(threshold)}; chosen "
                   f"for the lowest leak score ({fmt(at_strength_one(best, 'leak_score'))}): the most "
                   "trigger-specific one."]


def strength_range(checkpoint: CheckpointResult, threshold: float) -> tuple[tuple[float, ...], float | None,
                                                                          float | None, list[str]]:
    """(safe strengths, max strength, estimated max strength, the page's sentences) of one checkpoint."""
    measured = sorted((s.strength, overall(s.preservation_drift)) for s in checkpoint.strengths if s.strength > 0)
    if not measured:
        return (), None, None, ["No preservation drift was measured for it: no strength range to give."]
    safe = tuple(s for s, d in measured if d is not None and d <= threshold)
    max_strength = None
    for s, d in measured:
        if d is None or d > threshold:
            break
        max_strength = s
    shown = ", ".join(f"{fmt(s)} ({fmt(d)})" for s, d in measured)
    lines = [f"Preservation drift by strength: {shown}; threshold {fmt(threshold)} (≈ "
             f"{math.sqrt(threshold) * 100:.0f} % change of the velocity's norm on prompts without the trigger)."]
    if len(safe) == len(measured):
        lines.append(f"Drift stays under the threshold at every measured strength (up to {fmt(measured[-1][0])}).")
    elif not safe:
        lines.append(f"Drift exceeds the threshold at every measured strength (the lowest is {fmt(measured[0][0])}):"
                     " use a lower strength, or train with the preservation loss.")
    elif max_strength is not None:
        lines.append(f"Drift stays under the threshold up to strength {fmt(max_strength)}.")
        if safe[-1] != max_strength:
            lines.append("It is not monotonic in the strength: also under the threshold at "
                         + ", ".join(fmt(s) for s in safe if s > max_strength) + ".")
    else:
        lines.append("Drift is under the threshold only at strength " + ", ".join(fmt(s) for s in safe)
                     + ", not at the lower ones measured: not monotonic in the strength, read the table.")
    estimate = None
    drift_one = at_strength_one(checkpoint, "preservation_drift")
    if len(safe) < len(measured) and drift_one is not None and drift_one > 0:
        estimate = math.sqrt(threshold / drift_one)
        lines.append(f"Estimate from the square law (drift ≈ drift(1)·s² for a small update): the threshold is "
                     f"reached near strength {estimate:.2f}.")
    return safe, max_strength, estimate, lines


def recommend(results: EvalResults, *, drift_threshold: float = DEFAULT_DRIFT_THRESHOLD) -> Recommendation:
    """The checkpoint to use and its strength range (module docstring: the rules and the threshold)."""
    if not (finite(drift_threshold) and drift_threshold > 0):
        raise ValueError(f"drift_threshold must be a positive number, not {drift_threshold!r}")
    if not results.checkpoints:
        return Recommendation(None, None, "none", drift_threshold, (), None, None,
                              ("No checkpoints were evaluated: nothing to recommend.",))
    picked = _by_heldout(results)
    rule = "heldout_loss"
    if picked is None:
        picked, rule = _by_response(results, drift_threshold), "trigger_response"
    if picked is None:
        index = len(results.checkpoints) - 1
        picked, rule = (index, ["Neither a held-out loss (no held-out images) nor a trigger response (no trigger) "
                                "was measured: nothing here ranks the checkpoints by quality. Named: the last, most "
                                "trained one — judge by the grids."]), "last"
    index, why = picked
    chosen = results.checkpoints[index]
    where = ", ".join(x for x in (f"step {chosen.step}" if chosen.step is not None else "",
                                  f"epoch {chosen.epoch}" if chosen.epoch is not None else "",
                                  "EMA weights" if chosen.ema else "") if x)
    first = f"Recommended: {chosen.label}" + (f" ({where})" if where else "") + f" — {chosen.path}"
    safe, max_strength, estimate, strength_lines = strength_range(chosen, drift_threshold)
    return Recommendation(chosen.label, index, rule, drift_threshold, safe, max_strength, estimate,
                          (first, *why, *strength_lines))
