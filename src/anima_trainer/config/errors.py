"""`ConfigError` and the "did you mean" helper shared by the config modules."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A mistake in the training settings (command line, `--config_file` TOML or a value).

    The message always names the offending key or flag; it is meant to be shown to the user as is.
    """


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to `name` (case-insensitive), or None when nothing is close."""
    cands = list(candidates)
    lower = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.6)
    return lower[hit[0]] if hit else None


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """"; did you mean 'x'?" (with `prefix` before x, e.g. "--") or "" when nothing is close."""
    hit = closest(name, candidates)
    return f"; did you mean '{prefix}{hit}'?" if hit else ""
