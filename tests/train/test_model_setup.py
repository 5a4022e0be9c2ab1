"""Checks of train/model_setup.py that need the DiT and the network together."""

from __future__ import annotations

import pytest

from anima_trainer.models.fp8 import quantize_fp8
from anima_trainer.networks import create_network
from anima_trainer.train.model_setup import check_network_fp8
from tests.support.small_dit import small_dit


def test_dora_is_refused_on_fp8():
    dit = small_dit()
    quantize_fp8(dit)
    net = create_network(dit, dim=4, alpha=4, dora_wd="true")
    with pytest.raises(ValueError, match="DoRA"):
        check_network_fp8(dit, net)
    plain = small_dit()
    check_network_fp8(plain, create_network(plain, dim=4, alpha=4, dora_wd="true"))  # no fp8: fine
