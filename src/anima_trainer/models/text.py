"""Anima's text conditioning: Qwen3-0.6B hidden states plus the T5 ids and weights the LLM adapter reads.

Everything here reproduces what ComfyUI (where trained LoRAs are used) computes, because a LoRA learns
on exactly these tensors:

* **Tokenization** (`AnimaTokenizer`): ComfyUI's prompt-weight syntax is parsed first
  (`prompt_syntax.tokenizer_chunks`); every weighted segment is tokenized on its own and the ids are
  concatenated.  Qwen side: no BOS/EOS, weights reset to 1.0 (only the segmentation remains).  T5 side:
  one `</s>` (id 1) at the end, per-token prompt weights kept (the adapter output is multiplied by them).
* **Empty prompt**: Qwen ids `[151643]` (`<|endoftext|>`), T5 ids `[1]`.  ComfyUI passes attention mask 0
  for that single token to Qwen3; with one key the softmax is 1 whatever the mask, so we run it unmasked
  (identical result, and never a fully-masked row, i.e. never NaN on any PyTorch).  The returned
  `qwen_mask` is 1 for it: ComfyUI's adapter attends to that one state.
* **Batches**: prompts are right-padded to the longest one and run together with an attention mask.
  Qwen3 is causal, so real rows equal the per-prompt (ComfyUI) result; padded rows are set to exactly 0.
* **Long prompts**: Anima was trained on at most 512 tokens per side, but ComfyUI never truncates; we do
  the same (so what a LoRA sees matches inference) and log a warning with both token counts instead.
* **Weights**: a ComfyUI single file (`model.*`, `lm_head.weight` ignored), an all-in-one bundle
  (`text_encoders.qwen3_06b.transformer.model.*`) or a Hugging Face folder (config.json + safetensors).
  The model is built on the meta device and the tensors are assigned already cast to dtype/device, so
  the weights are never held twice.  Only safetensors are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model, T5TokenizerFast
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from anima_trainer.models.model_files import (
    KIND_DESCRIPTIONS,
    ModelFileError,
    WrongModelFileError,
    expect_kind,
    load_state_dict,
    read_header,
)
from anima_trainer.models.diffusers_layout import find_layout, tokenizer_dirs, weight_files
from anima_trainer.models.prompt_syntax import tokenizer_chunks
from anima_trainer.models.renamed_arguments import renamed_argument

logger = logging.getLogger(__name__)

QWEN_FLAG = "--qwen3"
MAX_TOKENS = 512  # what Anima was trained with; longer prompts are kept whole (see module docstring)
QWEN_PAD_TOKEN = "<|endoftext|>"
QWEN_PAD_ID = 151643  # ComfyUI hard-codes this id for the empty prompt
T5_EOS_ID = 1
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
_ACCEPTED_KINDS = ("qwen3", "anima_bundle", "hf_qwen3_folder", "anima_diffusers")


@dataclass
class TokenizedPrompt:
    """One prompt as ComfyUI tokenizes it (unpadded)."""

    qwen_ids: list[int]
    t5_ids: list[int]
    t5_weights: list[float]


@dataclass
class TextEncoding:
    """Conditioning for a batch, right-padded to its longest prompt on each side.

    `qwen_mask`/`t5_mask` are 1 on rows the LLM adapter may attend to; padded `qwen_hidden` rows are 0.
    """

    qwen_hidden: torch.Tensor  # [B, Sq, 1024] float32
    qwen_mask: torch.Tensor  # [B, Sq] long
    t5_ids: torch.Tensor  # [B, St] long
    t5_mask: torch.Tensor  # [B, St] long
    t5_weights: torch.Tensor  # [B, St] float32


# --------------------------------------------------------------------------------------------- tokenizers

def _has_bpe_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _resolve_tokenizer_dirs(qwen3_tokenizer_path: str | Path | None, t5_tokenizer_path: str | Path | None,
                            default_qwen_dir: Path | None, default_t5_dir: Path | None = None) -> tuple[Path, Path]:
    """(Qwen folder, T5 folder).  `qwen3_tokenizer_path` may also be a folder holding `qwen/` and `t5/`; the
    defaults are what the --qwen3 folder offers (a diffusers folder's `tokenizer/` and `t5_tokenizer/`)."""
    if qwen3_tokenizer_path is None and default_qwen_dir is None:
        raise ValueError("qwen3_tokenizer_path is required with a single-file Qwen3 checkpoint: pass the folder "
                         "with the Qwen2 tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    base = Path(qwen3_tokenizer_path if qwen3_tokenizer_path is not None else default_qwen_dir)
    qwen_dir = base if _has_bpe_files(base) else base / "qwen"
    if not _has_bpe_files(qwen_dir):
        name = "qwen3_tokenizer_path" + ("" if qwen3_tokenizer_path is not None else
                                         " (defaulting to the Qwen3 folder)")
        raise FileNotFoundError(f"{name}={base} has no Qwen tokenizer (vocab.json + merges.txt or tokenizer.json, "
                                "directly or under qwen/)")
    if t5_tokenizer_path is None and not (base / "t5").is_dir() and default_t5_dir is not None:
        t5_tokenizer_path = default_t5_dir
    if t5_tokenizer_path is None:
        if not (base / "t5").is_dir():
            raise ValueError("t5_tokenizer_path is required: pass the folder with the T5 tokenizer "
                             "(tokenizer.json, as in ComfyUI's comfy/text_encoders/t5_tokenizer)")
        t5_tokenizer_path = base / "t5"
    t5_dir = Path(t5_tokenizer_path)
    if not ((t5_dir / "tokenizer.json").is_file() or (t5_dir / "spiece.model").is_file()):
        raise FileNotFoundError(f"t5_tokenizer_path={t5_dir} has no tokenizer.json (or spiece.model)")
    return qwen_dir, t5_dir


class AnimaTokenizer:
    """Qwen + T5 tokenization of one prompt, exactly as ComfyUI's Anima tokenizer does it."""

    def __init__(self, qwen: Qwen2TokenizerFast, t5: T5TokenizerFast):
        self.qwen = qwen
        self.t5 = t5
        self.qwen_pad_id = qwen.get_vocab().get(QWEN_PAD_TOKEN, QWEN_PAD_ID)
        self.t5_eos_id = t5.eos_token_id if t5.eos_token_id is not None else T5_EOS_ID
        # We warn about long prompts ourselves (with both counts); silence transformers' length warning.
        qwen.model_max_length = t5.model_max_length = 1 << 40

    @classmethod
    def from_dirs(cls, qwen_dir: str | Path, t5_dir: str | Path) -> "AnimaTokenizer":
        return cls(Qwen2TokenizerFast.from_pretrained(str(qwen_dir)), T5TokenizerFast.from_pretrained(str(t5_dir)))

    def __call__(self, text: str) -> TokenizedPrompt:
        chunks = tokenizer_chunks(text)
        texts = [c for c, _ in chunks]
        qwen_ids: list[int] = []
        t5_ids: list[int] = []
        t5_weights: list[float] = []
        if texts:
            qwen_batch = self.qwen(texts, add_special_tokens=False)["input_ids"]
            t5_batch = self.t5(texts, add_special_tokens=False)["input_ids"]
            for (_, weight), q, t in zip(chunks, qwen_batch, t5_batch):
                qwen_ids += q
                t5_ids += t
                t5_weights += [weight] * len(t)
        if not qwen_ids:
            qwen_ids = [self.qwen_pad_id]
        t5_ids.append(self.t5_eos_id)
        t5_weights.append(1.0)
        if len(qwen_ids) > MAX_TOKENS or len(t5_ids) > MAX_TOKENS:
            logger.warning("prompt has %d Qwen3 tokens and %d T5 tokens; Anima was trained on at most %d, but "
                           "like ComfyUI nothing is truncated: %.80r...", len(qwen_ids), len(t5_ids), MAX_TOKENS,
                           text)
        return TokenizedPrompt(qwen_ids, t5_ids, t5_weights)


# ------------------------------------------------------------------------------------------------ Qwen3

def qwen3_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> Qwen3Config:
    """Qwen3 config implied by `Qwen3Model` key shapes (no `model.` prefix); fixed values per Qwen3-0.6B."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ModelFileError(f"not a Qwen3 text encoder: key 'model.{key}' is missing")
        return shapes[key]

    vocab, hidden = shape("embed_tokens.weight")
    head_dim = shape("layers.0.self_attn.q_norm.weight")[0]
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.")}
    if sorted(layers) != list(range(len(layers))):
        raise ModelFileError(f"not a Qwen3 text encoder: layer indices {sorted(layers)[:5]}... are not 0..N-1")
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, head_dim=head_dim, num_hidden_layers=len(layers),
        num_attention_heads=shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
        num_key_value_heads=shape("layers.0.self_attn.k_proj.weight")[0] // head_dim,
        intermediate_size=shape("layers.0.mlp.gate_proj.weight")[0],
        attention_bias="layers.0.self_attn.q_proj.bias" in shapes,
        rope_theta=ROPE_THETA, rms_norm_eps=RMS_EPS, tie_word_embeddings=True, max_position_embeddings=32768,
        attn_implementation="sdpa")


def weight_sources(path: Path) -> tuple[list[tuple[Path, str]], Qwen3Config | None]:
    """[(file, key prefix)] and the folder's config (None: infer it from the shapes)."""
    info = expect_kind(path, QWEN_FLAG, _ACCEPTED_KINDS)
    if info.kind == "anima_diffusers":  # the root of a diffusers-layout folder: its text_encoder/
        path = find_layout(path)[0].folder("qwen3", QWEN_FLAG)
    if info.kind in ("hf_qwen3_folder", "anima_diffusers"):
        files = weight_files(path, QWEN_FLAG)
        # Qwen3ForCausalLM folders say `model.*`, Qwen3Model folders have bare keys; decide once for all shards.
        prefix = "model." if any("model.embed_tokens.weight" in read_header(f)[0] for f in files) else ""
        config = Qwen3Config.from_pretrained(str(path), attn_implementation="sdpa")
        return [(f, prefix) for f in files], config
    if info.kind == "anima_bundle":
        if "qwen3" not in info.components:
            raise WrongModelFileError(f"{QWEN_FLAG} expects {KIND_DESCRIPTIONS['qwen3']}, but {path} looks like "
                                      f"{info.description} without one (it has: {', '.join(info.components)})")
        return [(path, info.components["qwen3"] + "model.")], None
    return [(path, info.prefix)], None


def load_qwen3(path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu") -> Qwen3Model:
    """Frozen `Qwen3Model` in eval mode (single file, bundle, HF folder or diffusers-layout folder).

    float8 files load cast to `dtype`; ComfyUI's scaled-fp8 exports are dequantised (weight × its per-tensor
    scale) by `load_state_dict`, as for every model file."""
    path = Path(path)
    sources, config = weight_sources(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file, prefix in sources:
        header, _ = read_header(file)
        shapes.update({k[len(prefix):]: s for k, (_, s) in header.items() if k.startswith(prefix)})
    if config is None:
        config = qwen3_config_from_shapes(shapes)
    with torch.device("meta"):
        model = Qwen3Model(config)
    state: dict[str, torch.Tensor] = {}
    for file, prefix in sources:
        state.update(load_state_dict(file, prefix=prefix, dtype=dtype, device=device))
    expected = set(model.state_dict())
    extra = [k for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"]
    missing = sorted(expected - set(state))
    if missing or extra:
        raise ModelFileError(f"{QWEN_FLAG}: {path} does not match a Qwen3 model "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    del state
    with torch.device(device):  # non-persistent RoPE buffers were created on meta
        model.rotary_emb = Qwen3RotaryEmbedding(config)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise ModelFileError(f"{QWEN_FLAG}: tensors {left_on_meta[:3]} were not loaded from {path}")
    model.eval().requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ the encoder

class AnimaTextEncoder:
    """Frozen Qwen3 + tokenizers; `encode(prompts)` gives what the LLM adapter consumes."""

    def __init__(self, model: Qwen3Model, tokenizer: AnimaTokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def tokenize(self, prompts: Sequence[str]) -> list[TokenizedPrompt]:
        return [self.tokenizer(p) for p in prompts]

    def encode(self, prompts: Sequence[str], *, grad: bool = False) -> TextEncoding:
        """Encode a batch of prompts (see the module docstring for the ComfyUI rules); `grad`: see
        `encode_tokens`."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        return self.encode_tokens(self.tokenize(prompts), grad=grad)

    def encode_tokens(self, batch: Sequence[TokenizedPrompt], *, grad: bool = False) -> TextEncoding:
        """Run Qwen3 on pre-tokenized prompts, right-padded into one batch.  Without autograd (not inference_mode:
        the outputs may feed a graph that is trained, the adapter) unless `grad` asks for it where gradients are
        enabled: a text-encoder LoRA is being trained through it."""
        if not batch:
            raise ValueError("encode() needs at least one prompt")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self._encode_tokens(batch)

    def _encode_tokens(self, batch: Sequence[TokenizedPrompt]) -> TextEncoding:
        qwen_ids, qwen_mask = _right_pad([t.qwen_ids for t in batch], self.tokenizer.qwen_pad_id, torch.long)
        t5_ids, t5_mask = _right_pad([t.t5_ids for t in batch], 0, torch.long)
        t5_weights, _ = _right_pad([t.t5_weights for t in batch], 0.0, torch.float32)
        qwen_ids, qwen_mask = qwen_ids.to(self.device), qwen_mask.to(self.device)
        attention_mask = None if bool(qwen_mask.all()) else qwen_mask
        hidden = self.model(input_ids=qwen_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = torch.where(qwen_mask[..., None].bool(), hidden.float(), 0.0)
        return TextEncoding(qwen_hidden=hidden, qwen_mask=qwen_mask, t5_ids=t5_ids.to(self.device),
                            t5_mask=t5_mask.to(self.device), t5_weights=t5_weights.to(self.device))


def _right_pad(rows: Sequence[Sequence[float]], pad: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, longest] tensor of `rows` right-padded with `pad`, and its 0/1 long mask."""
    width = max(len(r) for r in rows)
    values = torch.full((len(rows), width), pad, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        values[i, :len(r)] = torch.tensor(r, dtype=dtype)
        mask[i, :len(r)] = 1
    return values, mask


def load_text_encoder(path: str | Path, *, qwen3_tokenizer_path: str | Path | None = None,
                      t5_tokenizer_path: str | Path | None = None, dtype: torch.dtype = torch.bfloat16,
                      device: str | torch.device = "cpu", tokenizer_dir: str | Path | None = None,
                      t5_tokenizer_dir: str | Path | None = None) -> AnimaTextEncoder:
    """Qwen3-0.6B (single file, bundle, HF folder or diffusers-layout folder) plus the Qwen and T5 tokenizers.

    `qwen3_tokenizer_path` defaults to the folder for a Hugging Face Qwen3 folder, and for a diffusers-layout
    folder (its root or `text_encoder/`) to the root's `tokenizer/`, `t5_tokenizer_path` to its `t5_tokenizer/`;
    `qwen3_tokenizer_path` may also be a folder with `qwen/` and `t5/` subfolders (`t5_tokenizer_path` then
    defaults to its `t5/`).  The names are the config's; `tokenizer_dir` / `t5_tokenizer_dir` are their old
    spellings (still accepted, with a DeprecationWarning).
    """
    qwen3_tokenizer_path = renamed_argument("load_text_encoder", "qwen3_tokenizer_path", qwen3_tokenizer_path,
                                            "tokenizer_dir", tokenizer_dir)
    t5_tokenizer_path = renamed_argument("load_text_encoder", "t5_tokenizer_path", t5_tokenizer_path,
                                         "t5_tokenizer_dir", t5_tokenizer_dir)
    path = Path(path)
    # A wrong --qwen3 file is reported first, then a missing tokenizer, all before any weights are read.
    info = expect_kind(path, QWEN_FLAG, _ACCEPTED_KINDS)
    qwen_default, t5_default = tokenizer_dirs(path)
    if qwen_default is None and info.kind == "hf_qwen3_folder":
        qwen_default = path
    qwen_dir, t5_dir = _resolve_tokenizer_dirs(qwen3_tokenizer_path, t5_tokenizer_path, qwen_default, t5_default)
    tokenizer = AnimaTokenizer.from_dirs(qwen_dir, t5_dir)
    model = load_qwen3(path, dtype=dtype, device=device)
    return AnimaTextEncoder(model, tokenizer)
