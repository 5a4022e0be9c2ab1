"""kohya's `anima_train_network.py` command line → anima-trainer's, for GUIs that launch sd-scripts
(kohya_ss, lora-scripts) and for root-style Anima_Trainer files (sd-scripts-anima's in-memory mode, §6.4).

`anima-trainer train` reads kohya's train-args TOML as is, strictly.  What a kohya user's files carry beyond that,
and what this module translates, is:

* the dataset on the command line / in the train-args TOML (`train_data_dir` with `<N>_<name>/` folders,
  `reg_data_dir`, `in_json`, `resolution`, `enable_bucket`, caption and bucket options): a dataset.toml is
  generated.  With a `dataset_config`, those options are kohya's fallback level under `[general]`;
* LyCORIS `network_args` that do nothing for Anima's Linear layers (conv_dim, use_tucker, ...) and its `preset`;
* a root-style Anima_Trainer config: converted (convert_root.py) with a notice.

Options sd-scripts ignores for Anima and keys GUIs write are not handled here: `parse_train_args` accepts them
with one notice each (kohya_options.RULES), and `lr_scheduler_num_cycles` keeps kohya's meaning there.

Generated files go to `<output_dir>/<output_name>_config/` (train.toml, dataset.toml), are rewritten on every
launch and show what actually ran.  Everything else still goes through `parse_train_args`, so anything
refused fails there with the usual message (naming the user's file and line, not the generated train.toml).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from anima_trainer.compat.convert_root import convert_root_config
from anima_trainer.compat.folders import kohya_folder_subsets
from anima_trainer.config.errors import ConfigError
from anima_trainer.config.loader import read_train_toml
from anima_trainer.config.root_schema import is_root_style
from anima_trainer.config.tomlw import dumps
from anima_trainer.config.train import check_output_name
from anima_trainer.fileio import atomic_write_bytes


def _resolution(v: Any) -> Any:
    """kohya's "W,H" / "N" / N → N or [W, H]."""
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",") if p.strip()]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"resolution: expected 'N' or 'W,H', got {v!r}") from None
        if len(nums) not in (1, 2):
            raise ConfigError(f"resolution: expected 'N' or 'W,H', got {v!r}")
        return nums[0] if len(nums) == 1 or nums[0] == nums[1] else nums
    return v


