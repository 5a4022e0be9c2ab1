"""`anima-trainer extract --base A --tuned B --rank R --out F`: the command line of tools/extract.py."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Turn a fine-tuned DiT into a LoRA: for every target Linear, ΔW = W_tuned − W_base (fp32) is cut to rank R by
a truncated SVD (exact torch.linalg.svd; --svd lowrank: randomised, faster) and written as a ComfyUI-native
LoRA (diffusion_model.<path>.lora_up / lora_down / alpha, alpha = rank: strength 1 adds the rank-R ΔW).
Baking it back (`anima-trainer merge`) or loading it in ComfyUI at strength 1 gives the tuned model up to the
SVD tail.
  * targets: the Linears a LoRA trains by default (10 per block), --all-linears, or --targets REGEX;
  * target modules whose ΔW is zero are skipped; other changed tensors (norm gains, biases, embeddings, Linears
    outside the targets) are listed with their relative change, or written as ComfyUI full differences
    (.diff / .diff_b) with --diffs;
  * report: per module the relative error |ΔW − up·down|_F / |ΔW|_F and the retained energy (the share of
    ΣS² the rank keeps), worst first, and the mean/max; the full report is written as JSON beside the file
    (OUT without .safetensors + .extract.json, or --report).
Both files are single-file DiT checkpoints (or all-in-one bundles) of the same model; scaled-fp8 files are
dequantised first.  Memory: both state dicts in their file dtype, plus one fp32 matrix at a time on --device."""


def add_extract_parser(sub) -> None:  # sub: argparse's private subparsers type
    """Register `extract`."""
    from anima_trainer.tools.extract import KOHYA_CLAMP_QUANTILE

    p = sub.add_parser("extract", help="turn a fine-tuned DiT into a LoRA (truncated SVD of W_tuned − W_base per "
                       "module, ComfyUI names, reconstruction error per module)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="A", help="the base DiT .safetensors the fine-tune started from")
    p.add_argument("--tuned", required=True, metavar="B", help="the fine-tuned DiT .safetensors (same model)")
    p.add_argument("--rank", type=int, required=True, metavar="R", help="LoRA rank (capped per module at "
                   "min(out, in): that rank reproduces the tuned weights)")
    p.add_argument("--out", required=True, metavar="F", help="the LoRA .safetensors to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--all-linears", "--all_linears", dest="all_linears", action="store_true",
                   help="extract every Linear of the DiT (adaLN, final layer, embedders, LLM adapter too)")
    g.add_argument("--targets", action="append", default=None, metavar="REGEX",
                   help="extract the Linears whose path full-matches REGEX (repeatable), e.g. "
                   "'blocks\\.\\d+\\.cross_attn\\..*' (default: the default LoRA targets)")
    p.add_argument("--diffs", action="store_true", help="write the other changed tensors (norm gains, biases, "
                   "embeddings, Linears outside the targets) as ComfyUI full differences (.diff / .diff_b), so "
                   "the file reproduces them too")
    p.add_argument("--clamp-quantile", "--clamp_quantile", dest="clamp_quantile", type=float, default=None,
                   metavar="Q", help=f"clamp both factors to ± the Q-quantile of their values (kohya's default "
                   f"{KOHYA_CLAMP_QUANTILE}; default here: no clamping, so full rank is exact)")
    p.add_argument("--svd", choices=("exact", "lowrank"), default="exact",
                   help="exact: torch.linalg.svd, the optimal rank-R cut (cost ∝ out·in·min(out, in)); lowrank: "
                   "torch.svd_lowrank (randomised, seed 0, cost ∝ out·in·R: much faster on CPU at small R, close "
                   "to the optimum; the report shows what it lost) (default: exact)")
    p.add_argument("--device", default=None, help="where the SVDs run: cuda, cuda:1, cpu (default: cuda if "
                   "available)")
    p.add_argument("--save_precision", "--save-precision", dest="save_precision", choices=("fp32", "bf16", "fp16"),
                   default="fp32", help="dtype of the factors in the file (default: fp32, as kohya's extract)")
    p.add_argument("--report", default=None, metavar="JSON", help="where to write the JSON report (default: "
                   "beside --out, <name>.extract.json)")
    p.add_argument("--top", type=int, default=20, metavar="N",
                   help="print the N worst modules (0: all; default 20; the JSON report has all)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and the report if they exist")


def cmd_extract(args: argparse.Namespace) -> int:
    from anima_trainer.dtypes import PRECISION_DTYPES
    from anima_trainer.tools.extract import extract_lora, result_lines

    step = 0

    def progress(done: int, total: int, module: str) -> None:
        nonlocal step
        if done == total or done * 10 // total > step:
            step = done * 10 // total
            print(f"extract: {done}/{total} modules ({module})", file=sys.stderr, flush=True)

    result = extract_lora(args.base, args.tuned, args.out, rank=args.rank, all_linears=args.all_linears,
                          targets=args.targets, diffs=args.diffs, clamp_quantile=args.clamp_quantile,
                          svd=args.svd, device=args.device, save_dtype=PRECISION_DTYPES[args.save_precision],
                          report=args.report, overwrite=args.overwrite, progress=progress)
    for line in result_lines(result, top=args.top):
        print(line)
    print(result.report)
    print(result.written)
    return 0
