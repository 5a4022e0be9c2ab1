"""Text conditioning must reproduce ComfyUI: token ids/weights and Qwen3 hidden states (fixture `te_ref`).

The full-size random Qwen3-0.6B is loaded once per module in fp32 (golden comparison) and once in bf16
(relative L2 only).  Everything about file layouts, errors and long prompts uses a tiny Qwen3 written
to tmp_path with tiny tokenizers built in-test, so it needs neither the real vocab nor the big model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3Model

from anima_trainer.demo import TINY_QWEN3_SHAPES, random_qwen3_state_dict, write_tiny_tokenizers
from anima_trainer.models import load_text_encoder
from anima_trainer.models.model_files import ModelFileError, WrongModelFileError
from anima_trainer.models.prompt_syntax import parse_prompt_weights, tokenizer_chunks
from anima_trainer.models.text import AnimaTokenizer, TextEncoding

FP32_TOL = dict(atol=1e-4, rtol=1e-4)  # fixture README: independent fp32 implementations (observed ~3e-6)
# bf16 weights + bf16 compute through 28 random layers vs ComfyUI's fp32: observed rel. L2 1.3e-2..1.5e-2
# on this CPU; 2.5e-2 leaves room for other kernels while still catching a wrong layer (which gives ~1).
BF16_REL_L2 = 2.5e-2
TEXT_LOGGER = "anima_trainer.models.text"


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def te_prompts(fixture_dir: Path) -> list[dict]:
    return json.loads((fixture_dir / "te_ref.json").read_text())["prompts"]


@pytest.fixture(scope="module")
def te_ref(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(fixture_dir / "te_ref.safetensors")


@pytest.fixture(scope="module")
def real_tokenizer(tokenizers_dir: Path) -> AnimaTokenizer:
    return AnimaTokenizer.from_dirs(tokenizers_dir / "qwen", tokenizers_dir / "t5")


@pytest.fixture(scope="module")
def fp32_encoder(qwen3_path: Path, tokenizers_dir: Path):
    return load_text_encoder(qwen3_path, qwen3_tokenizer_path=tokenizers_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def per_prompt_fp32(fp32_encoder, te_prompts) -> dict[str, TextEncoding]:
    """Every fixture prompt encoded alone, as ComfyUI does it (computed once, reused by several tests)."""
    return {p["key"]: fp32_encoder.encode([p["text"]]) for p in te_prompts}


def _prompt(prompts: list[dict], key: str) -> dict:
    return next(p for p in prompts if p["key"] == key)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------- prompt syntax

@pytest.mark.parametrize("text, expected", [
    ("plain text, [not special]", [("plain text, [not special]", 1.0)]),
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("((b))", [("b", 1.1 * 1.1)]),
    ("(b:1.5)", [("b", 1.5)]),
    ("((b:0.5))", [("b", 0.5)]),  # an explicit weight replaces, it does not multiply
    ("(a (b) c:2)", [("a ", 2.0), ("b", 2.2), (" c", 2.0)]),
    ("(a:b)", [("a:b", 1.1)]),  # not a number: the colon stays text
    ("(:2)", [(":2", 1.1)]),  # a colon in first position is not a weight
    (r"miku \(vocaloid\)", [("miku (vocaloid)", 1.0)]),
    ("a) (b)", [("a) (b)", 1.0)]),  # unmatched ')' turns the rest of the level into text
    ("(open", [("(open", 1.0)]),
    ("x ()", [("x ", 1.0)]),
])
def test_prompt_weight_parsing(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_weights(text) == expected


def test_embedding_words_are_dropped_like_comfyui(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert tokenizer_chunks("embedding:style a cat") == [("a cat", 1.0)]
    assert tokenizer_chunks("a embedding:foo, b  c") == [("a", 1.0), (", b c", 1.0)]
    assert tokenizer_chunks("x\nembedding:bar") == [("x", 1.0)]
    assert tokenizer_chunks("(embedding:baz:1.3) dog") == [(" dog", 1.0)]
    assert tokenizer_chunks("notembedding:x") == [("notembedding:x", 1.0)]
    assert sum("embedding:" in r.getMessage() for r in caplog.records) == 4


# ----------------------------------------------------------------------------- tokens vs ComfyUI

@pytest.mark.parametrize("index", range(6))
def test_token_ids_and_weights_match_comfyui(real_tokenizer: AnimaTokenizer, te_prompts, te_ref, index: int) -> None:
    p = te_prompts[index]
    tokens = real_tokenizer(p["text"])
    assert tokens.qwen_ids == p["qwen_ids"] == te_ref[p["key"] + ".qwen_ids"].tolist()
    assert tokens.t5_ids == p["t5_ids"] == te_ref[p["key"] + ".t5_ids"].tolist()
    assert tokens.t5_ids[-1] == 1
    assert torch.equal(torch.tensor(tokens.t5_weights, dtype=torch.float32), te_ref[p["key"] + ".t5_weights"].float())


def test_weight_syntax_changes_tokenization(real_tokenizer: AnimaTokenizer, te_prompts) -> None:
    """p4: ComfyUI's segmentation differs from a plain tokenizer call; we follow ComfyUI, not the plain call."""
    p = _prompt(te_prompts, "p4_extra_weights_escapes")
    plain = real_tokenizer.qwen(p["text"], add_special_tokens=False)["input_ids"]
    assert plain == p["plain_hf_qwen_ids"]
    assert real_tokenizer(p["text"]).qwen_ids != plain


