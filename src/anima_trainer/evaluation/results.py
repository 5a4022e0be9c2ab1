"""One measurement's numbers: a value per σ bucket and one overall, with what it was measured at.

Every metric of this package returns a `SigmaMetric`, so the event log, TensorBoard and the report read them
the same way: `as_dict()` is plain JSON (floats, strings, lists), `from_dict` reads it back, and `scalars(key)`
gives the flat `{key: overall, key_sigma_0.2: ..., ...}` a tracker logs (validation's `val/loss` keys are that
form).  An undefined value (a leak score without any trigger response) is NaN here and null in JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def sigma_scalar_key(key: str, sigma: float) -> str:
    """The log key of one σ bucket of metric `key`, e.g. `val/loss_sigma_0.2`."""
    return f"{key}_sigma_{sigma:g}"


@dataclass(frozen=True)
class SigmaMetric:
    """`per_sigma[i]` is the metric at `sigmas[i]`; `overall` its summary over the buckets (each metric's
    docstring says which: the mean of the buckets for losses and drift, a ratio for the leak score).
    `samples`: how many items (held-out images, or prompt × seed pairs) each bucket averages; `strength`: the
    network multiplier it was measured at (None: left as the caller had it)."""

    name: str
    sigmas: tuple[float, ...]
    per_sigma: tuple[float, ...]
    overall: float
    samples: int
    strength: float | None = None

    def __post_init__(self) -> None:
        if len(self.sigmas) != len(self.per_sigma):
            raise ValueError(f"{self.name}: {len(self.sigmas)} σ values but {len(self.per_sigma)} bucket values")

    def at(self, sigma: float) -> float:
        """The value of the bucket at `sigma` (KeyError naming the buckets when there is none)."""
        for s, v in zip(self.sigmas, self.per_sigma, strict=True):
            if s == sigma:
                return v
        raise KeyError(f"{self.name} has no σ bucket {sigma:g} (buckets: {', '.join(f'{s:g}' for s in self.sigmas)})")

    def scalars(self, key: str | None = None) -> dict[str, float]:
        """{key: overall, key_sigma_<σ>: value, ...}; `key` defaults to `eval/<name>`."""
        key = key or f"eval/{self.name}"
        return {key: self.overall, **{sigma_scalar_key(key, s): v for s, v in zip(self.sigmas, self.per_sigma,
                                                                                   strict=True)}}

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON: name, overall, per_sigma as {"0.2": value, ...}, samples, strength (NaN → null)."""
        return {"name": self.name, "overall": _json_number(self.overall),
                "per_sigma": {f"{s:g}": _json_number(v) for s, v in zip(self.sigmas, self.per_sigma, strict=True)},
                "samples": self.samples, "strength": self.strength}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SigmaMetric:
        """The inverse of `as_dict` (σ keys back to floats, in their written order)."""
        buckets = data["per_sigma"]
        return cls(str(data["name"]), tuple(float(s) for s in buckets), tuple(_number(v) for v in buckets.values()),
                   _number(data["overall"]), int(data["samples"]),
                   None if data.get("strength") is None else float(data["strength"]))
