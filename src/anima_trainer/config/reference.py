"""docs/config_reference.md, generated from the settings schemas so the reference cannot drift from the code.

Sources: `TrainConfig` (every training setting: type, default, description), kohya_options (sd-scripts-anima
aliases; kohya options accepted only with values that change nothing), and the dataset.toml key tables of
data/config.py.  Regenerate with `anima-trainer config-reference > docs/config_reference.md` or
`python -m anima_trainer.config.reference --write`; tests/test_config_reference.py fails when the committed file
differs.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic_core import PydanticUndefined

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.train import TrainConfig

DOC_PATH = Path(__file__).resolve().parents[3] / "docs" / "config_reference.md"
REGENERATE = "anima-trainer config-reference > docs/config_reference.md"

# Meanings of the settings whose TrainConfig field has no description (a description, once added, wins).
FALLBACK_MEANINGS: dict[str, str] = {
    "save_every_n_steps": "save an intermediate network file every N optimizer steps",
    "save_every_n_epochs": "save an intermediate network file every N epochs",
    "lr_scheduler": "learning-rate schedule (docs/training.md, Learning-rate schedules)",
    "max_train_steps": "optimizer steps to train (unless max_train_epochs is set)",
    "train_batch_size": "images per batch, for datasets whose dataset.toml sets no batch_size",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "mixed_precision": "dtype of the frozen models and the compute (no = fp32); adapters stay fp32",
    "seed": "seed of data order, noise and σ (unset: 42)",
    "gradient_checkpointing": "recompute each DiT block in backward: much less activation memory, slower",
    "max_data_loader_n_workers": "image-decoding worker processes (0 = in the training process)",
    "timestep_sampling": "how σ is drawn (sigmoid = logit-normal; shift = logit-normal then shifted)",
    "discrete_flow_shift": "shift s of σ ← s·σ / (1 + (s−1)·σ), for shift / sigma sampling",
    "sigmoid_scale": "scale of the normal before the sigmoid (sigmoid / shift / flux_shift)",
    "weighting_scheme": "loss weight over σ (sigma_sqrt, cosmap) or σ density for sigma sampling",
    "logit_mean": "mean of the logit-normal weighting_scheme",
    "logit_std": "standard deviation of the logit-normal weighting_scheme",
    "mode_scale": "scale of the mode weighting_scheme",
    "loss_type": "per-element loss: l2 (MSE), l1, huber, smooth_l1",
    "huber_c": "threshold of the huber / smooth_l1 loss",
    "tensorboard_host": "address the TensorBoard server binds to",
    "sample_every_n_steps": "preview images every N optimizer steps (needs sample_prompts)",
    "sample_every_n_epochs": "preview images every N epochs (needs sample_prompts)",
    "sample_at_first": "also sample before the first step",
    "cache_latents": "encode every image once before training and keep the latents in RAM",
    "cache_latents_to_disk": "the latent cache as safetensors files beside the images (reused across runs)",
    "cache_text_encoder_outputs": "encode every caption once and keep the Qwen3 states in RAM",
    "cache_text_encoder_outputs_to_disk": "the text cache on disk",
    "vae_batch_size": "images per VAE call while caching latents",
    "text_encoder_batch_size": "captions per Qwen3 call while caching (default 8)",
    "caption_variants": "random captions + text cache: processed variants encoded per caption",
    "prior_loss_weight": "loss weight of regularisation (is_reg) images",
    "cache_llm_adapter_outputs": "frozen LLM adapter: its output per caption computed once (RAM)",
}


def _type_name(ann: Any) -> str:
    """A reader's name for a field annotation: `int`, `path`, `one of a, b`, `list of key=value` ..."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" (optional)" if type(None) in args else "")
    if origin is dict:
        return "list of key=value"
    names = {bool: "bool", int: "int", float: "float", str: "string", Path: "path"}
    return names.get(ann, getattr(ann, "__name__", str(ann)))


def _default(name: str) -> str:
    info = TrainConfig.model_fields[name]
    if info.default_factory is not None:
        return "`[]`"
    if info.default is PydanticUndefined:
        return "**required**"
    if info.default is None:
        return "unset"
    v = info.default
    return f"`{str(v).lower() if isinstance(v, bool) else v}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _aliases() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, canonical in ko.ALIASES.items():
        out.setdefault(canonical, []).append(alias)
    return out


def _train_rows() -> list[str]:
    aliases = _aliases()
    rows = ["| key | type | default | meaning | also accepted as |", "|---|---|---|---|---|"]
    # TrainConfig's own settings first, then the option groups it mixes in (pydantic lists parents' fields first)
    own = [n for n in TrainConfig.model_fields if n in vars(TrainConfig).get("__annotations__", {})]
    for name in [*own, *(n for n in TrainConfig.model_fields if n not in own)]:
        info = TrainConfig.model_fields[name]
        meaning = info.description or FALLBACK_MEANINGS.get(name, "")
        also = ", ".join(f"`{a}`" for a in aliases.get(name, []))
        rows.append(f"| `{name}` | {_cell(_type_name(info.annotation))} | {_default(name)} | {_cell(meaning)} | "
                    f"{also} |")
    return rows


def _dataset_rows() -> list[str]:
    from anima_trainer.data import config as dc

    levels = {**{k: "subset, dataset, general" for k in dc.ASCENDABLE_KEYS},
              **{k: "dataset, general" for k in dc.DATASET_KEYS}, **{k: "subset" for k in dc.SUBSET_ONLY_KEYS}}
    rows = ["| key | where | default |", "|---|---|---|"]
    for key in sorted(levels):
        d = dc.DEFAULTS.get(key)
        shown = "unset" if d is None else f"`{str(d).lower() if isinstance(d, bool) else d}`"
        if key == "image_dir":
            shown = "**required** (unless metadata_file)"
        elif key == "resolution":
            shown = "**required**"
        rows.append(f"| `{key}` | {levels[key]} | {shown} |")
    return rows


def render_reference() -> str:
    """The whole markdown document."""
    parts = [
        "# Configuration reference",
        "",
        f"<!-- generated by anima_trainer.config.reference; do not edit by hand. Regenerate: {REGENERATE} -->",
        "",
        "Every setting of `anima-trainer train` (and of `anima_train_network.py`). Each key works on the command "
        "line (`--key value`; booleans also `--key`, `--key=false`, `--no-key`) and in the `--config_file` TOML "
        "(tables are cosmetic: kohya flattens them). Precedence: command line > TOML > default. Explanations and "
        "examples: [training.md](training.md); starting values: [recommended_settings.md](recommended_settings.md).",
        "",
        "## Training settings",
        "",
        *_train_rows(),
        "",
        "## Other kohya / sd-scripts-anima options and GUI keys",
        "",
        "Every other option of kohya's Anima trainer and of sd-scripts-anima, and the keys GUIs write, is accepted "
        "with one start-up notice saying what happens instead, or refused where ignoring it would change the "
        "result: the per-option table is in [migration.md](migration.md#every-option).",
        "",
        "## dataset.toml keys",
        "",
        "kohya's three levels: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`; the nearest level wins "
        "(subset > dataset > general > default). Details: [training.md](training.md#datasettoml).",
        "",
        *_dataset_rows(),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """`python -m anima_trainer.config.reference [--write]`: print the reference, or write docs/config_reference.md."""
    argv = sys.argv[1:] if argv is None else argv
    text = render_reference()
    if argv == ["--write"]:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(DOC_PATH)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