def test_long_prompt_warns_and_is_not_truncated(real_tokenizer: AnimaTokenizer, te_prompts,
                                                caplog: pytest.LogCaptureFixture) -> None:
    text = " ".join([_prompt(te_prompts, "p2_long_natural")["text"]] * 2)
    caplog.set_level(logging.WARNING, logger=TEXT_LOGGER)
    tokens = real_tokenizer(text)
    n_qwen = len(real_tokenizer.qwen(text, add_special_tokens=False)["input_ids"])
    n_t5 = len(real_tokenizer.t5(text)["input_ids"])
    assert len(tokens.qwen_ids) == n_qwen > 512 and len(tokens.t5_ids) == n_t5 > 512
    messages = [r.getMessage() for r in caplog.records if r.name == TEXT_LOGGER]
    assert len(messages) == 1 and f"{n_qwen} Qwen3 tokens" in messages[0] and f"{n_t5} T5 tokens" in messages[0]


# ----------------------------------------------------------------------- hidden states vs ComfyUI

@pytest.mark.slow
@pytest.mark.parametrize("index", range(6))
def test_qwen_hidden_fp32_matches_comfyui(per_prompt_fp32, te_prompts, te_ref, index: int) -> None:
    p = te_prompts[index]
    enc = per_prompt_fp32[p["key"]]
    expected = te_ref[p["key"] + ".qwen_hidden"]
    assert enc.qwen_hidden.shape == (1, p["n_qwen"], 1024) and enc.qwen_hidden.dtype == torch.float32
    torch.testing.assert_close(enc.qwen_hidden[0], expected, **FP32_TOL)
    assert enc.qwen_mask.tolist() == [[1] * p["n_qwen"]]  # the empty prompt's single state too
    assert enc.t5_ids.tolist() == [p["t5_ids"]] and enc.t5_mask.tolist() == [[1] * p["n_t5"]]
    assert enc.t5_ids.dtype == torch.long and enc.t5_weights.dtype == torch.float32


