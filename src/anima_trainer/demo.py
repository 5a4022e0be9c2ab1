"""Tiny built-in Anima models for the demo, the sampler smoke run and tests.

They use the real file formats (ComfyUI key names and prefixes, safetensors), only with small shapes
and random weights, so every loader path is exercised without downloading multi-GB checkpoints.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from anima_trainer.fileio import atomic_save
from anima_trainer.models.checkpoint import DitConfig

TINY_DIT_CONFIG = DitConfig(num_blocks=2, model_channels=64, num_heads=4, head_dim=16, mlp_dim=256,
                            adaln_lora_dim=32, crossattn_dim=64, adapter_blocks=1, adapter_dim=64,
                            adapter_heads=4, adapter_mlp_dim=128, adapter_vocab=32128, adapter_source_dim=64)


def random_dit_state_dict(config: DitConfig = TINY_DIT_CONFIG, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for an AnimaDiT of `config`: U(-1,1)/sqrt(fan_in) matrices, gains near 1.

    Every tensor is non-zero (also the ones zero-initialised in training) so every path shows in outputs.
    """
    from anima_trainer.models.dit import AnimaDiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AnimaDiT(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        if name.endswith("norm.weight") or "_norm." in name or name.endswith(".norm.weight"):
            t = 1 + 0.2 * u
        elif name.endswith(".bias"):
            t = 0.1 * u
        elif name.endswith("embed.weight"):
            t = u
        else:
            t = u / shape[-1] ** 0.5
        out[name] = t.to(dtype).contiguous()
    return out


def write_tiny_dit(path: str | Path, config: DitConfig = TINY_DIT_CONFIG, *, prefix: str = "net.", seed: int = 0,
                   dtype: torch.dtype = torch.float32, with_adapter: bool = True,
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a random DiT in the public single-file layout (`net.` keys by default)."""
    config = replace(config, has_llm_adapter=with_adapter)
    state = random_dit_state_dict(config, seed, dtype)
    tensors = {prefix + k: v for k, v in state.items()}
    tensors.update(extra or {})
    return atomic_save(tensors, path, {"format": "pt"})


TINY_CORPUS = ["a red cat sits on a blue mat", "the quick brown fox jumps", "masterpiece, best quality, 1girl",
               "hello world (x:1.2) [y]", "long hair, smile, blue eyes", "a small house by a river at dawn",
               "solo, looking at viewer, school uniform, cherry blossoms, outdoors, day"] * 4
TINY_QWEN3_SHAPES = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def write_tiny_tokenizers(folder: str | Path) -> Path:
    """Tiny stand-ins for the real tokenizers: `qwen/` (byte-level BPE, `<|endoftext|>`) and `t5/` (unigram
    with `<pad>`=0, `</s>`=1, `<unk>`=2 and `</s>` appended), in the same file formats as the real ones."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    (folder / "qwen").mkdir(parents=True, exist_ok=True)
    (folder / "t5").mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                          show_progress=False)
    bpe.save_model(str(folder / "qwen"))
    words = sorted({w for s in TINY_CORPUS for w in s.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz(),:."]
    t5 = Tokenizer(models.Unigram(pieces, unk_id=2))
    t5.pre_tokenizer, t5.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t5.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5.save(str(folder / "t5" / "tokenizer.json"))
    return folder


def random_qwen3_state_dict(seed: int = 0, **shapes: int) -> dict[str, torch.Tensor]:
    """Random Qwen3Model weights (transformers names, no `model.` prefix); norm gains near 1."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**{**TINY_QWEN3_SHAPES, **shapes}, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        names = {k: v.shape for k, v in Qwen3Model(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(names.items()):
        u = torch.rand(shape, generator=gen) * 2 - 1
        out[name] = 1 + 0.2 * u if len(shape) == 1 else u / shape[1] ** 0.5
    return out


def write_tiny_qwen3(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen3 in ComfyUI's single-file layout (`model.*` keys)."""
    state = random_qwen3_state_dict(seed)
    return atomic_save({"model." + k: v.contiguous() for k, v in state.items()}, path, {"format": "pt"})


def write_tiny_vae(path: str | Path, seed: int = 0, base_dim: int = 8) -> Path:
    """A tiny random Qwen-Image-architecture VAE (16 latent channels, fewer feature channels), diffusers layout."""
    from diffusers import AutoencoderKLQwenImage

    from anima_trainer.models.vae import VAE_CONFIG

    torch.manual_seed(seed)
    model = AutoencoderKLQwenImage(**{**VAE_CONFIG, "base_dim": base_dim})
    return atomic_save({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def write_demo_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """All four parts of a tiny Anima in the real file formats: DiT, Qwen3, VAE, tokenizers."""
    folder = Path(folder)
    return {"dit": write_tiny_dit(folder / "tiny_anima_dit.safetensors", seed=seed),
            "qwen3": write_tiny_qwen3(folder / "tiny_qwen3.safetensors", seed=seed),
            "vae": write_tiny_vae(folder / "tiny_vae.safetensors", seed=seed),
            "tokenizers": write_tiny_tokenizers(folder / "tokenizers")}


def run_demo(out_dir: str | Path, steps: int = 4, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the tiny models and sample one 64×64 image with them (CPU, a few seconds)."""
    from anima_trainer.models import load_dit, load_text_encoder, load_vae
    from anima_trainer.sample.generate import SampleParams, generate_image, save_png

    from anima_trainer.fileio import check_writable

    out_dir = Path(out_dir)
    check_writable(out_dir / "sample.png", overwrite)  # before anything is written
    paths = write_demo_models(out_dir / "models", seed=seed)
    dit = load_dit(paths["dit"], dtype=torch.float32)
    te = load_text_encoder(paths["qwen3"], tokenizer_dir=paths["tokenizers"], dtype=torch.float32)
    vae = load_vae(paths["vae"], dtype=torch.float32)
    params = SampleParams(prompt="masterpiece, best quality, 1girl, solo, long hair, smile",
                          negative_prompt="worst quality", steps=steps, cfg=4.0, width=64, height=64, seed=seed,
                          models={k: p.name for k, p in paths.items()})
    paths["sample"] = save_png(generate_image(dit, te, vae, params, progress=False), params,
                               out_dir / "sample.png", overwrite=overwrite)
    return paths
