"""`anima-trainer convert-config`: a root-style Anima_Trainer TOML → kohya-style `train.toml` + `dataset.toml`.

Every key of the root schema (root_schema.py, seed_system.md §6.2) is accounted for in a report row: mapped,
written from the root trainer's own default (never kohya's), approximated (the note says how it differs), not
needed, unsupported, or unknown.  Where sd-scripts-anima's converter was wrong (§8.2 #23–24) this one keeps the
root meaning:

* `save_every` counts epochs → `save_every_n_epochs`;
* `epochs` and `max_steps` together stopped at whichever came first; kohya's `max_train_epochs` overrides
  `max_train_steps`, so the data folder is scanned now and the one that binds first is written (both counted
  in optimizer steps with anima-trainer's buckets);
* a parent `data_dir` of `N_name/` folders becomes one subset per folder with `num_repeats = N`;
* `lr_scheduler_num_cycles` follows diffusers' convention, the one the root keys were written for: cosine
  periods for cosine / cosine_with_min_lr / WSD (0.5 = one descent), restarts for cosine_with_restarts; the
  written train.toml uses kohya's meaning (train/schedulers.py): periods × 2 for cosine_with_min_lr / WSD, the
  same count for cosine_with_restarts, and a cosine of other than one descent becomes cosine_with_min_lr;
* `train_parts` (default `dit_llm_adapter`) puts adapters in the LLM adapter too → `train_llm_adapter`;
* the fixed flow settings of the root trainer (logit-normal t, shift 3) are written out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anima_trainer.compat.folders import root_folder_subsets
from anima_trainer.config.errors import ConfigError
from anima_trainer.config.root_schema import INF, ROOT_SCHEMA, is_root_style
from anima_trainer.data import build_dataset, parse_dataset_config

STATUSES = ("mapped", "default", "approximate", "not needed", "unsupported", "unknown")
TRAIN_NAME, DATASET_NAME, TRACKER_NAME = "train.toml", "dataset.toml", "tracker.toml"
# train.toml tables (cosmetic: kohya flattens them) by key prefix / name
_GROUPS = (("model", ("pretrained_model_name_or_path", "qwen3", "vae", "t5_tokenizer_path")),
           ("network", ("network_",)),
           ("optimizer", ("optimizer_", "learning_rate", "lr_", "max_grad_norm")),
           ("output", ("output_", "save_")),
           ("logging", ("log_", "wandb_", "monitor_")))
_OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy"}


class ConversionError(ConfigError):
    """A root-style config that cannot be converted; the message names the root key (`table.key`)."""


@dataclass
class Row:
    key: str
    value: Any
    target: str
    status: str
    note: str = ""


@dataclass
class Conversion:
    train: dict[str, Any] = field(default_factory=dict)  # flat kohya/anima-trainer names
    dataset: dict[str, Any] = field(default_factory=dict)
    tracker: dict[str, Any] | None = None
    rows: list[Row] = field(default_factory=list)

    def table(self) -> str:
        """The report as an aligned text table (printed, and the comment header of train.toml)."""
        cells = [("root key", "value", "anima-trainer", "status", "note")]
        cells += [(r.key, _clip(_show(r.value), 30), r.target or "-", r.status, r.note) for r in self.rows]
        widths = [min(max(len(c[i]) for c in cells), cap) for i, cap in enumerate((36, 30, 48, 11))]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
        return "\n".join(line.rstrip() for line in lines)

    def grouped_train(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for k, v in self.train.items():
            group = next((g for g, keys in _GROUPS if any(k == p or (p.endswith("_") and k.startswith(p))
                                                           for p in keys)), "training")
            out.setdefault(group, {})[k] = v
        return out


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class _Converter:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.c = Conversion()
        self.general: dict[str, Any] = {}
        self.ds: dict[str, Any] = {}

    # --- reading -----------------------------------------------------------------------------------------
    def get(self, table: str, key: str) -> tuple[Any, bool]:
        """(value, given): the file's value, else the root trainer's default."""
        section = self.data.get(table)
        if isinstance(section, dict) and key in section:
            return section[key], True
        return ROOT_SCHEMA[table][key], False

    def row(self, table: str, key: str, target: str, status: str, note: str = "", value: Any = None) -> None:
        v, given = self.get(table, key)
        v = v if value is None else value
        shown = f"{table}.{key}" + ("" if given else " (absent)")
        self.c.rows.append(Row(shown, v, target, status if given or status != "mapped" else "default", note))

    def put(self, table: str, key: str, target: str, value: Any, status: str = "mapped", note: str = "") -> None:
        """Write `value` as train key `target` ("general.x" / "dataset.x" for dataset.toml) and report it."""
        if target.startswith("general."):
            self.general[target[8:]] = value
            shown = f"dataset.toml [general] {target[8:]} = {_show(value)}"
        elif target.startswith("dataset."):
            self.ds[target[8:]] = value
            shown = f"dataset.toml [[datasets]] {target[8:]} = {_show(value)}"
        else:
            self.c.train[target] = value
            shown = f"{target} = {_show(value)}"
        self.row(table, key, shown, status, note)

    def copy(self, table: str, key: str, target: str, kind: type | tuple[type, ...], note: str = "") -> None:
        """`put` of the key's own (type-checked) value."""
        self.put(table, key, target, self.typed(table, key, kind), note=note)

    def typed(self, table: str, key: str, kind: type | tuple[type, ...]) -> Any:
        v, _ = self.get(table, key)
        if v is None:
            return None
        ok = isinstance(v, kind) and not (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                             else (kind,)))
        if not ok:
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConversionError(f"{table}.{key}: expected {names}, got {v!r}")
        return v

    def number(self, table: str, key: str) -> float | None:
        v = self.typed(table, key, (int, float))
        return None if v is None else float(v)

    # --- sections ----------------------------------------------------------------------------------------
    def model(self) -> None:
        for key, target in (("transformer_path", "pretrained_model_name_or_path"), ("vae_path", "vae"),
                            ("text_encoder_path", "qwen3")):
            v = self.typed("model", key, str)
            if not v.strip():
                raise ConversionError(f"model.{key}: required (the path of the {target} file or folder)")
            self.put("model", key, target, v)
        t5_dir, t5_path = self.typed("model", "t5_tokenizer_dir", str), self.typed("model", "t5_tokenizer_path", str)
        if not (t5_dir or "").strip() and not t5_path.strip():
            raise ConversionError(
                "model.t5_tokenizer_path: required (also read as model.t5_tokenizer_dir): the folder with the T5 "
                "tokenizer (tokenizer.json or spiece.model); the LLM adapter always needs T5 token ids. "
                "`anima-trainer download` fetches it")
        if (t5_dir or "").strip():
            self.put("model", "t5_tokenizer_dir", "t5_tokenizer_path", t5_dir)
            if t5_path.strip():
                self.row("model", "t5_tokenizer_path", "", "not needed", "t5_tokenizer_dir wins when both are set")
        else:
            self.put("model", "t5_tokenizer_path", "t5_tokenizer_path", t5_path)

    def dataset(self) -> None:
        data_dir = self.typed("dataset", "data_dir", str)
        if not data_dir.strip():
            raise ConversionError("dataset.data_dir: required (the folder of images and .txt captions)")
        repeats = self.typed("dataset", "repeats", int)
        try:
            subsets, kohya_layout = root_folder_subsets(data_dir, repeats)
        except FileNotFoundError as e:
            raise ConversionError(str(e)) from None
        if not subsets:
            raise ConversionError(f"dataset.data_dir: no images (.png .jpg .jpeg .webp .bmp) in {data_dir} or "
                                  "its subfolders")
        self.ds["subsets"] = [{"image_dir": str(s.image_dir), "num_repeats": s.num_repeats} for s in subsets]
        listing = ", ".join(f"{s.image_dir.name or s.image_dir} ×{s.num_repeats} ({s.images})" for s in subsets[:6])
        more = f", … {len(subsets) - 6} more" if len(subsets) > 6 else ""
        self.row("dataset", "data_dir", f"{len(subsets)} subset(s): {listing}{more}", "mapped",
                 "scanned now, recursively, as the root trainer does; <N>_<name> folders repeat N times")
        if kohya_layout:
            self.row("dataset", "repeats", "", "not needed", "<N>_<name> folders set the repeats (root rule)")
        else:
            self.row("dataset", "repeats", "num_repeats of the subsets", "mapped")
        self.copy("dataset", "resolution", "dataset.resolution", int)
        self.copy("dataset", "min_reso", "dataset.min_bucket_reso", int)
        self.copy("dataset", "max_reso", "dataset.max_bucket_reso", int)
        step = self.typed("dataset", "reso_step", int)
        if step % 16:
            raise ConversionError(f"dataset.reso_step: {step} is not a multiple of 16 (Anima: DiT patch 2 × VAE 8); "
                                  "use 64")
        self.put("dataset", "reso_step", "dataset.bucket_reso_steps", step,
                 note="kohya's bucket list: sides from min to max in steps, area ≤ resolution²")
        self.ds["enable_bucket"] = True
        self.c.rows.append(Row("(bucketing)", "always on", "dataset.toml [[datasets]] enable_bucket = true",
                               "mapped", "the root trainer always bucketed"))
        self.row("dataset", "max_ar", "", "unsupported",
                 "kohya-style buckets have no aspect-ratio cap (their sides are limited by min/max_reso)")
        self.copy("dataset", "shuffle_caption", "general.shuffle_caption", bool)
        self.row("dataset", "shuffle_caption_per_epoch", "", "not needed",
                 "root v1.02 ignored it too and reshuffled each time an image is used, as anima-trainer does")
        self.copy("dataset", "keep_tokens", "general.keep_tokens", int)
        for key in ("keep_tokens_separator", "caption_extension"):
            if (v := self.typed("dataset", key, str)) is not None:
                self.put("dataset", key, f"general.{key}", v)
        if self.typed("dataset", "caption_extension", str) is None:
            self.general["caption_extension"] = ".txt"
            self.c.rows.append(Row("(captions)", "<image stem>.txt", 'dataset.toml [general] caption_extension = '
                                   '".txt"', "default", "the root trainer read <stem>.txt (missing → empty caption)"))
        self.copy("dataset", "flip_augment", "general.flip_aug", bool)
        self.copy("dataset", "cache_latents", "cache_latents", bool)
        if self.typed("dataset", "cache_dir", str):
            self.row("dataset", "cache_dir", "", "unsupported", "anima-trainer's disk cache (cache_latents_to_disk) "
                     "lives in .anima_cache beside the images, keyed by content")
        elif self.get("dataset", "cache_dir")[1]:
            self.row("dataset", "cache_dir", "", "not needed", "empty = the default cache place")

    def network(self) -> None:
        kind = self.typed("lora", "network_type", str).strip().lower()
        if kind not in ("lora", "lokr"):
            raise ConversionError(f"lora.network_type: expected 'lora' or 'lokr', got {kind!r}")
        self.put("lora", "network_type", "network_module", "networks.lokr" if kind == "lokr" else "networks.lora_anima")
        self.copy("lora", "lora_rank", "network_dim", int)
        self.put("lora", "lora_alpha", "network_alpha", self.number("lora", "lora_alpha"))
        dropout = self.number("lora", "lora_dropout")
        if dropout:
            self.put("lora", "lora_dropout", "network_dropout", dropout)
        else:
            self.row("lora", "lora_dropout", "network_dropout unset (off)", "mapped")
        args: dict[str, str] = {}
        self._targets(args)
        lokr = {"lokr_factor": "factor", "lokr_full_matrix": "full_matrix", "lokr_decompose_both": "decompose_both",
                "lokr_rank_dropout": "rank_dropout", "lokr_module_dropout": "module_dropout"}
        for key, arg in lokr.items():
            if kind != "lokr":
                self.row("lora", key, "", "not needed", "only used by LoKr")
                continue
            v = self.typed("lora", key, (int, float, bool))
            if isinstance(v, float) and key.endswith("dropout") and not 0 <= v < 1:
                raise ConversionError(f"lora.{key}: must be in [0, 1), got {v}")
            if key.endswith("dropout") and not v:
                self.row("lora", key, f"network_args {arg} unset (off)", "mapped")
                continue
            args[arg] = str(v).lower() if isinstance(v, bool) else str(v)
            self.row("lora", key, f"network_args {arg}={args[arg]}", "mapped")
        for key, note in (("lokr_use_tucker", "Tucker factors only apply to convolutions; Anima trains Linears"),
                          ("lokr_constraint", "no weight-norm constraint in anima-trainer"),
                          ("lokr_normalize", "no weight normalisation in anima-trainer")):
            v, given = self.get("lora", key)
            if given:
                off = not v or kind != "lokr"
                self.row("lora", key, "", "not needed" if off or key == "lokr_use_tucker" else "unsupported",
                         "off" if not v else ("only used by LoKr" if kind != "lokr" else note))
        self.c.train["network_args"] = [f"{k}={v}" for k, v in args.items()]

    def _targets(self, args: dict[str, str]) -> None:
        parts = self.typed("training", "train_parts", str).strip().lower()
        if parts not in ("dit_only", "dit_llm_adapter", "dit_llm_adapter_qwen"):
            raise ConversionError(f"training.train_parts: expected dit_only, dit_llm_adapter or dit_llm_adapter_qwen, "
                                  f"got {parts!r}")
        adapter = parts != "dit_only"
        self.c.train["network_train_unet_only"] = True  # issue 15: the root trainer always keeps Qwen3 frozen
        if parts == "dit_llm_adapter_qwen":
            self.row("training", "train_parts", "network_args train_llm_adapter=true", "approximate",
                     "a full fine-tune of the LLM adapter is not supported: it gets adapters (LoRA/LoKr) instead; "
                     "Qwen3 stays frozen (network_train_unet_only = true)")
        else:
            self.row("training", "train_parts", f"network_args train_llm_adapter={str(adapter).lower()}", "mapped",
                     "dit_llm_adapter = adapters in the DiT blocks and the LLM adapter blocks; every mode keeps "
                     "Qwen3 frozen (network_train_unet_only = true)")
        targets = self.get("lora", "lora_targets")[0]
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ConversionError(f"lora.lora_targets: expected a comma-separated string or a list of strings, "
                                  f"got {targets!r}")
        preset = self.typed("lora", "anima_target_preset", str).strip().lower()
        if targets:
            args["exclude_patterns"] = repr([".*"])
            args["include_patterns"] = repr([target_regex(t) for t in targets])
            self.row("lora", "lora_targets", "network_args exclude_patterns=['.*'] + include_patterns", "mapped",
                     "each target → a full-match regex (leaf name, dotted suffix, wildcard, re:)")
            self.row("lora", "anima_target_preset", "", "not needed", "lora_targets wins over the preset")
        elif preset == "v101":
            self.row("lora", "anima_target_preset", "default targets", "mapped",
                     "v101 = attention q/k/v/output + MLP Linears of each block (kohya's defaults)")
            self.row("lora", "lora_targets", "", "not needed", "empty = the preset")
        elif preset in ("anima_block", "anima_block_llm"):
            args["train_adaln"] = "true"
            adapter = adapter and preset == "anima_block_llm"
            self.row("lora", "anima_target_preset", "network_args train_adaln=true", "mapped",
                     "every Linear of each block: the defaults plus the adaLN modulation Linears")
        else:
            raise ConversionError(f"lora.anima_target_preset: expected v101, anima_block or anima_block_llm, "
                                  f"got {preset!r}")
        args["train_llm_adapter"] = str(adapter).lower()

    def optimizer(self) -> None:
        kind = self.typed("optimizer", "type", str).strip()
        name = _OPTIMIZER_NAMES.get(kind.lower(), kind)
        self.put("optimizer", "type", "optimizer_type", name)
        known = kind.lower() in _OPTIMIZER_NAMES
        opt: list[str] = []
        for key in ("weight_decay", "eps"):
            v, given = self.get("optimizer", key)
            if known or given:
                opt.append(f"{key}={self.number('optimizer', key)!r}")
                self.row("optimizer", key, f"optimizer_args {opt[-1]}", "mapped")
        if known or self.get("optimizer", "beta1")[1] or self.get("optimizer", "beta2")[1]:
            opt.append(f"betas=({self.number('optimizer', 'beta1')!r},{self.number('optimizer', 'beta2')!r})")
            for key in ("beta1", "beta2"):
                self.row("optimizer", key, f"optimizer_args {opt[-1]}", "mapped")
        prodigy = {"prodigy_beta3": "beta3", "prodigy_d0": "d0", "prodigy_d_coef": "d_coef",
                   "prodigy_growth_rate": "growth_rate", "prodigy_slice_p": "slice_p", "prodigy_decouple": "decouple",
                   "prodigy_use_bias_correction": "use_bias_correction",
                   "prodigy_safeguard_warmup": "safeguard_warmup"}
        for key, arg in prodigy.items():
            if name != "Prodigy":
                if self.get("optimizer", key)[1]:
                    self.row("optimizer", key, "", "not needed", f"only used by prodigy (type is {kind!r})")
                continue
            v = self.typed("optimizer", key, (int, float, bool))
            if (arg == "beta3" and v <= 0) or (arg == "growth_rate" and v == INF):
                self.row("optimizer", key, f"Prodigy's default {arg}", "mapped",
                         "≤ 0 = Prodigy's default (√beta2)" if arg == "beta3" else "inf = no growth limit")
                continue
            opt.append(f"{arg}={v!r}")
            self.row("optimizer", key, f"optimizer_args {opt[-1]}", "mapped")
        self.c.train["optimizer_args"] = opt

    def training(self) -> None:
        self.copy("training", "batch_size", "train_batch_size", int)
        self.copy("training", "grad_accum", "gradient_accumulation_steps", int)
        self.put("training", "grad_clip", "max_grad_norm", self.number("training", "grad_clip"),
                 note="0 = no clipping, the root default (kohya clips at 1.0)")
        self.put("training", "learning_rate", "learning_rate", self.number("training", "learning_rate"))
        mp = self.typed("training", "mixed_precision", str)
        if mp not in ("fp32", "fp16", "bf16"):
            raise ConversionError(f"training.mixed_precision: expected fp32, fp16 or bf16, got {mp!r}")
        self.put("training", "mixed_precision", "mixed_precision", "no" if mp == "fp32" else mp)
        self.copy("training", "grad_checkpoint", "gradient_checkpointing", bool)
        self.copy("training", "num_workers", "max_data_loader_n_workers", int)
        self.copy("training", "seed", "seed", int)
        self.copy("training", "log_every", "log_every_n_steps", int)
        seq = self.typed("training", "seq_len", int)
        if seq == 512:
            self.row("training", "seq_len", "", "not needed", "the context is always 512 rows (ComfyUI's)")
        else:
            self.row("training", "seq_len", "", "approximate", f"the root trainer cut captions to {seq} tokens and "
                     f"padded the context to {seq} rows; anima-trainer uses ComfyUI's 512 rows and never truncates")
        if (v := self.number("training", "caption_tag_dropout_rate")) is not None:
            self.put("training", "caption_tag_dropout_rate", "general.caption_tag_dropout_rate", v)
        if (v := self.number("training", "noise_offset")) is not None:
            if v:
                self.put("training", "noise_offset", "noise_offset", v)
            else:
                self.row("training", "noise_offset", "", "not needed", "0 = off")
        if self.typed("training", "resume", str):
            self.row("training", "resume", "", "unsupported", "a root .state.pt cannot be resumed; start a new run "
                     "(network_weights = the saved LoRA continues from its weights)")
        elif self.get("training", "resume")[1]:
            self.row("training", "resume", "", "not needed", "empty = a new run")
        for key, note in (("persistent_data_loader_workers", "data workers always stay alive for the whole run"),
                          ("xformers", "attention always runs through torch SDPA (same math)"),
                          ("auto_install", "install extras with pip (`pip install anima-trainer[optimizers]`)"),
                          ("text_cache_size", "Qwen3 outputs are memoised per caption for the whole run"),
                          ("max_token_length", "captions are never truncated"),
                          ("interactive", "anima-trainer never prompts")):
            if self.get("training", key)[1]:
                self.row("training", key, "", "not needed", note)
        for target, value, note in (("timestep_sampling", "shift", "logit-normal t, then shifted"),
                                    ("sigmoid_scale", 1.0, "scale of the normal before the sigmoid"),
                                    ("discrete_flow_shift", 3.0, "t ← t·3 / (1 + 2t)")):
            self.c.train[target] = value
            self.c.rows.append(Row("(fixed in the root trainer)", value, f"{target} = {_show(value)}", "default", note))

    def schedule(self) -> None:
        sched = self.typed("training", "lr_scheduler", str)
        name = (sched or "constant").strip().lower()
        ratio = self.number("training", "lr_min_ratio")
        if name == "cosine" and ratio:
            name = "cosine_with_min_lr"
        warm_steps, warm_ratio = self.number("training", "lr_warmup_steps"), self.number("training", "lr_warmup_ratio")
        warmup: int | float = 0
        if warm_steps is not None:
            warmup = int(warm_steps)
            self.put("training", "lr_warmup_steps", "lr_warmup_steps", warmup)
            if warm_ratio is not None:
                self.row("training", "lr_warmup_ratio", "", "not needed", "lr_warmup_steps wins when both are set")
        elif warm_ratio is not None:
            if not 0 <= warm_ratio < 1:
                raise ConversionError(f"training.lr_warmup_ratio: must be a fraction in [0, 1), got {warm_ratio}")
            warmup = warm_ratio
            self.put("training", "lr_warmup_ratio", "lr_warmup_steps", warm_ratio, note="a fraction < 1 of all steps")
        if warmup and name == "constant":
            name = "constant_with_warmup"
        note = "the root trainer v1.02 has no schedule: constant" if sched is None else ""
        if sched is not None and name != sched.strip().lower():
            note = f"'{sched}' with {'lr_min_ratio' if ratio else 'a warm-up'} is {name}"
        self.c.train["lr_scheduler"] = name
        self.c.rows.append(Row("training.lr_scheduler" + ("" if sched is not None else " (absent)"),
                               sched if sched is not None else "constant", f"lr_scheduler = {name!r}",
                               "mapped" if sched is not None else "default", note))
        if ratio is not None:
            if name in ("cosine_with_min_lr", "warmup_stable_decay", "polynomial"):
                self.put("training", "lr_min_ratio", "lr_scheduler_min_lr_ratio", ratio)
            else:
                self.row("training", "lr_min_ratio", "", "not needed", f"not used by {name}")
        cycles = self.number("training", "lr_scheduler_num_cycles")
        if cycles is None:
            return
        if name == "cosine" and cycles == 0.5:
            self.row("training", "lr_scheduler_num_cycles", "", "not needed", "cosine is one descent in both")
        elif name in ("cosine", "cosine_with_min_lr", "warmup_stable_decay"):
            if name == "cosine":  # kohya's cosine is always one descent: the same curve with a floor of 0
                self.c.train["lr_scheduler"] = "cosine_with_min_lr"
            self.put("training", "lr_scheduler_num_cycles", "lr_scheduler_num_cycles", cycles * 2,
                     note=f"{cycles:g} cosine periods = kohya's {cycles * 2:g} (kohya halves it; 1 = one descent)")
        elif name == "cosine_with_restarts":
            self.put("training", "lr_scheduler_num_cycles", "lr_scheduler_num_cycles", cycles,
                     note="restarts in both")
        else:
            self.row("training", "lr_scheduler_num_cycles", "", "not needed", f"not used by {name}")

    def output(self) -> None:
        self.copy("output", "output_dir", "output_dir", str)
        lora_name = self.typed("lora", "lora_name", str).strip()
        if lora_name:
            self.put("lora", "lora_name", "output_name", lora_name, note="wins over output.output_name (root rule)")
            if self.get("output", "output_name")[1]:
                self.row("output", "output_name", "", "not needed", "lora.lora_name wins")
        else:
            self.copy("output", "output_name", "output_name", str)
        every = self.typed("output", "save_every", int)
        if every > 0:
            self.put("output", "save_every", "save_every_n_epochs", every, note="counts epochs in the root TOML")
        else:
            self.row("output", "save_every", "no intermediate saves", "mapped")
        self.put("output", "save_state", "save_state", self.typed("output", "save_state", bool),
                 note="a resumable state folder with every save and at the end")
        if self.typed("output", "save_state_every", int):
            self.row("output", "save_state_every", "", "unsupported", "states are written with each network save "
                     "(save_every) and at the end; there is no separate state cadence")
        if self.get("output", "comfyui_format")[1]:
            self.row("output", "comfyui_format", "", "not needed", "files always load in ComfyUI (save_format comfy)")

    def logging(self) -> None:
        self.copy("monitor", "memory", "monitor_memory", bool)
        policy = self.typed("monitor", "alert_policy", str)
        if policy not in ("warn", "raise"):
            raise ConversionError(f"monitor.alert_policy: expected warn or raise, got {policy!r}")
        self.put("monitor", "alert_policy", "monitor_alert_policy", policy)
        for key, note in (("enabled", "the monitor always runs; with alert_policy warn it only warns"),
                          ("every", "checks run on every optimizer step"),
                          ("wandb", "monitor scalars go to whichever tracker is on")):
            v, given = self.get("monitor", key)
            if given:
                self.row("monitor", key, "", "approximate" if key == "enabled" and not v else "not needed", note)
        enabled = self.typed("wandb", "enabled", bool)
        if not enabled:
            for key in ROOT_SCHEMA["wandb"]:
                if self.get("wandb", key)[1]:
                    self.row("wandb", key, "", "not needed", "wandb.enabled = false" if key != "enabled" else "")
            return
        self.put("wandb", "enabled", "log_with", "wandb")
        if project := self.typed("wandb", "project", str):
            self.put("wandb", "project", "log_tracker_name", project)
        if name := self.typed("wandb", "name", str):
            self.put("wandb", "name", "wandb_run_name", name)
        init: dict[str, Any] = {}
        for key in ("entity", "group", "tags", "mode"):
            v = self.get("wandb", key)[0]
            if key == "tags" and isinstance(v, str):
                v = [t.strip() for t in v.split(",") if t.strip()]
            if v and (key != "mode" or self.get("wandb", key)[1]):
                init[key] = v
                self.row("wandb", key, f"{TRACKER_NAME} [wandb] {key}", "mapped", "wandb.init argument")
        if init:
            self.c.tracker = {"wandb": init}
        if self.get("wandb", "log_every")[1]:
            self.row("wandb", "log_every", "", "not needed", "scalars go out every log_every_n_steps")

    def leftovers(self) -> None:
        """Rows for the progress table, unknown tables/keys, and any schema key no handler reported."""
        reported = {r.key.split(" ")[0] for r in self.c.rows}
        for table, section in self.data.items():
            if table not in ROOT_SCHEMA:
                self.c.rows.append(Row(table, section if not isinstance(section, dict) else "[table]", "", "unknown",
                                       "not part of the root schema; the root trainer ignored it too"))
                continue
            if not isinstance(section, dict):
                raise ConversionError(f"{table}: expected a table, got {section!r}")
            for key in section:
                if f"{table}.{key}" in reported:
                    continue
                if key not in ROOT_SCHEMA[table]:
                    status, note = "unknown", "not part of the root schema; the root trainer ignored it too"
                elif table == "progress":
                    status, note = "not needed", "console display of the root trainer"
                else:
                    status, note = "unsupported", "no anima-trainer equivalent"
                self.c.rows.append(Row(f"{table}.{key}", section[key], "", status, note))

    def steps(self, out_dir: Path) -> None:
        epochs, max_steps = self.typed("training", "epochs", int), self.typed("training", "max_steps", int)
        if epochs < 1:
            raise ConversionError(f"training.epochs: must be >= 1, got {epochs}")
        per_epoch, summary = self.updates_per_epoch(out_dir)
        self.c.rows.append(Row("(data)", "scanned", summary, "mapped", "with anima-trainer's buckets"))
        if max_steps <= 0:
            self.put("training", "epochs", "max_train_epochs", epochs)
            if self.get("training", "max_steps")[1]:
                self.row("training", "max_steps", "", "not needed", "0 = no step cap")
            return
        total = epochs * per_epoch
        if total <= max_steps:
            self.put("training", "epochs", "max_train_epochs", epochs,
                     note=f"{epochs} × {per_epoch} steps = {total} ≤ max_steps: the epochs end the run first")
            self.row("training", "max_steps", "", "not needed", f"the run ends after {total} steps, before {max_steps}")
        else:
            self.put("training", "max_steps", "max_train_steps", max_steps,
                     note=f"ends the run before {epochs} epoch(s) × {per_epoch} steps = {total}")
            self.row("training", "epochs", "", "not needed", f"max_steps ({max_steps}) ends the run first")

    def updates_per_epoch(self, out_dir: Path) -> tuple[int, str]:
        """Optimizer steps per epoch of the converted dataset (kohya's count: ceil(batches / accumulation))."""
        cfg = parse_dataset_config(self.dataset_doc(), source_dir=out_dir)
        ds = build_dataset(cfg, default_batch_size=self.c.train["train_batch_size"], seed=self.c.train["seed"])
        per_epoch = math.ceil(len(ds) / self.c.train["gradient_accumulation_steps"])
        return per_epoch, (f"{ds.num_images} images, {ds.num_train_items} per epoch with repeats, {len(ds)} "
                           f"batches = {per_epoch} optimizer steps per epoch")

    def dataset_doc(self) -> dict[str, Any]:
        return {"general": self.general, "datasets": [dict(self.ds)]}