def _flag(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


# kohya's dataset-on-CLI options (kohya_anima.md §1.3, §2.2): name → argparse type ("flag" = store_true)
DATASET_OPTIONS: dict[str, Any] = {
    "train_data_dir": str, "reg_data_dir": str, "in_json": str, "resolution": str, "enable_bucket": "flag",
    "min_bucket_reso": int, "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": "flag",
    "caption_extension": str, "shuffle_caption": "flag", "keep_tokens": int, "keep_tokens_separator": str,
    "secondary_separator": str, "caption_separator": str, "caption_prefix": str, "caption_suffix": str,
    "enable_wildcard": "flag", "caption_dropout_rate": float, "caption_dropout_every_n_epochs": int,
    "caption_tag_dropout_rate": float, "token_warmup_min": int, "token_warmup_step": float, "color_aug": "flag",
    "flip_aug": "flag", "random_crop": "flag", "skip_image_resolution": str, "resize_interpolation": str,
    "caption_extention": str,  # kohya's old misspelling, still accepted by it for caption_extension
}
_FOLDER_OPTIONS = ("train_data_dir", "reg_data_dir", "in_json")
LYCORIS_CONV_ARGS = ("conv_dim", "conv_alpha", "use_tucker", "use_cp")
LYCORIS_OFF_ARGS = ("bypass_mode", "use_scalar", "rank_dropout_scale", "dora_wd")
LYCORIS_FULL_PRESET = ("train_adaln=true", "train_final_layer=true", "train_embedders=true", "train_llm_adapter=true")
# consumed from the command line so they can be translated (peeked ones are put back as given)
_PEEK = ("config_file", "dataset_config", "output_dir", "output_name", "network_module")
_TRANSLATED = ("network_args",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"command line: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(add_help=False, allow_abbrev=False)
    for name, kind in DATASET_OPTIONS.items():
        if kind == "flag":
            p.add_argument(f"--{name}", nargs="?", const="true", default=argparse.SUPPRESS)
        else:
            p.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS)
    for name in _PEEK + _TRANSLATED:
        p.add_argument(f"--{name}", nargs="*" if name == "network_args" else None, default=argparse.SUPPRESS)
    return p


def _to_cli(name: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"--{name}", *map(str, value)]
    if isinstance(value, bool):
        return [f"--{name}={'true' if value else 'false'}"]
    return [f"--{name}", str(value)]


def _number(v: Any) -> float | None:
    if isinstance(v, str) and v.strip().endswith("%"):
        v = v.strip()[:-1]
        try:
            return float(v) / 100
        except ValueError:
            return None
    try:
        return None if isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None


def _truthy(v: Any) -> bool:
    return _flag(v) if isinstance(v, str) else bool(v)


class DropIn:
    """Holds the two layers (TOML, command line) while they are translated; `argv()` is the result."""

    def __init__(self, argv: list[str], finetune: bool = False) -> None:
        ns, rest = _parser().parse_known_args(argv)
        self.finetune = finetune
        self.notices: list[str] = []
        self.rest = rest
        self.cli: dict[str, Any] = vars(ns)
        for name, kind in DATASET_OPTIONS.items():
            if kind == "flag" and name in self.cli:
                self.cli[name] = _flag(self.cli[name])
        self.toml: dict[str, Any] = {}
        self.toml_changed = False
        self.dataset_doc: dict[str, Any] | None = None
        self.source = self.cli.get("config_file")
        if self.source is not None and not _writes_config(self.rest):  # output_config: the file is written
            self._read_toml(self.source)

    # --- layers --------------------------------------------------------------------------------------------
    def _read_toml(self, source: str) -> None:
        path = Path(source).expanduser()
        if not path.is_file() and path.with_name(path.name + ".toml").is_file():
            path = path.with_name(path.name + ".toml")
        raw = None
        if path.is_file():
            try:
                raw = _read_toml_text(path)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
                raw = None  # read_train_toml reports it
        if raw is not None and is_root_style(raw):
            self._convert_root(raw, path)
        else:
            self.toml, _ = read_train_toml(path)

    def _convert_root(self, raw: dict[str, Any], path: Path) -> None:
        conv = convert_root_config(raw, ".")
        self.toml, self.toml_changed = dict(conv.train), True
        if "dataset_config" in self.cli:
            self.notices.append("both the root-style [dataset] and --dataset_config are given; using --dataset_config")
        else:
            self.dataset_doc = conv.dataset
        # one line per setting that is not simply mapped: approximations, refusals, and options set to something
        # that has no effect here (the compatibility rule's notices)
        hidden = [r for r in conv.rows if r.status in ("approximate", "unsupported", "unknown")
                  or (r.status == "not needed" and r.value not in (None, False, 0, 0.0, ""))]
        self.notices.append(f"{path.name} is a root-style Anima_Trainer config: converted on the fly ("
                            f"`anima-trainer convert-config {path} --out DIR` writes it out with the full table)"
                            + "".join(f"\n  {r.key} = {r.value!r}: {r.status}, {r.note}" for r in hidden))

    def get(self, name: str, default: Any = None) -> Any:
        return self.cli.get(name, self.toml.get(name, default))

    def has(self, name: str) -> bool:
        return name in self.cli or name in self.toml

    def drop(self, name: str, reason: str) -> None:
        """Remove `name` from both layers; a notice unless its value was off/empty anyway."""
        shown = self.get(name)
        self.cli.pop(name, None)
        if self.toml.pop(name, None) is not None:
            self.toml_changed = True
        if shown not in (None, False, 0, "", [], "false", "False", "0"):
            self.notices.append(f"{name} = {shown!r} ignored: {reason}")

    def replace(self, name: str, fn: Any) -> None:
        """Apply `fn` to the value in each layer that has `name` (None → remove it there)."""
        for layer in (self.cli, self.toml):
            if name in layer:
                new = fn(layer[name])
                if layer is self.toml:
                    self.toml_changed = True
                if new is None:
                    del layer[name]
                else:
                    layer[name] = new

    # --- translations -------------------------------------------------------------------------------------
    def network_args(self) -> None:
        module = str(self.get("network_module", ""))
        if module not in ("lycoris.kohya", "networks.lokr", "networks.loha"):
            return

        def edit(values: Any) -> Any:
            items = values.split() if isinstance(values, str) else list(values or [])
            out: list[str] = []
            for item in items:
                key, _, val = str(item).partition("=")
                key, val = key.strip(), val.strip()
                if key in LYCORIS_CONV_ARGS:
                    if _number(val) or _truthy(val) and val.lower() != "false":
                        self.notices.append(f"network_args {item} ignored: only for convolutions; Anima trains "
                                            "Linears")
                elif key in LYCORIS_OFF_ARGS and not _truthy(val):
                    continue
                elif key == "preset" and module == "lycoris.kohya":
                    out += self._preset(val)
                else:
                    out.append(str(item))
            return out

        self.replace("network_args", edit)

    def _preset(self, preset: str) -> list[str]:
        if preset in ("attn-mlp", "attn_mlp"):
            return []
        if preset == "full":
            self.notices.append("network_args preset=full: trained as kohya's Anima targets (attention and MLP "
                                "Linears of every block); add " + ", ".join(LYCORIS_FULL_PRESET)
                                + " to network_args for more")
            return []
        raise ConfigError(f"network_args: LyCORIS preset={preset!r} is not supported; use preset=full, "
                          "preset=attn-mlp, or include_patterns / exclude_patterns")

    # --- dataset ------------------------------------------------------------------------------------------
    def dataset(self, out_dir: Path) -> None:
        options = {k: self.get(k) for k in DATASET_OPTIONS if self.has(k)}
        for k in options:
            self.cli.pop(k, None)
            if self.toml.pop(k, None) is not None:
                self.toml_changed = True
        options = {k: v for k, v in options.items() if v not in (None, "")}
        if "caption_extention" in options:  # kohya: used when caption_extension is not given
            options.setdefault("caption_extension", options["caption_extention"])
            del options["caption_extention"]
        general = {k: (_resolution(v) if k in ("resolution", "skip_image_resolution") else v)
                   for k, v in options.items() if k not in _FOLDER_OPTIONS}
        if self.dataset_doc is not None:  # root-style [dataset]
            doc = self.dataset_doc
        elif self.has("dataset_config"):
            ignored = sorted(k for k in _FOLDER_OPTIONS if k in options)
            if ignored:
                self.notices.append(f"{', '.join(ignored)} ignored: dataset_config is given (as in kohya)")
            if not general:
                return
            doc = self._fallbacks(Path(str(self.get("dataset_config"))), general)
            self.notices.append(f"dataset options {sorted(general)} apply where {self.get('dataset_config')} does "
                                "not set them (kohya's command-line level)")
        elif any(k in options for k in _FOLDER_OPTIONS):
            doc = {"general": general, "datasets": [{"subsets": self._folder_subsets(options)}]}
        else:
            return
        path = out_dir / "dataset.toml"
        atomic_write_bytes(dumps(doc, "generated by anima_train_network.py from the kohya options").encode(), path)
        self.cli["dataset_config"] = str(path)
        self.notices.append(f"dataset: {path}")

    def _folder_subsets(self, options: dict[str, Any]) -> list[dict[str, Any]]:
        if "in_json" in options:
            if "train_data_dir" not in options:
                raise ConfigError("in_json: needs train_data_dir (the image folder of the metadata file)")
            return [{"image_dir": str(options["train_data_dir"]), "metadata_file": str(options["in_json"])}]
        subsets: list[dict[str, Any]] = []
        for key, reg in (("train_data_dir", False), ("reg_data_dir", True)):
            if key not in options:
                continue
            try:
                found, notes = kohya_folder_subsets(options[key], key)
            except FileNotFoundError as e:
                raise ConfigError(str(e)) from None
            self.notices += notes
            if not found and not reg:
                raise ConfigError(f"{key}: no <repeats>_<name> folder with images in {options[key]} (kohya's "
                                  "layout: e.g. 10_mychar/ holding the images and their caption files)")
            for s in found:
                sub = {"image_dir": str(s.image_dir), "num_repeats": s.num_repeats, "class_tokens": s.class_tokens}
                subsets.append({**sub, "is_reg": True} if reg else sub)
        return subsets

    def _fallbacks(self, path: Path, general: dict[str, Any]) -> dict[str, Any]:
        """The user's dataset.toml with the command-line level under [general] (where [general] does not set the
        key), relative paths made absolute so the copy finds the same files."""
        if not path.is_file() and path.suffix == "" and path.with_suffix(".toml").is_file():
            path = path.with_suffix(".toml")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"dataset_config: cannot read {path}: {e}") from None
        except RecursionError:
            raise ConfigError(f"dataset_config: {path} is nested too deeply to be read (a hostile or broken "
                              "TOML)") from None
        doc.setdefault("general", {})
        for k, v in general.items():
            doc["general"].setdefault(k, v)
        for ds in doc.get("datasets", []) if isinstance(doc.get("datasets"), list) else []:
            for sub in ds.get("subsets", []) if isinstance(ds, dict) else []:
                for key in ("image_dir", "metadata_file"):
                    if isinstance(sub, dict) and isinstance(sub.get(key), str):
                        p = Path(sub[key]).expanduser()
                        if not p.is_absolute():
                            alt = path.resolve().parent / p
                            sub[key] = str(p.absolute() if p.exists() or not alt.exists() else alt)
        return doc

    def llm_adapter(self) -> None:
        """anima_train.py: kohya trains the LLM adapter unless llm_adapter_lr = 0; here it is opt-in, so a config
        that says nothing about it gets one notice (an llm_adapter_lr above 0 opts in: finetune_settings.py)."""
        named = {tok[2:].partition("=")[0] for tok in self.rest if tok.startswith("--")}
        if self.finetune and not any(self.has(k) or k in named for k in (
                "llm_adapter_lr", "finetune_llm_adapter", "trainable_patterns")):
            self.notices.append("the LLM adapter is not trained: kohya's anima_train.py trains it at learning_rate "
                                "unless llm_adapter_lr = 0, anima-trainer only when asked (set llm_adapter_lr or "
                                "finetune_llm_adapter = true to train it)")

    # --- result -------------------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        self.network_args()
        self.llm_adapter()
        needs_files = self.toml_changed or self.dataset_doc is not None or any(
            self.has(k) for k in DATASET_OPTIONS)
        out_dir = None
        if needs_files:
            if not self.get("output_dir"):
                raise ConfigError("output_dir: required (set --output_dir or output_dir in the --config_file TOML)")
            try:  # the generated folder is named after output_name: never a path outside output_dir
                name = check_output_name(str(self.get("output_name", "last")))
            except ValueError as e:
                raise ConfigError(f"output_name: {e}") from None
            out_dir = Path(str(self.get("output_dir"))).expanduser() / f"{name}_config"
            out_dir.mkdir(parents=True, exist_ok=True)
            self.dataset(out_dir)
        argv = list(self.rest)
        for name, value in self.cli.items():
            if name == "config_file" and self.toml_changed:
                continue
            argv += _to_cli(name, value)
        if self.toml_changed and out_dir is not None:
            path = out_dir / "train.toml"
            header = f"generated by anima_train_network.py from {self.source}"
            atomic_write_bytes(dumps(self.toml, header).encode(), path)
            argv = ["--config_file", str(path), *argv]
            self.notices.append(f"settings: {path}")
        return argv


