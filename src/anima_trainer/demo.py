"""Tiny built-in Anima models for the demo, the sampler smoke run and tests.

They use the real file formats (ComfyUI key names and prefixes, safetensors), only with small shapes
and random weights, so every loader path is exercised without downloading multi-GB checkpoints.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from anima_trainer.config import parse_train_args
from anima_trainer.config.tomlw import toml_value
from anima_trainer.fileio import atomic_write_bytes, check_writable
from anima_trainer.tensor_files import atomic_save
from anima_trainer.models import load_dit, load_text_encoder, load_vae
from anima_trainer.models.model_files import DitConfig
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.models.vae import VAE_CONFIG
from anima_trainer.networks import apply_network_file
from anima_trainer.sample.generate import SampleParams, generate_image, save_png
from anima_trainer.train.loop import run_training

TINY_DIT_CONFIG = DitConfig(num_blocks=2, model_channels=64, num_heads=4, head_dim=16, mlp_dim=256,
                            adaln_lora_dim=32, crossattn_dim=64, llm_adapter_blocks=1, llm_adapter_dim=64,
                            llm_adapter_heads=4, llm_adapter_mlp_dim=128, llm_adapter_vocab=32128,
                            llm_adapter_source_dim=64)


def random_dit_state_dict(config: DitConfig = TINY_DIT_CONFIG, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for an AnimaDiT of `config`: U(-1,1)/sqrt(fan_in) matrices, gains near 1.

    Every tensor is non-zero (also the ones zero-initialised in training) so every path shows in outputs.
    """
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
                   dtype: torch.dtype = torch.float32, with_llm_adapter: bool = True,
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a random DiT in the public single-file layout (`net.` keys by default)."""
    config = replace(config, has_llm_adapter=with_llm_adapter)
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
    with tempfile.TemporaryDirectory() as scratch:  # the library writes in place; ours go through fileio
        for f in bpe.save_model(scratch):
            atomic_write_bytes(Path(f).read_bytes(), folder / "qwen" / Path(f).name)
    words = sorted({w for s in TINY_CORPUS for w in s.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz(),:."]
    t5 = Tokenizer(models.Unigram(pieces, unk_id=2))
    t5.pre_tokenizer, t5.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t5.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    atomic_write_bytes(t5.to_str().encode("utf-8"), folder / "t5" / "tokenizer.json")
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


SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


def write_shapes_dataset(folder: str | Path, count: int = 8, size: int = 64, seed: int = 0,
                         trigger: str | None = None) -> Path:
    """Coloured shapes on white with captions naming shape and colour (`image.png` + `image.txt`); with a
    `trigger`, every caption starts with it ("trigger, a red circle on a white background")."""
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[i % len(COLOURS)]
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        png = io.BytesIO()
        image.save(png, format="PNG")
        atomic_write_bytes(png.getvalue(), folder / f"shape_{i:02d}.png")
        caption = f"a {colour} {shape} on a white background"
        atomic_write_bytes((caption if trigger is None else f"{trigger}, {caption}").encode(),
                           folder / f"shape_{i:02d}.txt")
    return folder


def write_demo_dataset_toml(path: Path, images: Path, *, batch_size: int = 4, num_repeats: int = 1,
                            extra: str = "") -> Path:
    """The demo's dataset.toml (64 px buckets); `extra` adds `[general]` lines (e.g. "flip_aug = true")."""
    atomic_write_bytes(f"""[general]
caption_extension = ".txt"
enable_bucket = true
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
batch_size = {batch_size}
{extra}
[[datasets]]
  [[datasets.subsets]]
  image_dir = {toml_value(images)}
  num_repeats = {num_repeats}
""".encode(), path)
    return path


def write_demo_configs(out_dir: Path, models: dict[str, Path], images: Path, steps: int, seed: int, *,
                       training_extra: str = "", dataset_extra: str = "") -> Path:
    """The two kohya-style files a user would write: dataset.toml and train.toml; returns train.toml.
    `training_extra` adds lines to train.toml's [training], `dataset_extra` to dataset.toml's [general]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_demo_dataset_toml(out_dir / "dataset.toml", images, extra=dataset_extra)
    train_toml = out_dir / "train.toml"
    atomic_write_bytes(f"""[model]
pretrained_model_name_or_path = {toml_value(models["dit"])}
qwen3 = {toml_value(models["qwen3"])}
qwen3_tokenizer_path = {toml_value(models["tokenizers"] / "qwen")}
t5_tokenizer_path = {toml_value(models["tokenizers"] / "t5")}
vae = {toml_value(models["vae"])}

[network]
network_module = "networks.lora_anima"
network_dim = 8
network_alpha = 8
# the demo trains a DiT LoRA only; without this line a kohya config also trains a Qwen3 text-encoder LoRA
network_train_unet_only = true

