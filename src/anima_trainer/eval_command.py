"""`anima-trainer eval`: measure saved networks against their base model (evaluation/evaluate.py) and write
`<out>/results.json`, the image grids and `<out>/report.html`.

The command resolves every default first (the run's settings, the trigger, the output folder) and prints the
command line that repeats the evaluation with all of them explicit; then progress; then one row per checkpoint
(held-out loss, preservation drift, trigger response and leak score at strength 1), the results path, the
report's recommendation and the report's path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Measure LoRA/LoKr/LoHa files against their base model, reproducibly (docs/evaluation.md):
  * held-out flow loss per σ (the run's validation split, or --heldout_images FOLDER) vs the base;
  * preservation drift (how far prompts without the trigger move), trigger response (the same prompts with
    the trigger) and their ratio, the leak score, at each --strengths value;
  * the weight analysis of each network (as `inspect --analysis`);
  * image grids (ComfyUI's shift-3 schedule): checkpoints × strengths per prompt, prompts × checkpoints;
  * report.html: one self-contained page with all of it and a recommended checkpoint and strength range.
PATH: network files, or a run's output folder (every network the run saved, EMA files flagged; the run's
settings give the models, its sample and eval prompts, trigger and validation split, so `anima-trainer eval
OUTPUT_DIR` alone works).  Results go to OUT/results.json and OUT/report.html; the first line printed is the
command that repeats it."""


def add_eval_parser(sub, model_args) -> None:  # sub: argparse's private subparsers type
    """Register `eval`; `model_args(parser, required=False)` adds `sample`'s model flags."""
    from anima_trainer.evaluation.drift import PROBE_LATENT_SIZE
    from anima_trainer.evaluation.evaluate import DEFAULT_GRID_PROMPTS, DEFAULT_STRENGTHS
    from anima_trainer.evaluation.recommend import DEFAULT_DRIFT_THRESHOLD
    from anima_trainer.evaluation.probe import PROBE_SEEDS

    p = sub.add_parser("eval", help="measure networks against the base: held-out loss, preservation drift, "
                       "trigger response, leak score, weight analysis → results.json",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="network .safetensors files or a run's output folder")
    p.add_argument("--out", default=None, metavar="OUT",
                   help="results folder (default: PATH/eval for a run folder, else eval/ next to the first file)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier evaluation in OUT")
    model_args(p, required=False)
    g = p.add_argument_group("run settings")
    g.add_argument("--run_config", default=None, metavar="FILE", help="the run's settings: its train_config.toml "
                   "or .events.jsonl (default: the run folder's); they give the models, the sample prompts and "
                   "the validation split")
    g = p.add_argument_group("prompts and trigger")
    g.add_argument("--sample_prompts", default=None, metavar="FILE",
                   help="kohya prompt file drawn first in the grids (default: the run's sample_prompts)")
    g.add_argument("--prompts", default=None, metavar="FILE", help="the probe prompts of drift and response "
                   "(kohya prompt syntax; default: the run's eval_prompts, else the built-in bank of 16 prompts)")
    g.add_argument("--trigger", default=None, metavar="WORD", help="the trigger word (default: the run's "
                   "eval_trigger / metadata_trigger_phrase, else the networks' modelspec.trigger_phrase when they "
                   "agree; none: drift only)")
    g.add_argument("--no_trigger", action="store_true", help="measure drift only, whatever the metadata says")
    g.add_argument("--seeds", nargs="+", type=int, default=list(PROBE_SEEDS), metavar="SEED",
                   help=f"noise seeds per prompt (default: {' '.join(map(str, PROBE_SEEDS))})")
    g.add_argument("--strengths", nargs="+", type=float, default=list(DEFAULT_STRENGTHS), metavar="S",
                   help=f"network multipliers (default: {' '.join(f'{s:g}' for s in DEFAULT_STRENGTHS)})")
    g.add_argument("--probe_resolution", type=int, default=PROBE_LATENT_SIZE[0] * 8, metavar="PX",
                   help=f"size of the square drift/response probe in pixels (default: {PROBE_LATENT_SIZE[0] * 8})")
    g.add_argument("--probe_batch_size", type=int, default=8, metavar="N", help="probes per DiT forward (default: 8)")
    g = p.add_argument_group("held-out loss")
    g.add_argument("--heldout_images", default=None, metavar="FOLDER",
                   help="images + caption files to measure on (default: the run's validation split)")
    g.add_argument("--no_heldout", action="store_true", help="no held-out loss")
    g.add_argument("--heldout_resolution", type=int, default=1024, metavar="PX",
                   help="--heldout_images: bucket resolution (default: 1024)")
    g.add_argument("--heldout_batch_size", type=int, default=1, metavar="N",
                   help="--heldout_images: batch size (default: 1)")
    g.add_argument("--caption_extension", default=".txt", metavar="EXT",
                   help="--heldout_images: caption files (default: .txt)")
    g.add_argument("--heldout_seed", type=int, default=0, metavar="SEED",
                   help="--heldout_images: seed of the fixed noise (default: 0)")
    g.add_argument("--loss_type", choices=("l1", "l2", "huber", "smooth_l1"), default="l2",
                   help="--heldout_images: the loss (default: l2; a run's validation uses the run's)")
    g.add_argument("--huber_c", type=float, default=0.1, metavar="C", help="--heldout_images: huber_c (default: 0.1)")
    p.add_argument("--no_analysis", action="store_true", help="skip the weight analysis")
    g = p.add_argument_group("image grids and report")
    g.add_argument("--grid_prompts", type=int, default=DEFAULT_GRID_PROMPTS, metavar="N",
                   help="prompts drawn in the grids: the sample prompts, then the probe prompts with and without "
                   f"the trigger; 0: no grids (default: {DEFAULT_GRID_PROMPTS})")
    g.add_argument("--grid_size", type=int, default=None, metavar="PX",
                   help="draw every grid image PX square (default: each prompt's own size, 512 for the bank)")
    g.add_argument("--grid_steps", type=int, default=None, metavar="N",
                   help="sampler steps of every grid image (default: each prompt's own, 30 for the bank)")
    g.add_argument("--drift_threshold", type=float, default=DEFAULT_DRIFT_THRESHOLD, metavar="D",
                   help="the report's recommended strengths keep preservation drift at or under D "
                   f"(default: {DEFAULT_DRIFT_THRESHOLD:g}, about a 10%% change of the velocity)")


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def spec_from_args(args: argparse.Namespace):
    """The EvalSpec the command line asks for (defaults still open: `plan_evaluation` fills them in)."""
    from anima_trainer.evaluation.evaluate import EvalSpec

    if args.trigger is not None and args.no_trigger:
        raise ValueError("--trigger and --no_trigger: give one of them")
    if args.heldout_images is not None and args.no_heldout:
        raise ValueError("--heldout_images and --no_heldout: give one of them")
    return EvalSpec(
        inputs=[Path(p) for p in args.paths], out=_path(args.out), dit=_path(args.dit), qwen3=_path(args.qwen3),
        vae=_path(args.vae), llm_adapter_path=_path(args.llm_adapter_path),
        qwen3_tokenizer_path=_path(args.qwen3_tokenizer_path), t5_tokenizer_path=_path(args.t5_tokenizer_path),
        run_config=_path(args.run_config), sample_prompts=_path(args.sample_prompts), prompt_file=_path(args.prompts),
        trigger=args.trigger, use_trigger=not args.no_trigger,
        seeds=tuple(args.seeds), strengths=tuple(args.strengths), probe_resolution=args.probe_resolution,
        probe_batch_size=args.probe_batch_size, heldout_images=_path(args.heldout_images),
        use_heldout=not args.no_heldout, heldout_resolution=args.heldout_resolution,
        heldout_batch_size=args.heldout_batch_size, caption_extension=args.caption_extension,
        heldout_seed=args.heldout_seed, loss_type=args.loss_type, huber_c=args.huber_c, device=args.device,
        dtype=args.dtype, analysis=not args.no_analysis, grid_prompts=args.grid_prompts, grid_size=args.grid_size,
        grid_steps=args.grid_steps, drift_threshold=args.drift_threshold, overwrite=args.overwrite)