def _writes_config(rest: list[str]) -> bool:
    """`--output_config` (kohya: --config_file names the file to write, not one to read) is on the command line."""
    asked = False
    for tok in rest:
        if tok == "--output_config" or tok.startswith("--output_config="):
            asked = tok.partition("=")[2].strip().lower() not in ("false", "0", "no", "off")
        elif tok == "--no-output_config":
            asked = False
    return asked


def help_epilog(finetune: bool = False) -> str:
    """What `anima_train_network.py --help` adds below `anima-trainer train`'s options: the kohya options it
    translates first (module docstring); `finetune`: anima_train.py's, with what its fine-tune does."""
    import textwrap

    items = [
        "the dataset on the command line (written as a dataset.toml): "
        + ", ".join(f"--{n}" for n in DATASET_OPTIONS),
        "LyCORIS --network_args (conv_dim, preset, ...)",
        "--config_file may be a root-style Anima_Trainer config (converted on the fly)",
    ]
    head = ("also accepted, translated before training (a notice says what was done; generated files go to "
            "<output_dir>/<output_name>_config/; see docs/migration.md):")
    lines = [textwrap.fill(head, 100),
             *(textwrap.fill(i, 100, initial_indent="  ", subsequent_indent="    ") for i in items)]
    if finetune:
        lines += ["", *(textwrap.fill(i, 100, subsequent_indent="  ") for i in FINETUNE_HELP)]
    return "\n".join(lines)


