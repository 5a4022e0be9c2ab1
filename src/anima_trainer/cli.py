"""`anima-trainer <command>`: thin argument parsing that hands off to one stage.

Commands: `train` (kohya flags / `--config_file`), `cache` (same flags; build disk caches), `inspect FILE...`
(what a file is; network files get a full report, `--analysis` the weight analysis), `convert-network` (ComfyUI ↔
kohya names), `merge` (bake networks into a DiT checkpoint; `--average`: a checkpoint soup of networks), `demo`
(tiny built-in model: train a LoRA, sample before/after), `sample` (text → PNG with the flow Euler sampler),
`eval` (measure saved networks against the base: held-out loss, drift, trigger response, weight analysis, image
grids, report.html), `extract` (a fine-tuned DiT → a LoRA: truncated SVD per module, error per module),
`convert-config` (root-style Anima_Trainer TOML → kohya pair), `config-reference` (every training setting as
markdown), `download` (the models and tokenizers, verified).
Model flags use kohya's names (`--pretrained_model_name_or_path`, `--qwen3`, `--vae`, `--llm_adapter_path`).

Errors: a user's mistake (a bad setting, a missing or wrong file) prints one `error:` line and exits 2; any other
failure prints one line naming the exception and exits 1; Ctrl-C or SIGTERM outside the training loop exits 130.
`--debug` (anywhere on the command line) or `--log_level DEBUG` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anima_trainer import __version__, console

# torch is imported by the commands, not here: `--help`, `--version` and a Ctrl-C during start-up stay fast and
# inside main()'s error handling
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # anima_trainer.dtypes.PRECISIONS (which imports torch)


def _dtype(name: str) -> Any:
    from anima_trainer.dtypes import PRECISION_DTYPES

    return PRECISION_DTYPES[name]


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The model flags of `sample` and `eval` (`required=False`: eval defaults them from a run's settings)."""
    g = p.add_argument_group("models (ComfyUI single files as distributed, or one diffusers-layout Anima folder)"
                             + ("" if required else "; default: the run's settings"))
    g.add_argument("--pretrained_model_name_or_path", "--dit", dest="dit", required=required,
                   help="Anima DiT .safetensors (e.g. anima-base-v1.0.safetensors) or diffusers-layout folder")
    g.add_argument("--qwen3", required=required,
                   help="Qwen3-0.6B .safetensors, Hugging Face folder or diffusers-layout folder")
    g.add_argument("--vae", required=required, help="Qwen-Image VAE .safetensors or diffusers-layout folder")
    g.add_argument("--llm_adapter_path", default=None,
                   help="separate LLM-adapter file or text_conditioner/ folder (if the DiT has none)")
    # the config's names; --qwen3_tokenizer / --t5_tokenizer are their old spellings, still accepted
    g.add_argument("--qwen3_tokenizer_path", "--qwen3_tokenizer", default=None,
                   help="folder with the Qwen tokenizer (vocab.json, merges.txt)")
    g.add_argument("--t5_tokenizer_path", "--t5_tokenizer", default=None,
                   help="folder with the T5 tokenizer (tokenizer.json)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weight/compute dtype (default bf16 on GPU, fp32 on CPU)")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it says its default already or has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or action.required or d is None or d is False or d == [] or d is argparse.SUPPRESS:
            return text
        return f"{text} (default: {'empty' if d == '' else '%(default)s'})"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anima-trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"anima-trainer {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also accepted after the command)")
    parser.add_argument("--log_level", choices=console.LEVELS, default=None, type=str.upper,
                        help=f"console log level (default: ${console.LEVEL_ENV} or INFO; DEBUG also shows "
                        "tracebacks and the HTTP libraries' request lines)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train a LoRA (kohya flags; `anima-trainer train --help`)", add_help=False)
    sub.add_parser("cache", help="build the latent and text caches on disk (same flags as train; "
                   "`anima-trainer cache --help`)", add_help=False)

    p = sub.add_parser("inspect", help="print what a model/network file is (kind, inferred config, dtype, params)",
                       description="Model files: a JSON summary.  Network files: algorithms, ranks/alphas, targets, "
                       "per-module delta norms, NaN/Inf, unknown and duplicate keys (text, or JSON with --json); "
                       "exit 1 when a network file is broken.  --analysis adds the weight analysis "
                       "(docs/evaluation.md): the update's Frobenius norm, effective rank and top singular-value "
                       "energy per module, and its share per block type and per block.")
    p.add_argument("files", nargs="+", metavar="FILE", help=".safetensors files (models or networks)")
    p.add_argument("--json", action="store_true", help="network files: print the report as JSON")
    p.add_argument("--analysis", action="store_true", help="network files: add the weight analysis (energy of the "
                   "update per block type and per block, effective ranks, the largest modules); other files are an "
                   "error")
    p.add_argument("--top", type=int, default=10, metavar="N", help="with --analysis: list the N largest modules "
                   "(default 10)")
    p.add_argument("--dit", default=None, help="network files: take module names/shapes from this DiT's header "
                   "(default: the 28-block 2B layout)")
    p.add_argument("--qwen3", default=None, help="network files with text-encoder modules: take their names from "
                   "this Qwen3's header (default: Qwen3-0.6B)")

    p = sub.add_parser("convert-network", help="rename an adapter file between ComfyUI, kohya and diffusers names",
                       description="ComfyUI names: diffusion_model.<module path>.<suffix> (text encoder: "
                       "text_encoders.qwen3_06b.transformer.model.<path>.<suffix>); kohya names: "
                       "lora_unet_<module_path>.<suffix> (text encoder: lora_te_<path>.<suffix>) (both lossless); "
                       "diffusers: the layout diffusers' Anima loader reads (transformer./text_conditioner. "
                       "lora_A/lora_B, alpha/rank folded into lora_B; LoRA on the DiT and LLM adapter only).  "
                       "PEFT/diffusers inputs (lora_A/lora_B, transformer., text_conditioner., base_model.model., "
                       "Cosmos transformer_blocks.N..., text_encoder.<path>) are read too.  See docs/formats.md.")
    p.add_argument("input", help="adapter .safetensors (ComfyUI, kohya, PEFT or diffusers names)")
    p.add_argument("output", help="where to write the renamed file")
    p.add_argument("--to", choices=("comfy", "kohya", "diffusers"), required=True, help="the naming to write")
    p.add_argument("--dit", default=None, help="read the model layout from this DiT checkpoint's header "
                   "(default: the 28-block 2B layout)")
    p.add_argument("--qwen3", default=None, help="text-encoder keys: read the Qwen3 layout from this file's "
                   "header (default: Qwen3-0.6B)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    p = sub.add_parser("merge", help="bake LoRA/LoKr/LoHa files into a DiT checkpoint (ComfyUI's math), and "
                       "their text-encoder modules into a Qwen3 file with --qwen3/--qwen3-out; or average networks "
                       "of one structure into one network file (--average A B ... --out OUT)",
                       description="Bake: --dit BASE --network FILE[:MUL]... --out OUT (and/or --qwen3 BASE "
                       "--qwen3-out OUT).  Checkpoint soup: --average A B ... --out OUT [--weights WA WB ...] writes "
                       "the tensor-wise mean of the networks' factors as a network file (docs/evaluation.md).")
    p.add_argument("--dit", default=None, help="base DiT .safetensors (its key layout and dtype are kept)")
    p.add_argument("--network", action="append", default=None, metavar="FILE[:MUL]",
                   help="network file with optional strength (default 1.0); repeatable, applied in order")
    p.add_argument("--average", nargs="+", default=None, metavar="FILE",
                   help="checkpoint soup: network files of one structure (same keys, ranks, alphas, algorithm), "
                   "averaged tensor by tensor into the network file --out")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="with --average: one weight per file (normalised to sum 1; default equal)")
    p.add_argument("--out", default=None, help="merged DiT .safetensors (with --dit); the averaged network "
                   "(with --average)")
    p.add_argument("--qwen3", default=None, help="base Qwen3 text encoder (single file or bundle) to bake the "
                   "networks' text-encoder modules into (its key layout and dtypes are kept)")
    p.add_argument("--qwen3-out", "--qwen3_out", dest="qwen3_out", default=None,
                   help="merged Qwen3 .safetensors (with --qwen3)")
    p.add_argument("--save_precision", choices=DTYPE_NAMES, default=None,
                   help="dtype of the merged weights (DiT, and Qwen3 with --qwen3; default: as in the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --qwen3-out) if it exists")

    p = sub.add_parser("convert-config", help="root-style Anima_Trainer TOML → kohya train.toml + dataset.toml",
                       description="Maps every key of the root schema (docs/migration.md), prints what went where "
                       "and what has no equivalent, and writes that table as train.toml's comment header.")
    p.add_argument("input", nargs="?", help="the root-style TOML ([model] transformer_path, [dataset] data_dir, ...)")
    # sd-scripts-anima's converter flags (tools/convert_anima_root_to_kohya.py) are accepted as they are
    p.add_argument("--input", dest="input_flag", metavar="INPUT", help="the same as INPUT (sd-scripts-anima's name)")
    p.add_argument("--out", "--output_dir", dest="out", default=None,
                   help="folder for the two files (default: <input folder>/kohya_converted, as sd-scripts-anima)")
    p.add_argument("--train_args_name", default="train.toml", help="file name of the train args (default: %(default)s)")
    p.add_argument("--dataset_name", default="dataset.toml", help="file name of the dataset (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")

    sub.add_parser("config-reference", help="print docs/config_reference.md (every training setting) to stdout")

    p = sub.add_parser("demo", help="tiny built-in Anima + synthetic dataset: train a LoRA on CPU, sample before/after",
                       formatter_class=_DefaultsFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, the images and the training")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo run")

    p = sub.add_parser("sample", help="generate one image with the flow Euler sampler (ComfyUI's shift-3 schedule)",
                       description="Text → one PNG (its settings are stored in the PNG's `parameters` text).",
                       formatter_class=_DefaultsFormatter)
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to draw (Anima's tag / natural-language prompts)")
    p.add_argument("--negative_prompt", default="", help="what to steer away from (used when --cfg > 1)")
    p.add_argument("--steps", type=int, default=30, help="sampler steps")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = no guidance)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (a multiple of 16)")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (a multiple of 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (same seed and settings → same image)")
    p.add_argument("--shift", type=float, default=3.0, help="flow shift of the sigma schedule (ComfyUI's 3.0)")
    p.add_argument("--network", action="append", default=[], metavar="FILE",
                   help="LoRA/LoKr/LoHa file applied with ComfyUI's rules (repeatable)")
    p.add_argument("--network_mul", action="append", type=float, default=[], metavar="M",
                   help="strength per --network, in order (missing ones: 1.0)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")

    from anima_trainer.eval_command import add_eval_parser
    from anima_trainer.tools.download.command import add_download_parser
    from anima_trainer.tools.extract_command import add_extract_parser

    add_eval_parser(sub, _add_model_args)
    add_extract_parser(sub)
    add_download_parser(sub)
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    from anima_trainer.models.model_files import ModelFileError, _network_types, inspect_file, read_header
    from anima_trainer.networks import NetworkError
    from anima_trainer.networks.analysis import analyse_network_file
    from anima_trainer.networks.convert import build_meta_dit, build_meta_qwen3
    from anima_trainer.tools.inspect import format_analysis, format_report, inspect_network

    status = 0
    meta_dit = meta_te = None
    for f in args.files:
        try:
            info = inspect_file(f)
            if info.kind == "unknown" and Path(f).is_file() and _network_types(list(read_header(f)[0])):
                info.kind = "network"  # adapter suffixes on names ComfyUI does not know: report why
            if info.kind != "network":
                if args.analysis:
                    raise NetworkError(f"{f}: not a network file (it reads as {info.kind!r}); --analysis reads "
                                       "adapter files (LoRA, LoKr, LoHa, norm diffs)")
                print(json.dumps(info.summary(), indent=2))
                continue
            meta_dit = meta_dit or build_meta_dit(args.dit)
            meta_te = meta_te or (build_meta_qwen3(args.qwen3) if args.qwen3 else None)
            report = inspect_network(f, meta_dit, check_shapes=args.dit is not None, text_encoder=meta_te)
            report = {**info.summary(), **report}
            analysis = None
            if args.analysis and report["broken"]:
                print(f"error: {f}: not analysed, the file is broken ({'; '.join(report['broken'])})",
                      file=sys.stderr)
            elif args.analysis:
                analysis = analyse_network_file(f, meta_dit, meta_te)
                if args.json:
                    report["analysis"] = analysis.to_dict()
            print(json.dumps(report, indent=2) if args.json else format_report(report))
            if analysis is not None and not args.json:
                print(format_analysis(analysis, top=args.top))
            if report["broken"]:
                status = max(status, 1)
        except (ModelFileError, NetworkError) as e:
            print(f"error: {e}" if str(f) in str(e) else f"error: {f}: {e}", file=sys.stderr)  # name the file
            status = 2
    return status