@pytest.mark.slow
def test_batched_encode_equals_per_prompt(fp32_encoder, per_prompt_fp32, te_prompts, te_ref) -> None:
    keys = ["p1_danbooru_short", "p0_empty", "p4_extra_weights_escapes"]
    enc = fp32_encoder.encode([_prompt(te_prompts, k)["text"] for k in keys])
    n_q = [_prompt(te_prompts, k)["n_qwen"] for k in keys]
    n_t = [_prompt(te_prompts, k)["n_t5"] for k in keys]
    assert enc.qwen_hidden.shape == (3, max(n_q), 1024) and enc.t5_ids.shape == (3, max(n_t))
    assert not torch.isnan(enc.qwen_hidden).any()
    for i, key in enumerate(keys):
        alone = per_prompt_fp32[key]
        torch.testing.assert_close(enc.qwen_hidden[i, :n_q[i]], alone.qwen_hidden[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.qwen_hidden[i, :n_q[i]], te_ref[key + ".qwen_hidden"], **FP32_TOL)
        assert torch.count_nonzero(enc.qwen_hidden[i, n_q[i]:]) == 0
        assert enc.qwen_mask[i].tolist() == [1] * n_q[i] + [0] * (max(n_q) - n_q[i])
        assert enc.t5_mask[i].tolist() == [1] * n_t[i] + [0] * (max(n_t) - n_t[i])
        assert enc.t5_ids[i, :n_t[i]].tolist() == alone.t5_ids[0].tolist()
        assert torch.count_nonzero(enc.t5_ids[i, n_t[i]:]) == 0 and torch.count_nonzero(enc.t5_weights[i, n_t[i]:]) == 0
        assert torch.equal(enc.t5_weights[i, :n_t[i]], alone.t5_weights[0])


@pytest.mark.slow
def test_empty_prompts_in_a_batch_are_finite_and_attended(fp32_encoder, te_ref) -> None:
    enc = fp32_encoder.encode(["", ""])
    assert enc.qwen_hidden.shape == (2, 1, 1024) and torch.isfinite(enc.qwen_hidden).all()
    assert enc.qwen_mask.tolist() == [[1], [1]] and enc.t5_ids.tolist() == [[1], [1]]
    for i in range(2):
        torch.testing.assert_close(enc.qwen_hidden[i], te_ref["p0_empty.qwen_hidden"], **FP32_TOL)


@pytest.mark.slow
def test_bf16_close_to_comfyui_by_relative_l2(qwen3_path: Path, tokenizers_dir: Path, te_prompts, te_ref) -> None:
    encoder = load_text_encoder(qwen3_path, qwen3_tokenizer_path=tokenizers_dir)  # default dtype: bf16
    assert encoder.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    for key in ("p0_empty", "p1_danbooru_short"):  # short prompts: bf16 matmuls are slow on CPU
        enc = encoder.encode([_prompt(te_prompts, key)["text"]])
        assert enc.qwen_hidden.dtype == torch.float32
        err = _rel_l2(enc.qwen_hidden[0], te_ref[key + ".qwen_hidden"])
        assert err <= BF16_REL_L2, f"{key}: rel. L2 {err:.3e}"


# ------------------------------------------------------------------ tiny model: layouts and errors

def _tiny_config() -> Qwen3Config:
    return Qwen3Config(**TINY_QWEN3_SHAPES, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny random Qwen3 in every supported layout, plus the demo's tiny Qwen (byte BPE) and T5 (unigram)
    tokenizers."""
    root = tmp_path_factory.mktemp("tiny_qwen3")
    tok = write_tiny_tokenizers(root / "tokenizers")
    config = _tiny_config()
    state = random_qwen3_state_dict(seed=0)  # norm gains not all ones, so a missed norm would show
    lm_head = torch.zeros(config.vocab_size, config.hidden_size)

    single = root / "qwen3_tiny.safetensors"  # ComfyUI layout (F32 here, so fp32 loads are exact)
    save_file({**{"model." + k: v for k, v in state.items()}, "lm_head.weight": lm_head}, single)
    bundle = root / "bundle.safetensors"
    prefix = "text_encoders.qwen3_06b.transformer."
    save_file({**{prefix + "model." + k: v for k, v in state.items()},
               "vae.decoder.upsamples.0.residual.0.gamma": torch.ones(4)}, bundle)

    hf = root / "hf_qwen3"  # Qwen3ForCausalLM.save_pretrained layout, tokenizer inside
    config.save_pretrained(hf)
    save_file({**{"model." + k: v for k, v in state.items()}, "lm_head.weight": lm_head}, hf / "model.safetensors")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tok / "qwen" / f, hf / f)
    sharded = root / "hf_qwen3_sharded"  # Qwen3Model layout (no `model.`), two shards with an index
    config.save_pretrained(sharded)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, sharded / file)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    return dict(root=root, tok=tok, state=state, config=config, single=single, bundle=bundle, hf=hf,
                sharded=sharded)


def _reference_hidden(tiny: dict, ids: list[int]) -> torch.Tensor:
    """Plain transformers Qwen3Model (normal construction + load_state_dict), fp32."""
    model = Qwen3Model(tiny["config"]).eval()
    model.load_state_dict(tiny["state"])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]


TINY_PROMPTS = ["a red cat, (blue mat:1.3)", "", "the quick brown fox jumps over the mat"]


def test_tiny_single_file_matches_plain_transformers(tiny: dict) -> None:
    enc = load_text_encoder(tiny["single"], qwen3_tokenizer_path=tiny["tok"], dtype=torch.float32)
    assert enc.model.config.num_hidden_layers == 2 and enc.model.config.num_key_value_heads == 2
    assert enc.model.config.intermediate_size == 96 and enc.model.config.head_dim == 16
    out = enc.encode(TINY_PROMPTS)
    tokens = enc.tokenize(TINY_PROMPTS)
    assert tokens[1].qwen_ids == [enc.tokenizer.qwen_pad_id] and tokens[1].t5_ids == [1]
    assert [w for w in tokens[0].t5_weights if w != 1.0] and tokens[0].t5_ids[-1] == 1
    for i, t in enumerate(tokens):
        n = len(t.qwen_ids)
        torch.testing.assert_close(out.qwen_hidden[i, :n], _reference_hidden(tiny, t.qwen_ids), atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(out.qwen_hidden[i, n:]) == 0
    with pytest.raises(TypeError):
        enc.encode("a single string")


@pytest.mark.parametrize("layout", ["hf", "sharded", "bundle"])
def test_tiny_other_layouts_match_single_file(tiny: dict, layout: str) -> None:
    single = load_text_encoder(tiny["single"], qwen3_tokenizer_path=tiny["tok"], dtype=torch.float32)
    if layout == "bundle":
        other = load_text_encoder(tiny["bundle"], qwen3_tokenizer_path=tiny["tok"], dtype=torch.float32)
    elif layout == "hf":  # qwen3_tokenizer_path defaults to the folder itself
        other = load_text_encoder(tiny["hf"], t5_tokenizer_path=tiny["tok"] / "t5", dtype=torch.float32)
    else:
        other = load_text_encoder(tiny["sharded"], qwen3_tokenizer_path=tiny["tok"], dtype=torch.float32)
    a, b = single.encode(TINY_PROMPTS), other.encode(TINY_PROMPTS)
    assert torch.equal(a.qwen_hidden, b.qwen_hidden) and torch.equal(a.t5_ids, b.t5_ids)
    assert torch.count_nonzero(a.qwen_hidden) > 0


def test_old_tokenizer_keyword_spellings_still_work(tiny: dict) -> None:
    """tokenizer_dir / t5_tokenizer_dir (before issue 16) are aliases of qwen3_tokenizer_path / t5_tokenizer_path:
    the same encoder, a DeprecationWarning naming the new spelling; both spellings at once are refused."""
    new = load_text_encoder(tiny["single"], qwen3_tokenizer_path=tiny["tok"] / "qwen",
                            t5_tokenizer_path=tiny["tok"] / "t5", dtype=torch.float32)
    with pytest.warns(DeprecationWarning, match=r"is now spelled load_text_encoder\(") as warned:
        old = load_text_encoder(tiny["single"], tokenizer_dir=tiny["tok"] / "qwen",
                                t5_tokenizer_dir=tiny["tok"] / "t5", dtype=torch.float32)
    assert {str(w.message) for w in warned} == {
        "load_text_encoder(tokenizer_dir=...) is now spelled load_text_encoder(qwen3_tokenizer_path=...)",
        "load_text_encoder(t5_tokenizer_dir=...) is now spelled load_text_encoder(t5_tokenizer_path=...)"}
    a, b = new.encode(TINY_PROMPTS), old.encode(TINY_PROMPTS)
    assert torch.equal(a.qwen_hidden, b.qwen_hidden) and torch.equal(a.t5_ids, b.t5_ids)
    assert torch.equal(a.t5_weights, b.t5_weights)
    with pytest.raises(TypeError, match="got qwen3_tokenizer_path= and its old name tokenizer_dir="):
        load_text_encoder(tiny["single"], qwen3_tokenizer_path=tiny["tok"], tokenizer_dir=tiny["tok"])


def test_tiny_dtype_and_meta_free(tiny: dict) -> None:
    enc = load_text_encoder(tiny["single"], qwen3_tokenizer_path=tiny["tok"])
    tensors = [*enc.model.parameters(), *enc.model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    out = enc.encode(TINY_PROMPTS)
    assert out.qwen_hidden.dtype == torch.float32 and torch.isfinite(out.qwen_hidden).all()


def test_tiny_long_prompt_encoded_whole(tiny: dict, caplog: pytest.LogCaptureFixture) -> None:
    enc = load_text_encoder(tiny["single"], qwen3_tokenizer_path=tiny["tok"], dtype=torch.float32)
    caplog.set_level(logging.WARNING, logger=TEXT_LOGGER)
    text = "a red cat sits on a blue mat, " * 80
    out = enc.encode([text, "a cat"])
    n_qwen = len(enc.tokenizer.qwen(text, add_special_tokens=False)["input_ids"])
    n_t5 = len(enc.tokenizer.t5(text)["input_ids"])
    assert n_qwen > 512 and n_t5 > 512
    assert out.qwen_hidden.shape == (2, n_qwen, 64) and int(out.qwen_mask[0].sum()) == n_qwen
    assert out.t5_ids.shape == (2, n_t5) and int(out.t5_mask[0].sum()) == n_t5
    assert any(f"{n_qwen} Qwen3 tokens and {n_t5} T5 tokens" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ wrong inputs

@pytest.mark.parametrize("fixture, looks_like", [("vae_path", "VAE"), ("tiny_dit_path", "Anima DiT")])
def test_wrong_model_file_is_named(request: pytest.FixtureRequest, fixture: str, looks_like: str) -> None:
    path = request.getfixturevalue(fixture)
    with pytest.raises(WrongModelFileError) as err:
        load_text_encoder(path)  # the wrong file is reported before the missing qwen3_tokenizer_path
    message = str(err.value)
    assert "--qwen3" in message and str(path) in message and looks_like in message


def test_lora_and_non_safetensors_are_rejected(tmp_path: Path, tiny: dict) -> None:
    lora = tmp_path / "my_lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight": torch.zeros(4, 8),
               "diffusion_model.blocks.0.self_attn.q_proj.lora_up.weight": torch.zeros(8, 4),
               "diffusion_model.blocks.0.self_attn.q_proj.alpha": torch.tensor(4.0)}, lora)
    with pytest.raises(WrongModelFileError, match=r"--qwen3 .*my_lora\.safetensors.*LoRA"):
        load_text_encoder(lora, qwen3_tokenizer_path=tiny["tok"])
    pickle = tmp_path / "qwen.safetensors"
    pickle.write_bytes(b"\x80\x02}q\x00." + b"\x00" * 64)
    with pytest.raises(WrongModelFileError, match="--qwen3"):
        load_text_encoder(pickle, qwen3_tokenizer_path=tiny["tok"])


def test_hf_folder_with_only_pickles_is_refused(tmp_path: Path, tiny: dict) -> None:
    folder = tmp_path / "qwen3_bin"
    tiny["config"].save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelFileError, match="pytorch_model.bin"):
        load_text_encoder(folder, qwen3_tokenizer_path=tiny["tok"])


def test_missing_tokenizer_arguments_are_named(tiny: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen3_tokenizer_path is required"):
        load_text_encoder(tiny["single"])
    with pytest.raises(ValueError, match="t5_tokenizer_path is required"):
        load_text_encoder(tiny["single"], qwen3_tokenizer_path=tiny["tok"] / "qwen")
    with pytest.raises(FileNotFoundError, match="qwen3_tokenizer_path"):
        load_text_encoder(tiny["single"], qwen3_tokenizer_path=tmp_path)
    with pytest.raises(ValueError, match="t5_tokenizer_path"):
        load_text_encoder(tiny["hf"])  # HF folder: Qwen tokenizer defaults to the folder, T5 does not
