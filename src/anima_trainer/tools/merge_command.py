"""`anima-trainer merge`: the command line of tools/merge.py (baking networks into a DiT / Qwen3 file, and
`--average`, the checkpoint soup); the flags are registered in cli.py."""

from __future__ import annotations

import argparse
import sys

from anima_trainer.dtypes import PRECISION_DTYPES


def cmd_merge(args: argparse.Namespace) -> int:
    """`merge`: bake networks into a DiT and/or a Qwen3 file, or `--average` them into one network."""
    from anima_trainer.fileio import check_writable
    from anima_trainer.networks import NetworkError
    from anima_trainer.tools.convert import parse_network_arg
    from anima_trainer.tools.merge import merge_networks, merge_text_encoder

    if args.average is not None:
        return _merge_average(args)
    if args.weights is not None:
        raise NetworkError("merge: --weights goes with --average (the strength of a baked network is "
                           "--network FILE:MUL)")
    if not args.network:
        raise NetworkError("merge: give --network FILE[:MUL] (repeatable) to bake, or --average A B ... --out OUT "
                           "to average networks")
    if (args.dit is None) != (args.out is None) or (args.qwen3 is None) != (args.qwen3_out is None):
        raise NetworkError("merge: --dit needs --out and --qwen3 needs --qwen3-out (each base with its output)")
    if args.dit is None and args.qwen3 is None:
        raise NetworkError("merge: give --dit BASE --out OUT (the DiT), --qwen3 BASE --qwen3-out OUT (the text "
                           "encoder), or both")
    networks = [parse_network_arg(n) for n in args.network]
    dtype = PRECISION_DTYPES[args.save_precision] if args.save_precision else None
    for out in (args.out, args.qwen3_out):  # refuse before minutes of merging, not after
        if out is not None:
            check_writable(out, args.overwrite)
    if args.dit is not None:
        result = merge_networks(args.dit, networks, args.out, save_dtype=dtype, overwrite=args.overwrite,
                                text_encoder_merged=args.qwen3 is not None)
        for f, keys in result["not_loaded"].items():
            print(f"warning: {f}: {len(keys)} keys ComfyUI would not load either: {keys[:5]}", file=sys.stderr)
        for f, n in result["networks"].items():
            print(f"{f}: {n} DiT weights patched")
        print(result["written"])
    if args.qwen3 is not None:
        result = merge_text_encoder(args.qwen3, networks, args.qwen3_out, save_dtype=dtype, overwrite=args.overwrite)
        for f, n in result["networks"].items():
            print(f"{f}: {n} text-encoder weights patched")
        print(result["written"])
    return 0


def _merge_average(args: argparse.Namespace) -> int:
    """`merge --average`: the checkpoint soup (tools/merge.average_networks)."""
    from anima_trainer.networks import NetworkError
    from anima_trainer.tools.merge import average_networks

    extra = [flag for flag, value in (("--network", args.network), ("--dit", args.dit), ("--qwen3", args.qwen3),
                                      ("--qwen3-out", args.qwen3_out)) if value is not None]
    if extra:
        raise NetworkError(f"merge --average writes a network file, not a model: {', '.join(extra)} cannot go with "
                           "it (average first, then bake the result with --dit/--network)")
    if args.out is None:
        raise NetworkError("merge --average needs --out OUT (the averaged network .safetensors)")
    dtype = PRECISION_DTYPES[args.save_precision] if args.save_precision else None
    result = average_networks(args.average, args.out, weights=args.weights, save_dtype=dtype,
                              overwrite=args.overwrite)
    for f, w in zip(result["files"], result["weights"], strict=True):
        print(f"{f}: weight {w:.4g}")
    print(f"{result['written']}: the mean of {len(result['files'])} networks ({result['tensors']} tensors)")
    return 0
