"""A stand-in `SimplifiedAdEMAMix`: torch's AdamW under the user's class name (see the package docstring)."""

from __future__ import annotations

import torch


class SimplifiedAdEMAMix(torch.optim.AdamW):
    """AdamW under the name the corpus entry imports; keyword arguments as AdamW's."""