def cmd_convert_network(args: argparse.Namespace) -> int:
    from anima_trainer.networks.convert import build_meta_dit
    from anima_trainer.tools.convert import convert_network

    from anima_trainer.networks.convert import build_meta_qwen3

    result = convert_network(args.input, args.output, args.to, dit=build_meta_dit(args.dit),
                             text_encoder=build_meta_qwen3(args.qwen3) if args.qwen3 else None,
                             overwrite=args.overwrite)
    print(f"{result['written']}: {result['keys']} tensors with {args.to} names")
    if result["comfy_skips"]:
        print(f"note: {len(result['comfy_skips'])} text-encoder key(s) use kohya's lora_te_* names, which ComfyUI "
              "does not load for Anima (it loads the DiT part only); convert with --to comfy for ComfyUI",
              file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from anima_trainer.tools.merge_command import cmd_merge as run

    return run(args)


def cmd_sample(args: argparse.Namespace) -> int:
    from anima_trainer.fileio import check_writable
    from anima_trainer.models import load_dit, load_text_encoder, load_vae
    from anima_trainer.models.model_files import expect_kind
    from anima_trainer.networks import apply_network_file, apply_text_encoder_file, comfy_skipped_keys
    from anima_trainer.networks.convert import comfy_named_file
    from anima_trainer.sample.generate import SampleParams, generate_image, save_png

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    params = SampleParams(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg,
                          width=args.width, height=args.height, seed=args.seed, shift=args.shift,
                          models={"dit": Path(args.dit).name, "qwen3": Path(args.qwen3).name,
                                  "vae": Path(args.vae).name})
    if len(args.network_mul) > len(args.network):
        raise ValueError("more --network_mul values than --network files")
    muls = args.network_mul + [1.0] * (len(args.network) - len(args.network_mul))
    params.networks = {Path(f).name: m for f, m in zip(args.network, muls, strict=True)}
    params.validate()
    check_writable(args.out, args.overwrite)  # fail before minutes of loading, not after
    for f in args.network:
        expect_kind(f, "--network", ("network",))
    dit = load_dit(args.dit, dtype=dtype, device=device, llm_adapter_path=args.llm_adapter_path)
    te = load_text_encoder(args.qwen3, qwen3_tokenizer_path=args.qwen3_tokenizer_path,
                           t5_tokenizer_path=args.t5_tokenizer_path, dtype=dtype, device=device)
    for f, m in zip(args.network, muls, strict=True):
        with comfy_named_file(f, dit) as comfy:  # a file in diffusers' layout: read under ComfyUI names
            report = apply_network_file(dit, comfy, multiplier=m)
            te_report = apply_text_encoder_file(te.model, comfy, multiplier=m)  # its text-encoder modules
        not_loaded = sorted(set(report["not_loaded"]) & set(te_report["not_loaded"]))
        if not_loaded:
            print(f"warning: {f}: {len(not_loaded)} keys ComfyUI would not load either: {not_loaded[:5]}",
                  file=sys.stderr)
        skipped = comfy_skipped_keys(set(report["not_loaded"]) - set(te_report["not_loaded"]))
        if skipped:
            print(f"note: {f}: its text-encoder modules use kohya's lora_te_* names: applied here, but ComfyUI "
                  "skips them (convert-network --to comfy)", file=sys.stderr)
    vae = load_vae(args.vae, dtype=dtype, device=device)
    image = generate_image(dit, te, vae, params, progress=not args.no_progress)
    print(save_png(image, params, args.out, overwrite=args.overwrite))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from anima_trainer.demo import run_demo

    paths = run_demo(args.out, steps=args.steps, seed=args.seed, overwrite=args.overwrite)
    width = max(map(len, paths))
    for name, path in paths.items():
        print(f"{name:>{width}}: {path}")
    return 0


def cmd_convert_config(args: argparse.Namespace) -> int:
    from anima_trainer.compat.convert_files import run_convert_config
    from anima_trainer.config.errors import ConfigError
    from anima_trainer.train.optim import check_optimization

    if (args.input is None) == (args.input_flag is None):
        raise ConfigError("convert-config: give the root-style TOML once, as INPUT or as --input INPUT")
    source = Path(args.input if args.input is not None else args.input_flag).expanduser()
    out = args.out if args.out is not None else source.parent / "kohya_converted"
    return run_convert_config(source, out, overwrite=args.overwrite, train_name=args.train_args_name,
                              dataset_name=args.dataset_name, check=check_optimization)


def cmd_config_reference(args: argparse.Namespace) -> int:
    from anima_trainer.compat.reference import render_reference

    sys.stdout.write(render_reference())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from anima_trainer.eval_command import cmd_eval as run

    return run(args)


def cmd_extract(args: argparse.Namespace) -> int:
    from anima_trainer.tools.extract_command import cmd_extract as run

    return run(args)


def cmd_download(args: argparse.Namespace) -> int:
    from anima_trainer.tools.download.command import cmd_download as run

    return run(args)


COMMANDS = {"download": cmd_download, "inspect": cmd_inspect, "demo": cmd_demo, "sample": cmd_sample,
            "convert-network": cmd_convert_network, "merge": cmd_merge, "convert-config": cmd_convert_config,
            "config-reference": cmd_config_reference, "eval": cmd_eval, "extract": cmd_extract}


def cmd_train(argv: list[str]) -> int:
    """`train` has kohya's own flag set (and `--config_file`), parsed by the config package."""
    from anima_trainer.config import parse_train_args
    from anima_trainer.train.loop import TrainingInterrupted, train
    from anima_trainer.train.monitor import MonitorAlertError
    from anima_trainer.train.optim import check_optimization

    cfg = parse_train_args(argv, check=check_optimization)  # check: before --output_config writes a file
    console.apply_training_settings(cfg.console_log_level, simple=cfg.console_log_simple,
                                    log_file=cfg.console_log_file)
    for line in cfg.notices:  # one per option accepted without effect (also written to the run's events)
        print(f"notice: {line}", file=sys.stderr)
    try:
        print(train(cfg))
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    except MonitorAlertError as e:  # NaN/Inf or an alert with policy raise: say where good weights are
        state = getattr(e, "last_good_state", None)
        hint = (f"; the last good state is {state}: resume from it (--resume {state}) with a lower learning rate"
                if state else "; no state was saved before it (save_state = true keeps resumable states)")
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    return 0


def cmd_cache(argv: list[str]) -> int:
    """`cache` takes the same flags/TOML as `train` and builds every cache on disk, then stops.  The start of the
    run is train's own (train/setup.py `setup_run`: seed, tokenizers, dataset), so `train` reuses every entry."""
    import torch

    from anima_trainer.config import parse_train_args
    from anima_trainer.train.inputs import prepare_caches
    from anima_trainer.train.model_setup import WEIGHT_DTYPES, load_models
    from anima_trainer.train.optim import check_optimization
    from anima_trainer.train.setup import setup_run

    cfg = parse_train_args(argv, prog="anima-trainer cache", description=CACHE_DESCRIPTION, check=check_optimization)
    console.apply_training_settings(cfg.console_log_level, simple=cfg.console_log_simple,
                                    log_file=cfg.console_log_file)
    for line in cfg.notices:  # one per option accepted without effect (also written to the run's events)
        print(f"notice: {line}", file=sys.stderr)
    if cfg.trains_text_encoder:  # issue 15: the text cache is still built, for a DiT-only run of the same data
        print("notice: this config trains a text-encoder LoRA (kohya's default), so its training reads no text "
              "cache; the text cache is built for runs with network_train_unet_only = true and "
              "cache_text_encoder_outputs(_to_disk)", file=sys.stderr)
    setup = setup_run(cfg, command="cache")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(setup.cfg, device, WEIGHT_DTYPES[setup.cfg.mixed_precision])
    prepare_caches(setup.cfg, setup.dataset, models, None, force_disk=True)
    return 0


CACHE_DESCRIPTION = ("Build the latent and text-encoder caches on disk and stop.  Takes the same options and "
                     "--config_file TOML as `anima-trainer train` (only the model, dataset and cache settings matter).")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the user's input is wrong" (settings, files, downloads): one line, exit 2."""
    from anima_trainer.tools.download.errors import DownloadError

    return (ValueError, OSError, DownloadError, RecursionError)


def _take_global_options(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """Remove `--debug` (anywhere: users append it to a failed command line) and a `--log_level X` given before
    the command; returns (the rest, debug, level)."""
    debug = "--debug" in argv
    rest = [a for a in argv if a != "--debug"]
    level = None
    while rest[:1] and rest[0].startswith("--log_level"):
        name, eq, value = rest[0].partition("=")
        if name != "--log_level":
            break
        if eq:
            level, rest = value, rest[1:]
        elif len(rest) > 1:
            level, rest = rest[1], rest[2:]
        else:
            raise ValueError("--log_level: expected one of " + ", ".join(console.LEVELS))
    return rest, debug, level


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, `docker stop`, a scheduler) takes the Ctrl-C path: clean-ups run, one line, exit 130.
    The training loop installs its own handlers (stop after the step, save a state) while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        return cmd_train(argv[1:])
    if argv[:1] == ["cache"]:
        return cmd_cache(argv[1:])
    args = _build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


def _interrupted(e: BaseException) -> bool:
    loop = sys.modules.get("anima_trainer.train.loop")  # only loaded (with torch) when a command trained
    return loop is not None and isinstance(e, loop.TrainingInterrupted)


def report_error(e: BaseException, *, user: bool) -> None:
    """The one line a failed command prints (after the traceback when debugging)."""
    import traceback

    console.close_bars()
    if console.debugging():
        traceback.print_exception(e, file=sys.stderr)
    if user:
        print(f"error: {console.describe_error(e)}", file=sys.stderr)
    else:
        print(f"error: unexpected {type(e).__name__}: {e} (this is a bug in anima-trainer or a library; run with "
              "--debug for the traceback and report it)", file=sys.stderr)


def run_kohya_script(argv: list[str], *, prog: str, description: str, extra: tuple[str, ...] = ()) -> int:
    """The root drop-in scripts (anima_train_network.py, anima_train.py): `--help` (train's options, then what
    compat/dropin.py translates), else kohya's command line translated (notices on stderr, prefixed with the
    script's name), `extra` appended (anima_train.py: the fine-tune mode) and `train` run on the result."""
    from anima_trainer.compat.dropin import help_epilog, translate_kohya_argv
    from anima_trainer.config import parse_train_args

    if "-h" in argv or "--help" in argv:  # exits 0 after printing (SystemExit, handled by `guarded`)
        parse_train_args(["--help"], prog=prog, description=description, epilog=help_epilog("finetune" in extra))
    args, notices = translate_kohya_argv(argv, finetune="finetune" in extra)
    for line in notices:
        print(f"{prog.removesuffix('.py')}: {line}", file=sys.stderr)
    return cmd_train([*args, *extra])


def guarded(body: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command body the way every entry point does: global options taken out (`--debug`, `--log_level`),
    the console set up, SIGTERM treated as Ctrl-C, and every exception turned into one line and an exit status:
    0 done, 1 unexpected failure (or a monitor stop), 2 a user error (naming the key or file), 130 interrupted."""
    try:
        with _sigterm_as_ctrl_c():
            try:
                argv, debug, level = _take_global_options(argv)
                console.setup("DEBUG" if debug else level)
                return body(argv)
            except SystemExit as e:  # argparse: --help / --version (0) and usage errors (2, already printed)
                if isinstance(e.code, str):  # sys.exit("message")
                    print(f"error: {e.code}", file=sys.stderr)
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            except KeyboardInterrupt as e:
                console.close_bars()
                why = f" ({e})" if str(e) else ""
                print(f"interrupted{why}: stopped; files already written are complete (every write is atomic)",
                      file=sys.stderr)
                return 130
            except _user_errors() as e:
                report_error(e, user=True)
                return 2
            except Exception as e:  # noqa: BLE001 - never a bare traceback for the user
                if _interrupted(e):  # the loop stopped on Ctrl-C / SIGTERM after saving (e.g. under `demo`)
                    console.close_bars()
                    print(f"stopped: {e}", file=sys.stderr)
                    return 130
                report_error(e, user=False)
                return 1
    except KeyboardInterrupt:  # a second signal while the first was being reported
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `anima-trainer` script (exit statuses: `guarded`)."""
    return guarded(_dispatch, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
