"""`minicache-bench`'s command line: options and the checks made before anything heavy is imported.

Parsing and checking import neither torch nor transformers, so a mistyped option is answered at once;
the measurement itself is :mod:`minicache.evaluate.bench`.
"""

from __future__ import annotations

import argparse
import math
import sys

from minicache.cli_options import (
    DEFAULT_MODEL,
    MODEL_HELP,
    ArgumentParser,
    add_allow_mismatch_option,
    add_dtype_option,
    add_kv_options,
    add_model_option,
    add_profile_option,
    interruptible,
    positive_int_list,
)
from minicache.model_spec import MODEL_SHAPES


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="minicache-bench",
        description=(
            "Prefill and decode tokens/s and KV memory of MiniCache against the full cache (DynamicCache), "
            "at several context lengths and batch sizes; medians over repeats, ratios against the full cache "
            "of the same run; and the largest batch whose KV fits a memory budget. Writes JSON and a PNG plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_mutually_exclusive_group()
    add_model_option(model, default=None, help=f"{MODEL_HELP} (default {DEFAULT_MODEL})")
    model.add_argument("--model-shape", choices=sorted(MODEL_SHAPES),
                       help="a randomly initialised Llama of this shape instead of trained weights (speed/memory only)")
    add_profile_option(parser, multiple=True)
    parser.add_argument("--preset", action="append", default=[], choices=["paper", "none"],
                        help="built-in profile (paper: S = L/2, t = 0.6, γ = 0.05); may be combined with --profile")
    add_allow_mismatch_option(parser)
    add_kv_options(parser, bits_help="also measure a quantized copy of every MiniCache variant (named "
                   "<name>-<bits>bit); --preset none --kv-bits 4 is quantization alone")
    parser.add_argument("--kernels", choices=["auto", "on", "off", "torch"], default="auto",
                        help="Triton kernels for MiniCache decode attention and merging: auto = on with CUDA and "
                             "triton (the restore-then-attend torch path otherwise); on = fail if they cannot run; "
                             "torch = no kernels, decode attends a block of restored tokens at a time (any device)")
    parser.add_argument("--context-lengths", type=positive_int_list, default=(512, 2048), help="comma-separated")
    parser.add_argument("--batch-sizes", type=positive_int_list, default=(1, 4), help="comma-separated")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy single-token steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (medians reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each cache first")
    parser.add_argument("--kv-budget-mib", type=float, default=256.0,
                        help="KV budget for the largest-batch computation (0: skip)")
    parser.add_argument("--data", help="text for the prompts (.txt or JSON Lines); default: random token ids")
    add_dtype_option(parser, default="auto", auto="float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="random prompts and random weights")
    parser.add_argument("--json-out", help="write the results here (JSON)")
    parser.add_argument("--plot-out", help="write the plot here (PNG; needs matplotlib)")
    parser.add_argument("--force", action="store_true", help="overwrite --json-out / --plot-out")
    parser.add_argument("--note", help="free text recorded with the machine (e.g. 'shared with other jobs')")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _check_args(args) -> str | None:
    for name in ("decode_tokens", "warmup"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be ≥ 0"
    if args.repeats < 1:
        return "--repeats must be at least 1"
    if args.threads is not None and args.threads < 1:
        return "--threads must be at least 1"
    if args.kv_budget_mib < 0 or not math.isfinite(args.kv_budget_mib):
        return "--kv-budget-mib must be a finite number ≥ 0"
    if not args.profile and not args.preset:
        return "give at least one MiniCache variant: --profile PATH and/or --preset paper"
    if args.kv_group_size < 2:
        return "--kv-group-size must be at least 2"
    if args.kv_residual_length < 0:
        return "--kv-residual-length must be ≥ 0"
    from minicache.fileio import check_output_file

    try:
        check_output_file(args.json_out, "--json-out", args.force)
        check_output_file(args.plot_out, "--plot-out", args.force)
    except OSError as err:
        return str(err)
    if args.plot_out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot-out needs matplotlib: pip install 'minicache[calibrate]'"
    if args.device == "cuda":
        import torch  # only here: checking the other options must not wait for torch

        if not torch.cuda.is_available():
            return "--device cuda: no CUDA device is available"
    return None


@interruptible
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    error = _check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from minicache.evaluate.bench import run_from_args

    return run_from_args(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