def target_regex(target: str) -> str:
    """A root `lora_targets` entry as a full-match regex over dotted module paths, with the root trainer's rules:
    `re:<pattern>` searches, `*`/`?` wildcards match the whole path, a dotted name matches a path suffix at a dot
    boundary, a single name matches the last path component.  A leading `transformer.` is dropped."""
    import fnmatch
    import re

    t = target.strip().removeprefix("transformer.")
    if t.startswith("re:"):
        return f".*(?:{t[3:]}).*"
    if "*" in t or "?" in t:
        return fnmatch.translate(t)
    return r"(?:.*\.)?" + re.escape(t)


def convert_root_config(data: dict[str, Any], out_dir: str | Path = ".") -> Conversion:
    """Convert a parsed root-style TOML; `out_dir` is where dataset.toml will live (for relative paths)."""
    if not is_root_style(data):
        raise ConversionError("not a root-style Anima_Trainer config: none of its keys (model.transformer_path, "
                              "dataset.data_dir, lora.lora_rank, training.epochs, ...) is present")
    conv = _Converter(data)
    conv.model()
    conv.dataset()
    conv.network()
    conv.training()
    conv.schedule()
    conv.optimizer()
    conv.output()
    conv.logging()
    conv.steps(Path(out_dir))
    conv.leftovers()
    conv.c.dataset = conv.dataset_doc()
    return conv.c