def result_table(results) -> list[str]:
    """One row per checkpoint: step, epoch, EMA, held-out loss (and the base's first), drift, response and leak
    score at strength 1 ("—": not measured or undefined), 4 significant digits."""
    from anima_trainer.evaluation.recommend import fmt, overall

    def shown(metric) -> str:
        return fmt(overall(metric), 4)

    head = ("checkpoint", "step", "epoch", "ema", "heldout", "drift", "response", "leak")
    rows = []
    if results.base_heldout is not None:
        rows.append(("(base)", "", "", "", shown(results.base_heldout), "0", "0", "—"))
    for c in results.checkpoints:
        at_one = c.at_strength(1.0)
        rows.append((c.label, "" if c.step is None else str(c.step), "" if c.epoch is None else str(c.epoch),
                     "yes" if c.ema else "", shown(c.heldout_loss),
                     shown(at_one and at_one.preservation_drift), shown(at_one and at_one.trigger_response),
                     shown(at_one and at_one.leak_score)))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                      enumerate(zip(row, widths, strict=True))).rstrip() for row in (head, *rows)]


def cmd_eval(args: argparse.Namespace) -> int:
    from anima_trainer.evaluation.evaluate import evaluate, plan_evaluation, write_outputs
    from anima_trainer.evaluation.recommend import recommend
    from anima_trainer.tools.download.startup import with_tokenizer_dirs

    # a run's unset tokenizer folders: the cache folders training read them from (named, not downloaded)
    plan = plan_evaluation(spec_from_args(args), complete_config=with_tokenizer_dirs)
    print(plan.spec.command, flush=True)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)

    def progress(line: str) -> None:
        print(line, flush=True)

    results = evaluate(plan.spec, plan=plan, log=progress)
    path, report = write_outputs(results, plan.spec.out, drift_threshold=plan.spec.drift_threshold)
    print("at strength 1 (held-out: flow loss; drift/response: relative velocity change vs the base; leak = "
          "drift / response):")
    for line in result_table(results):
        print(f"  {line}")
    print(path)
    print("recommendation:")
    for line in recommend(results, drift_threshold=plan.spec.drift_threshold).lines:
        print(f"  {line}")
    print(report)
    return 0