def _read_toml_text(path: Path) -> dict[str, Any]:
    """tomllib.loads of a file; a document nested too deeply for the parser is a ConfigError naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(f"config_file: '{path}' is nested too deeply to be read (a hostile or broken TOML; "
                          "kohya's TOMLs are one level of tables)") from None


def translate_kohya_argv(argv: list[str], finetune: bool = False) -> tuple[list[str], list[str]]:
    """(argv for `parse_train_args`, notices to show).  Writes the generated files (module docstring).
    `finetune`: the command line is anima_train.py's (kohya's full fine-tune)."""
    d = DropIn(argv, finetune)
    return d.argv(), d.notices


# What `anima_train.py` (kohya's full fine-tune script) adds to the translated command line: the fine-tune mode.
FINETUNE_ARGS = ("--training_mode", "finetune")
# anima_train.py --help: what its fine-tune does with kohya's options (docs/migration.md "Fine-tuning")
FINETUNE_HELP = (
    "the fine-tune (training_mode = \"finetune\"): the whole DiT trains, or what --trainable_patterns selects; "
    "kohya's component rates --self_attn_lr, --cross_attn_lr, --mlp_lr, --mod_lr, --llm_adapter_lr apply (0 = "
    "frozen); the LLM adapter trains only with --llm_adapter_lr above 0 or --finetune_llm_adapter (kohya trains it "
    "at --learning_rate unless --llm_adapter_lr 0: a notice says so)",
    "--fused_backward_pass, --full_bf16 (bf16 weights with exactly compensated updates), --blocks_to_swap (trained "
    "blocks too with --fused_backward_pass), --optimizer_offload; several processes shard the DiT with FSDP2 "
    "(--fsdp_sharding)",
    "every save is a whole DiT .safetensors in the base file's layout (net.* keys, format=pt) that ComfyUI loads, "
    "named as kohya's (<output_name>.safetensors, -step00000001, -000001), whatever --save_model_as or "
    "--use_safetensors say; adapter options (--network_dim, --unet_lr, ...) are accepted with a notice and change "
    "nothing",
)

