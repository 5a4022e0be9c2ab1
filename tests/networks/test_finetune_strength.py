"""A fine-tune's strength (networks/full_finetune.py `set_multiplier`): W0 + m·(W − W0) per trained tensor, the
base model exactly at 0, the trained tensors back bit for bit at 1 (also after a failed measurement), and the
preservation loss's base forward inside a step that still backpropagates through the trained weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anima_trainer.demo import write_tiny_dit
from anima_trainer.evaluation.strength import at_strength
from anima_trainer.models import load_dit
from anima_trainer.networks.full_finetune import DiTFinetune
from anima_trainer.train.flow import preservation_term


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("strength") / "dit.safetensors", seed=4)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 1, 8, 8, generator=g), torch.tensor([0.3, 0.7]), torch.randn(2, 512, 64, generator=g)


def _train(dit, finetune, steps: int = 3) -> None:
    """A few AdamW steps of a squared-output loss: every selected tensor moves away from its base value."""
    opt = torch.optim.AdamW(finetune.param_groups(1e-2), lr=1e-2)
    for i in range(steps):
        x, s, ctx = _inputs(10 + i)
        dit(x, s, ctx).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strength_0_is_the_base_model_half_is_the_mix_and_1_the_trained_tensors_bit_for_bit(dit_file, dtype):
    dit = load_dit(dit_file, dtype=dtype)
    finetune = DiTFinetune(dit, trainable_patterns=["cross_attn", r"^final_layer\.", r"^blocks\.1\.mlp\."],
                           base_file=dit_file)
    assert all(b.dtype == dtype for b in finetune._base.values())  # the copy in the weights' dtype
    _train(dit, finetune)
    base_dit = load_dit(dit_file, dtype=dtype)  # a freshly loaded base model
    base = {n: p.detach() for n, p in base_dit.named_parameters()}
    trained = {n: p.data for n, p in finetune.selected.items()}
    trained_values = {n: t.clone() for n, t in trained.items()}
    frozen = {n: p.data for n, p in dit.named_parameters() if n not in finetune.selected}
    assert all(not torch.equal(trained[n], base[n]) for n in trained)  # training moved every selected tensor
    x, s, ctx = _inputs()
    with torch.no_grad():
        tuned_out = dit(x, s, ctx)
        finetune.set_multiplier(0.0)
        assert finetune.multiplier == 0.0
        assert all(torch.equal(p, base[n]) and p.dtype == base[n].dtype for n, p in dit.named_parameters())
        assert torch.equal(dit(x, s, ctx), base_dit(x, s, ctx))  # the base model's outputs, bit for bit
        finetune.set_multiplier(0.5)
        for n, p in finetune.selected.items():
            w0, w = base[n].float(), trained_values[n].float()
            assert torch.equal(p.data, (w0 + 0.5 * (w - w0)).to(p.dtype)) and p.dtype == dtype, n
        finetune.set_multiplier(1.0)
        # the very tensors that were set aside (nothing recomputed), with the trained values
        assert all(p.data_ptr() == trained[n].data_ptr() and torch.equal(p, trained_values[n])
                   for n, p in finetune.selected.items())
        assert all(p.data_ptr() == frozen[n].data_ptr() for n, p in dit.named_parameters()
                   if n not in finetune.selected)
        assert torch.equal(dit(x, s, ctx), tuned_out) and finetune.multiplier == 1.0


def test_a_measurement_that_raises_still_puts_the_trained_weights_back(dit_file):
    dit = load_dit(dit_file, dtype=torch.float32)
    finetune = DiTFinetune(dit, trainable_patterns=[r"^blocks\.0\."])
    _train(dit, finetune, steps=1)
    trained = {n: p.data for n, p in finetune.selected.items()}
    finetune.train()
    with pytest.raises(RuntimeError, match="out of memory"), at_strength(finetune, 0.0):
        assert not finetune.training and finetune.multiplier == 0.0
        raise RuntimeError("simulated out of memory")
    assert finetune.training and finetune.multiplier == 1.0
    assert all(p.data_ptr() == trained[n].data_ptr() for n, p in finetune.selected.items())


def test_preservation_inside_a_step_gives_the_loss_and_gradients_it_defines(dit_file):
    """The base forward at strength 0 runs between the step's forward and its backward: the gradients must be
    those of flow + w·mean((v_tuned − v_base)²) with v_base from a separately loaded base model."""
    weight = 0.7
    dit = load_dit(dit_file, dtype=torch.float32)
    finetune = DiTFinetune(dit, trainable_patterns=["cross_attn", r"^final_layer\."])
    _train(dit, finetune, steps=2)
    reference = load_dit(dit_file, dtype=torch.float32)
    reference.load_state_dict(dit.state_dict())
    reference.requires_grad_(False)
    for n, p in reference.named_parameters():
        p.requires_grad_(n in finetune.selected)
    base = load_dit(dit_file, dtype=torch.float32).requires_grad_(False)
    x, s, ctx = _inputs(3)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))

    loss = F.mse_loss(dit(x, s, ctx).float(), target) + weight * preservation_term(dit, finetune, x, s, ctx)
    loss.backward()
    with torch.no_grad():
        v_base = base(x, s, ctx)
    by_hand = (F.mse_loss(reference(x, s, ctx).float(), target)
               + weight * F.mse_loss(reference(x, s, ctx).float(), v_base.float()))
    by_hand.backward()
    assert torch.equal(loss.detach(), by_hand.detach()) and by_hand.item() > 0
    grads = dict(reference.named_parameters())
    for n, p in finetune.selected.items():
        assert p.grad is not None and torch.equal(p.grad, grads[n].grad), n
    assert finetune.multiplier == 1.0


def test_the_base_copy_is_taken_at_the_build(dit_file):
    """W0 is what the weights were when the network was built (the loop builds it on the freshly loaded base
    file, also at a resume, before the state restores the trained values in place), on the host."""
    dit = load_dit(dit_file, dtype=torch.float32)
    finetune = DiTFinetune(dit, trainable_patterns=[r"^blocks\.1\."])
    with torch.no_grad():  # a training state's values restored in place, as load_state does
        for p in finetune.selected.values():
            p.add_(1.0)
    finetune.set_multiplier(0.0)
    fresh = load_dit(dit_file, dtype=torch.float32).state_dict()
    assert all(torch.equal(p, fresh[n]) for n, p in finetune.selected.items())
    assert all(b.device.type == "cpu" for b in finetune._base.values())
    finetune.set_multiplier(1.0)
    assert all(torch.equal(p, fresh[n] + 1.0) for n, p in finetune.selected.items())
    # full_bf16's cast after the build casts the copy too: strength 0 is the bf16 base
    finetune.cast_trainable(torch.bfloat16)
    finetune.set_multiplier(0.0)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, fresh[n].bfloat16()) for n, p in finetune.selected.items())
    finetune.set_multiplier(1.0)
