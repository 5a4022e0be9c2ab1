"""sd-scripts-anima's `target_modules` network_arg: each syntax selects exactly the expected Linears of the tiny
DiT (2 blocks + 1 LLM-adapter block); an entry that matches nothing is an error naming it."""

from __future__ import annotations

import re

import pytest

from anima_trainer.networks import NetworkError, create_network, find_targets
from anima_trainer.networks.inject import SD_SCRIPTS_ANIMA_TARGETS, find_target_modules, parse_target_modules

ADAPTER = "llm_adapter.blocks.0"
# (target_modules value, the exact module set), hand-derived from sd-scripts-anima's rules (seed_system.md §2.2)
TABLE = [
    # bare word: the last name component
    ("q_proj", {"blocks.0.self_attn.q_proj", "blocks.0.cross_attn.q_proj", "blocks.1.self_attn.q_proj",
                "blocks.1.cross_attn.q_proj", f"{ADAPTER}.self_attn.q_proj", f"{ADAPTER}.cross_attn.q_proj"}),
    # dotted: the name itself or a suffix at a dot boundary
    ("self_attn.q_proj", {"blocks.0.self_attn.q_proj", "blocks.1.self_attn.q_proj", f"{ADAPTER}.self_attn.q_proj"}),
    # `mlp.2` is the adapter MLP's second Linear, not `adaln_modulation_mlp.2` (no dot boundary there)
    ("mlp.2", {f"{ADAPTER}.mlp.2"}),
    # the optional `transformer.` prefix is dropped
    ("transformer.blocks.0.mlp.layer1", {"blocks.0.mlp.layer1"}),
    # glob on the whole name
    ("blocks.*.mlp.layer?", {"blocks.0.mlp.layer1", "blocks.0.mlp.layer2", "blocks.1.mlp.layer1",
                             "blocks.1.mlp.layer2"}),
    ("transformer.blocks.1.cross_attn.*", {f"blocks.1.cross_attn.{p}" for p in ("q_proj", "k_proj", "v_proj",
                                                                                 "output_proj")}),
    # re: → regex search anywhere in the name (no prefix stripping)
    (r"re:^llm_adapter\..*_proj$", {f"{ADAPTER}.{a}.{p}_proj" for a in ("self_attn", "cross_attn")
                                    for p in "qkvo"} | {"llm_adapter.out_proj"}),
    (r"re:adaln_modulation_mlp\.1", {"blocks.0.adaln_modulation_mlp.1", "blocks.1.adaln_modulation_mlp.1"}),
    # several entries: the union, duplicates once
    ("mlp.layer1, blocks.0.mlp.layer1,final_layer.linear", {"blocks.0.mlp.layer1", "blocks.1.mlp.layer1",
                                                            "final_layer.linear"}),
    # the Python list literal sd-scripts-anima's converter writes for a TOML list
    ("['k_proj', 'o_proj']", {"blocks.0.self_attn.k_proj", "blocks.0.cross_attn.k_proj", "blocks.1.self_attn.k_proj",
                              "blocks.1.cross_attn.k_proj", f"{ADAPTER}.self_attn.k_proj",
                              f"{ADAPTER}.cross_attn.k_proj", f"{ADAPTER}.self_attn.o_proj",
                              f"{ADAPTER}.cross_attn.o_proj"}),
]


@pytest.mark.parametrize(("value", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_target_modules_syntax_selects_exact_modules(dit, value, expected):
    assert set(find_target_modules(dit, parse_target_modules(value))) == expected
    net = create_network(dit, algo="lora", dim=2, target_modules=value)
    assert set(net.modules_by_name) == expected


def test_sd_scripts_anima_default_targets_are_kohyas_plus_the_llm_adapter(dit):
    """DEFAULT_TARGETS_V101 hits 10 Linears per DiT block and 10 per adapter block (80 on its 2-block build,
    340 on Anima): the same set as our default targets with train_llm_adapter."""
    theirs = find_target_modules(dit, list(SD_SCRIPTS_ANIMA_TARGETS))
    assert len(theirs) == 2 * 10 + 1 * 10
    assert set(theirs) == set(find_targets(dit, train_llm_adapter=True))
    assert list(theirs)[0] == "blocks.0.self_attn.q_proj"  # module order


@pytest.mark.parametrize("bad", ["blocks.9.mlp.layer1", "re:^nothing$", "q_proj,attn_typo", "blocks.*.lora"])
def test_target_that_matches_nothing_is_an_error_naming_it(dit, bad):
    missing = bad.split(",")[-1]
    with pytest.raises(NetworkError, match=re.escape(f"target_modules: '{missing}' matches no Linear module")):
        create_network(dit, algo="lokr", dim=2, target_modules=bad)
    assert not any(getattr(m, "_anima_network_patched", False) for m in dit.modules())  # nothing left patched


def test_target_modules_replaces_kohyas_target_options(dit):
    with pytest.raises(NetworkError, match=r"target_modules .* cannot be combined with \['train_llm_adapter'\]"):
        create_network(dit, algo="lora", dim=2, target_modules="q_proj", train_llm_adapter="true")
    with pytest.raises(NetworkError, match="target_modules is empty"):
        create_network(dit, algo="lora", dim=2, target_modules=" , ")
    with pytest.raises(NetworkError, match=r"bad regex 're:\('"):
        create_network(dit, algo="lora", dim=2, target_modules="re:(")
