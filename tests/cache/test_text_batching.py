"""Text caching is batched (Qwen3: text_encoder_batch_size captions per call; the LLM adapter's outputs: the missing
captions of a training batch together), and the batches change nothing but fp32 rounding.

Why a tolerance and not bitwise: a caption in a batch is right-padded to the longest one, so its attention runs
over more (masked) keys and its matmuls over a longer sequence; the masked keys add exact zeros, but the fp32
sums are blocked differently.  Measured on the tiny models: at most 1.5e-6 apart (Qwen3 states) and 7.2e-7
(adapter rows), so 1e-5 (tests/models/test_text.py's bound for batched vs per-prompt Qwen3) is the bound here.
"""

from __future__ import annotations

import pytest
import torch

from anima_trainer.cache import cache_text
from anima_trainer.demo import write_demo_models
from anima_trainer.models import load_dit, load_text_encoder
from anima_trainer.train.inputs import TextConditioner

CAPTIONS = ["a red circle", "a blue square on a white background, large, centred, (bright:1.2)", "",
            "green triangle " * 9]
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = write_demo_models(tmp_path_factory.mktemp("models"), seed=4)
    te = load_text_encoder(paths["qwen3"], qwen3_tokenizer_path=paths["tokenizers"], dtype=torch.float32)
    return te, load_dit(paths["dit"], dtype=torch.float32)


def test_batched_qwen3_cache_equals_one_caption_per_call(models):
    te, _ = models
    batched, s8 = cache_text({c: None for c in CAPTIONS}, te, qwen_fingerprint="x", batch_size=8, progress=False)
    alone, s1 = cache_text({c: None for c in CAPTIONS}, te, qwen_fingerprint="x", batch_size=1, progress=False)
    assert s8.built == s1.built == 4
    lengths = {c: len(te.tokenize([c])[0].qwen_ids) for c in CAPTIONS}
    assert len(set(lengths.values())) == 4  # four lengths: every caption but the longest is padded in the batch
    for caption in CAPTIONS:
        (h8, ids8, w8), (h1, ids1, w1) = batched[caption], alone[caption]
        assert h8.shape == h1.shape == (lengths[caption], h1.shape[-1])  # the real tokens only, no padding rows
        assert ids8 == ids1 and w8 == w1
        torch.testing.assert_close(h8, h1, **TOL)


def test_adapter_outputs_cached_from_a_batch_equal_those_cached_one_by_one(models):
    te, dit = models
    rows, _ = cache_text({c: None for c in CAPTIONS}, te, qwen_fingerprint="x", progress=False)
    together = TextConditioner(dit, te, cache_contexts=True)
    one_by_one = TextConditioner(dit, te, cache_contexts=True)
    together.prefill(rows)
    one_by_one.prefill(rows)
    batch_context = together.context(CAPTIONS)
    for caption in CAPTIONS:
        one_by_one.context([caption])
    for k, caption in enumerate(CAPTIONS):
        a, b = together._contexts[caption], one_by_one._contexts[caption]
        assert a.shape == b.shape == (len(te.tokenize([caption])[0].t5_ids), a.shape[-1])
        torch.testing.assert_close(a, b, **TOL)
        assert torch.equal(batch_context[k, : len(a)], a) and torch.count_nonzero(batch_context[k, len(a):]) == 0