[training]
dataset_config = {toml_value(out_dir / "dataset.toml")}
output_dir = {toml_value(out_dir / "output")}
output_name = "demo_lora"
learning_rate = 2e-3
max_train_steps = {steps}
train_batch_size = 4
seed = {seed}
timestep_sampling = "sigmoid"
max_data_loader_n_workers = 0
overwrite = true
{training_extra}""".encode(), train_toml)
    return train_toml


DEMO_TRIGGER = "shapez"
# the demo's probe of drift and response: prompts without the trigger, some near the concept, some far from it
DEMO_EVAL_PROMPTS = ("a blue square on a white background", "a small house by a river at dawn",
                     "masterpiece, best quality, 1girl", "long hair, smile, blue eyes", "the quick brown fox jumps")
DEMO_SAMPLE_PROMPTS = (f"{DEMO_TRIGGER}, a red circle on a white background --w 64 --h 64 --s 8 --l 1 --d 0",
                       f"{DEMO_TRIGGER}, a green triangle on a white background --w 64 --h 64 --s 8 --l 1 --d 1")


def run_demo(out_dir: str | Path, steps: int = 300, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Tiny models + synthetic dataset → train a LoRA on CPU → sample before and after → evaluate every saved
    checkpoint (`anima-trainer eval`: grids, metrics, report.html); returns the paths.

    The dataset is one concept with a trigger word (coloured shapes on white, every caption starting with
    `DEMO_TRIGGER`); a quarter of it is held out, so the run logs `val/loss`; the run saves and logs the light
    metrics four times, so the evaluation has checkpoints to choose between."""
    out_dir = Path(out_dir)
    for name in ("sample_before.png", "sample_after.png", "output/demo_lora.safetensors", "output/eval/results.json",
                 "output/eval/report.html"):
        check_writable(out_dir / name, overwrite)  # before anything is written
    paths = write_demo_models(out_dir / "models", seed=seed)
    paths["dataset"] = write_shapes_dataset(out_dir / "dataset", seed=seed, trigger=DEMO_TRIGGER)
    paths["eval_prompts"] = atomic_write_bytes(("\n".join(DEMO_EVAL_PROMPTS) + "\n").encode(),
                                               out_dir / "eval_prompts.txt")
    paths["sample_prompts"] = atomic_write_bytes(("\n".join(DEMO_SAMPLE_PROMPTS) + "\n").encode(),
                                                 out_dir / "sample_prompts.txt")
    every = max(1, steps // 4)
    paths["train_config"] = write_demo_configs(
        out_dir, paths, paths["dataset"], steps, seed, dataset_extra="validation_split = 0.25\n",
        training_extra=f"""save_every_n_steps = {every}
eval_every_n_steps = {every}
# 6 training images in batches of 4 are 2 steps an epoch: validate as often as the run saves, not every epoch
validate_every_n_epochs = {max(1, every // 2)}
eval_prompts = {toml_value(paths["eval_prompts"])}
sample_prompts = {toml_value(paths["sample_prompts"])}
metadata_trigger_phrase = "{DEMO_TRIGGER}"
""")
    params = SampleParams(prompt=f"{DEMO_TRIGGER}, a red circle on a white background", negative_prompt="", steps=8,
                          cfg=1.0, width=64, height=64, seed=seed, models={"dit": paths["dit"].name})
    te = load_text_encoder(paths["qwen3"], qwen3_tokenizer_path=paths["tokenizers"], dtype=torch.float32)
    vae = load_vae(paths["vae"], dtype=torch.float32)
    dit = load_dit(paths["dit"], dtype=torch.float32)
    paths["sample_before"] = save_png(generate_image(dit, te, vae, params, progress=False), params,
                                      out_dir / "sample_before.png", overwrite=overwrite)
    run = run_training(parse_train_args(["--config_file", str(paths["train_config"])]))
    paths["lora"] = run.final_path
    k = max(1, min(10, len(run.losses) // 2))
    print(f"training loss: mean of the first {k} steps {sum(run.losses[:k]) / k:.4f} → "
          f"last {k} steps {sum(run.losses[-k:]) / k:.4f}")
    apply_network_file(dit, paths["lora"], multiplier=1.0)
    params.networks[paths["lora"].name] = 1.0
    paths["sample_after"] = save_png(generate_image(dit, te, vae, params, progress=False), params,
                                     out_dir / "sample_after.png", overwrite=overwrite)
    paths["results"], paths["report"] = evaluate_demo(run.final_path.parent, overwrite)
    return paths


def evaluate_demo(run_folder: Path, overwrite: bool) -> tuple[Path, Path]:
    """`anima-trainer eval` of the demo's run folder with its own settings (grids of 64 px, 8 steps), printing what
    the command prints: the reproducing command, the table and the recommendation."""
    from anima_trainer.eval_command import result_table
    from anima_trainer.evaluation.evaluate import EvalSpec, evaluate, plan_evaluation, write_outputs
    from anima_trainer.evaluation.recommend import recommend

    plan = plan_evaluation(EvalSpec(inputs=[run_folder], grid_prompts=6, grid_size=64, grid_steps=8,
                                    overwrite=overwrite))
    print(f"evaluating every saved checkpoint: {plan.spec.command}")
    results = evaluate(plan.spec, plan=plan)
    written = write_outputs(results, plan.spec.out, drift_threshold=plan.spec.drift_threshold)
    for line in result_table(results):
        print(f"  {line}")
    print("recommendation:")
    for line in recommend(results, drift_threshold=plan.spec.drift_threshold).lines:
        print(f"  {line}")
    return written
