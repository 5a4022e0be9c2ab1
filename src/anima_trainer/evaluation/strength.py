"""A network held at one strength (multiplier) for the length of a measurement, then put back as it was.

The base model's prediction is the same DiT with the network's multiplier at 0 (`AdapterNetwork.set_multiplier`):
an adapter module at multiplier 0 returns the frozen layer's output unchanged, so no second model is kept in
memory.  A fine-tune (networks/full_finetune.py) holds its strength in its weights instead: the network itself
carries `multiplier`, and its `set_multiplier` puts the trained weights back (bit for bit) when the measurement
ends, also when it raises.  Measurements also switch the network to eval mode (no dropout of any kind) and
restore the mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def _multiplied(network: nn.Module) -> list[nn.Module]:
    """The network's modules that carry a `multiplier` (adapter modules and norm gains)."""
    return [m for m in network.modules() if m is not network and hasattr(m, "multiplier")]


@contextmanager
def at_strength(network: nn.Module | None, strength: float | None) -> Iterator[None]:
    """Inside: `network` in eval mode at multiplier `strength`; afterwards each module's own multiplier and the
    network's training mode as before.  `network` None (the bare base) or `strength` None (keep the
    multipliers) only switch what applies."""
    if network is None:
        yield
        return
    modules = _multiplied(network)
    saved = [m.multiplier for m in modules]
    own = getattr(network, "multiplier", None)  # a fine-tune's strength, held in its weights
    was_training = network.training
    network.eval()
    try:
        if strength is not None:
            network.set_multiplier(float(strength))
        yield
    finally:
        if own is not None:
            network.set_multiplier(own)
        for module, multiplier in zip(modules, saved, strict=True):
            module.multiplier = multiplier
        network.train(was_training)
