"""The fine-tune selection (networks/full_finetune.py): exactly the selected DiT parameters train, kohya's
component learning rates, the LLM adapter opt-in, and the whole-DiT checkpoint it saves."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from anima_trainer.demo import write_tiny_dit
from anima_trainer.models import load_dit
from anima_trainer.networks.formats import NetworkError
from anima_trainer.networks.full_finetune import DiTFinetune, select_parameters


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("ft") / "dit.safetensors", seed=4)


def _steps(dit, finetune, steps: int = 3) -> None:
    """A few AdamW steps of a squared-output loss through the whole DiT, its context from the LLM adapter."""
    opt = torch.optim.AdamW(finetune.param_groups(1e-2), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    adapter = dit.llm_adapter
    source, vocab = adapter.blocks[0].cross_attn.k_proj.in_features, adapter.embed.num_embeddings
    for _ in range(steps):
        x = torch.randn(1, 16, 1, 4, 4, generator=g)
        ctx = adapter(torch.randn(1, 6, source, generator=g), torch.randint(0, vocab, (1, 8), generator=g))
        dit(x, torch.tensor([0.5]), ctx).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("patterns", "llm", "expected"), [
    (None, False, lambda n: not n.startswith("llm_adapter.")),
    (None, True, lambda n: True),
    ([r"^blocks\.1\."], False, lambda n: n.startswith("blocks.1.")),
    # searched: `cross_attn` also finds the adaLN modulation of the cross-attention and the adapter's norm
    (["cross_attn"], False, lambda n: "cross_attn" in n and not n.startswith("llm_adapter.")),
    ([r"\.cross_attn\."], True, lambda n: ".cross_attn." in n),
    (["adaln_modulation"], False, lambda n: "adaln_modulation" in n),
], ids=["whole-dit", "with-llm-adapter", "block-1", "cross-attn", "cross-attn-llm", "adaln"])
def test_selected_patterns_train_exactly_those_parameters(dit_file, patterns, llm, expected):
    dit = load_dit(dit_file, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in dit.named_parameters()}
    finetune = DiTFinetune(dit, trainable_patterns=patterns, train_llm_adapter=llm, base_file=dit_file)
    chosen = {n for n in before if expected(n)}
    assert set(finetune.selected) == chosen and chosen
    assert {n for n, p in dit.named_parameters() if p.requires_grad} == chosen
    _steps(dit, finetune)
    after = dict(dit.named_parameters())
    frozen_changed = [n for n in before if n not in chosen and not torch.equal(before[n], after[n])]
    assert frozen_changed == []  # every frozen tensor bit-identical
    trained_unchanged = [n for n in chosen if torch.equal(before[n], after[n])]
    # every selected tensor gets a gradient here (the context comes through the LLM adapter), so each one moved
    assert trained_unchanged == []
    assert finetune.state_dict().keys() == chosen and all(finetune.state_dict()[n] is after[n] for n in chosen)


def test_component_lrs_group_and_zero_freezes(dit_file):
    dit = load_dit(dit_file, dtype=torch.float32)
    finetune = DiTFinetune(dit, train_llm_adapter=True)
    groups = finetune.param_groups(1e-4, {"self_attn": 2e-4, "mod": 0, "llm_adapter": 5e-5, "cross_attn": None})
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["base", "llm_adapter", "self_attn"]
    assert (by_name["base"]["lr"], by_name["self_attn"]["lr"], by_name["llm_adapter"]["lr"]) == (1e-4, 2e-4, 5e-5)
    names = {id(p): n for n, p in dit.named_parameters()}
    assert all(".self_attn." in names[id(p)] and not names[id(p)].startswith("llm_adapter")
               for p in by_name["self_attn"]["params"])
    mod = [n for n in finetune.selected if "adaln_modulation" in n]
    assert mod and all(not dit.get_parameter(n).requires_grad for n in mod)  # lr 0 = frozen, as kohya
    assert not set(map(id, finetune.trainable_parameters())) & {id(dit.get_parameter(n)) for n in mod}
    with pytest.raises(NetworkError, match="unknown component"):
        finetune.param_groups(1e-4, {"attention": 1e-4})


def test_selection_errors_name_the_fix(dit_file):
    dit = load_dit(dit_file, dtype=torch.float32)
    with pytest.raises(NetworkError, match="set train_llm_adapter = true"):
        select_parameters(dit, [r"^llm_adapter\."])
    with pytest.raises(NetworkError, match="no DiT parameter matches"):
        select_parameters(dit, ["no_such_layer"])
    with pytest.raises(NetworkError, match="not a regular expression"):
        select_parameters(dit, ["blocks.(1"])
    finetune = DiTFinetune(dit, keep_base=False)  # no base copy: only strength 1 (test_finetune_strength.py)
    finetune.set_multiplier(1.0)
    with pytest.raises(NetworkError, match=r"without a copy of its base weights \(keep_base\), so it cannot be set "
                                           "to strength 0"):
        finetune.set_multiplier(0.0)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["base-dtype", "bf16", "fp16"])
def test_saved_checkpoint_has_the_base_layout_and_reloads_exactly(dit_file, tmp_path, dtype):
    dit = load_dit(dit_file, dtype=torch.float32)
    finetune = DiTFinetune(dit, trainable_patterns=["cross_attn", r"^final_layer\."], base_file=dit_file)
    _steps(dit, finetune)
    out = finetune.save(tmp_path / "tuned.safetensors", dtype=dtype, metadata={"ss_output_name": "tuned"})
    with safe_open(str(dit_file), "pt") as base, safe_open(str(out), "pt") as tuned:
        keys = set(tuned.keys())
        assert keys == set(base.keys())  # every key of the base file, no other
        assert all(k.startswith("net.") for k in keys)
        meta = tuned.metadata()
        saved = {k: tuned.get_tensor(k) for k in keys}
    assert meta["format"] == "pt" and meta["ss_output_name"] == "tuned"
    assert meta["anima_trainer_training_mode"] == "finetune"
    live = dit.state_dict()
    for name, t in live.items():  # the same tensors at the saved dtype
        assert torch.equal(saved["net." + name], t.to(dtype or torch.float32)), name
    reloaded = load_dit(out, dtype=dtype or torch.float32)
    reference = load_dit(dit_file, dtype=dtype or torch.float32)
    reference.load_state_dict({k: v.to(dtype or torch.float32) for k, v in live.items()})
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 16, 1, 4, 4, generator=g), torch.randn(1, 8, 64, generator=g)
    with torch.no_grad():
        got, want = reloaded(x, torch.tensor([0.4]), ctx), reference(x, torch.tensor([0.4]), ctx)
    assert torch.equal(got, want)  # the trained model, bit-exactly (at the saved precision)
    if dtype is None:
        with torch.no_grad():
            assert torch.equal(got, dit(x, torch.tensor([0.4]), ctx))


def test_load_weights_sets_the_selected_parameters(dit_file, tmp_path):
    dit = load_dit(dit_file, dtype=torch.float32)
    tuned = DiTFinetune(dit, trainable_patterns=["mlp"], base_file=dit_file)
    _steps(dit, tuned)
    path = tuned.save(tmp_path / "t.safetensors")
    fresh = load_dit(dit_file, dtype=torch.float32)
    again = DiTFinetune(fresh, trainable_patterns=["mlp"])
    assert again.load_weights(path) == list(again.selected)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in dit.state_dict().items())


def test_the_key_check_refuses_a_missing_or_extra_key(dit_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from anima_trainer.models.dit_checkpoint import check_dit_checkpoint_keys, dit_layout

    layout = dit_layout(dit_file)
    expected = layout.expected_keys(set())
    tensors = load_file(dit_file)
    check_dit_checkpoint_keys(dit_file, expected)  # the base file itself passes
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=rf"missing \['{dropped}'\], extra \[\]"):
        check_dit_checkpoint_keys(tmp_path / "missing.safetensors", expected)
    save_file({**tensors, "net.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"missing \[\], extra \['net.extra.weight'\]"):
        check_dit_checkpoint_keys(tmp_path / "extra.safetensors", expected)


def test_a_diffusers_folder_base_is_written_in_the_published_layout(dit_file, tmp_path):
    from anima_trainer.models.dit_checkpoint import PUBLISHED_PREFIX, dit_layout, save_dit_checkpoint

    dit = load_dit(dit_file, dtype=torch.float32)
    layout = dit_layout(tmp_path)  # a folder: no single file to follow
    assert layout.file is None and layout.prefix == PUBLISHED_PREFIX == "net."
    out = save_dit_checkpoint(layout, dit.state_dict(), tmp_path / "out.safetensors", save_dtype=torch.bfloat16)
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == {"net." + k for k in dit.state_dict()}
    reloaded = load_dit(out, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(reloaded[k], v.bfloat16()) for k, v in dit.state_dict().items())
