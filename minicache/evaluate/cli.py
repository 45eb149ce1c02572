"""`minicache-eval`: quality and memory of merge profiles, presets and baselines against the full cache."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from dataclasses import replace

from minicache.cli_options import (
    ArgumentParser,
    add_allow_mismatch_option,
    add_dtype_option,
    add_kv_options,
    add_model_option,
    add_profile_option,
    interruptible,
    positive_int_list,
    quantization_from_args,
)
from minicache.data import DataError, read_samples, token_windows
from minicache.evaluate.task_names import DEFAULT_TASKS, RULER_TASKS
from minicache.fileio import atomic_write, check_output_file
from minicache.model_spec import ModelSpec
from minicache.profile import MergeProfile
from minicache.validation import ProfileError

TASKS = ("perplexity", "passkey", "ruler")


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if any(not 0.0 <= v <= 1.0 for v in values):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: every depth must be in [0, 1]")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="minicache-eval",
        description=(
            "Measure what a MiniCache merge profile costs in quality and saves in memory. "
            "--task perplexity (default): each window of the data is split into a prefix, which goes "
            "through the merged cache, and a continuation, fed teacher-forced through the same cache and "
            "scored against one pass with the full cache: perplexity, KL divergence of next-token "
            "distributions (mean, q95) and top-1 agreement; memory is the cache after the prefix, "
            "compression_ratio = full-cache bytes / bytes held. --task passkey: a 5-digit number hidden at "
            "several depths in filler text of several lengths, asked for at the end; exact-match accuracy "
            "of the full cache and of the method(s) on the same prompts. --task ruler: RULER-style long-context "
            "tasks (needles, variable tracking, common words, quotes from a passage; --tasks), exact-match "
            "accuracy per task and length with a 95 % interval. --compare runs several methods "
            "on the same data and prints a Markdown table."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_option(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    add_profile_option(what)
    what.add_argument(
        "--preset",
        choices=["paper", "none"],
        help="a built-in profile (paper: S = L/2, t = 0.6, γ = 0.05; none: no merging, e.g. with --kv-bits)",
    )
    what.add_argument(
        "--baseline",
        choices=["full", "average", "quantized-cache-fp8", "quantized-cache-quanto", "quantized-cache-hqq"],
        help="full: transformers' DynamicCache (sanity check, 0 loss); average: the paper preset's pairs "
        "merged by plain averaging (x̂ = (x^{l-1} + x^l)/2 for both layers), same retention and cache; "
        "quantized-cache-<backend>: transformers' QuantizedCache (fp8 runs anywhere; quanto/hqq need their "
        "packages and take --kv-bits/--kv-group-size)",
    )
    what.add_argument(
        "--compare",
        metavar="METHODS",
        help="comma-separated methods measured on the same data in one run: full, paper, average, "
        "baseline:NAME, preset:NAME, or profile paths (e.g. full,paper,average,profiles/smollm2-135m-instruct); "
        "METHOD@[SCHEME:]BITS[/GROUP] stores that method quantized (e.g. none@rotated:3, none@kivi:2/64; "
        "it overrides --kv-bits for that method); kvpress:NAME@RATIO is a kvpress press removing that share "
        "of the prefix (names: streaming, knorm, snapkv, expected, tova, keydiff, random)",
    )
    parser.add_argument("--task", choices=TASKS, default="perplexity", help="what to measure")
    parser.add_argument(
        "--data", help="perplexity task: JSON Lines (text / messages / input_ids per line) or a .txt file"
    )
    ppl = parser.add_argument_group("perplexity task")
    ppl.add_argument("--prefix-length", type=int, default=512, help="tokens merged before scoring")
    ppl.add_argument("--continuation-length", type=int, default=256, help="tokens scored after the prefix")
    ppl.add_argument("--num-windows", type=int, default=16, help="at most this many windows")
    ppl.add_argument("--chunk-size", type=int, default=64, help="continuation tokens per forward pass")
    passkey = parser.add_argument_group("passkey and ruler tasks")
    passkey.add_argument(
        "--context-lengths", type=positive_int_list, default=[1024, 2048, 4096], metavar="N,N,...",
        help="prompt lengths in tokens",
    )
    passkey.add_argument(
        "--depths", type=_depth_list, default=[0.1, 0.5, 0.9], metavar="D,D,...",
        help="needle depths, as fractions of the filler",
    )
    passkey.add_argument("--samples-per-cell", type=int, default=4,
                         help="prompts per (length, depth); --task ruler: per (task, length)")
    passkey.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    passkey.add_argument("--max-new-tokens", type=int, default=8, help="greedy answer tokens (ruler: per task)")
    passkey.add_argument("--tasks", default=",".join(DEFAULT_TASKS), metavar="T,T,...",
                         help=f"--task ruler: which tasks (of {', '.join(RULER_TASKS)})")
    parser.add_argument("--batch-size", type=int, default=4, help="windows or prompts per forward pass")
    add_dtype_option(parser)
    add_kv_options(parser)
    add_allow_mismatch_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON result to FILE")
    parser.add_argument("--markdown-out", metavar="FILE", help="also write the Markdown table(s) to FILE")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json-out / --markdown-out")
    return parser


def _methods(args):
    """The MethodSpecs to run; loads (and so validates) profiles before any model is loaded."""
    from minicache.evaluate.compare import MethodSpec, parse_methods

    if args.compare is not None:
        return parse_methods(args.compare)
    if args.profile:
        return [MethodSpec(args.profile, "profile", args.profile, MergeProfile.load(args.profile))]
    if args.preset:
        return [MethodSpec(f"preset:{args.preset}", "preset", args.preset)]
    return [MethodSpec(f"baseline:{args.baseline}", "baseline", args.baseline)]


@interruptible
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    counts = ["batch_size"]
    counts += (
        ["prefix_length", "continuation_length", "num_windows", "chunk_size"]
        if args.task == "perplexity"
        else ["samples_per_cell", "max_new_tokens"]
    )
    for name in counts:
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.kv_bits is not None and args.baseline in ("full", "quantized-cache-fp8"):
        print(f"error: --kv-bits does not apply to --baseline {args.baseline}", file=sys.stderr)
        return 2
    if args.task == "ruler":
        unknown = [t for t in args.tasks.split(",") if t not in RULER_TASKS]
        if unknown:
            print(f"error: unknown --tasks {', '.join(unknown)}; known: {', '.join(RULER_TASKS)}", file=sys.stderr)
            return 2
    if args.task == "perplexity" and not args.data:
        print("error: --task perplexity needs --data", file=sys.stderr)
        return 2
    try:
        samples = read_samples(args.data) if args.task == "perplexity" else None  # before the model loads
        quantization = quantization_from_args(args)
        methods = [m if m.quantization is not None else replace(m, quantization=quantization) for m in _methods(args)]
        for option, path in (("--json-out", args.json_out), ("--markdown-out", args.markdown_out)):
            check_output_file(path, option, args.force)
    except (DataError, ProfileError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    from minicache.evaluate import compare
    from minicache.models import load_model

    started = time.perf_counter()

    def progress(message: str) -> None:  # on stderr: stdout stays one table or one JSON object
        if args.compare is not None or args.task != "perplexity":
            print(f"[{time.perf_counter() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    try:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
        compare.check_methods(methods, model.config, args.allow_model_mismatch)
        spec = ModelSpec.from_config(model)
        if args.task == "perplexity":
            spec.check_fits(args.prefix_length + args.continuation_length, "--prefix-length + --continuation-length")
        else:
            spec.check_fits(max(args.context_lengths) + args.max_new_tokens,
                            "the longest --context-lengths + --max-new-tokens")
        if args.task == "perplexity":
            length = args.prefix_length + args.continuation_length
            windows = token_windows(samples, tokenizer, length, max_windows=args.num_windows)
            if windows.shape[0] == 0:
                raise DataError(f"{args.data}: fewer than {length} tokens, not one prefix + continuation window")
            rows = compare.compare_quality(
                model,
                windows,
                args.prefix_length,
                methods,
                batch_size=args.batch_size,
                chunk_size=args.chunk_size,
                allow_model_mismatch=args.allow_model_mismatch,
                progress=progress,
            )
        elif args.task == "ruler":
            ruler = compare.compare_tasks(
                model, tokenizer, methods, args.tasks.split(","), args.context_lengths, args.samples_per_cell,
                seed=args.seed, allow_model_mismatch=args.allow_model_mismatch, progress=progress,
            )
        else:
            passkey = compare.compare_passkey(
                model,
                tokenizer,
                methods,
                args.context_lengths,
                args.depths,
                args.samples_per_cell,
                seed=args.seed,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                allow_model_mismatch=args.allow_model_mismatch,
                progress=progress,
            )
    except (DataError, ProfileError, OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = round(time.perf_counter() - started, 1)

    if args.task == "perplexity" and args.compare is None:
        # The single-run output of earlier versions, key for key.
        row = rows[0]
        out = {k: v for k, v in row.items() if k not in ("method", "describe", "seconds")}
        out.update(profile=row["method"], dtype=args.dtype, data=args.data)
        out.update({k: row[k] for k in ("kv_bits", "kv_group_size", "kv_residual_length") if k in row})
        out["seconds"] = seconds
        text = format_result(out)
        markdown = compare.quality_markdown(rows)
    else:
        out = {"task": args.task, "model": args.model, "dtype": args.dtype}
        if args.task == "perplexity":
            out.update(data=args.data, results=rows)
            markdown = compare.quality_markdown(rows)
        elif args.task == "ruler":
            out.update(ruler)
            markdown = compare.tasks_markdown(ruler)
        else:
            out.update(passkey)
            markdown = compare.passkey_markdown(passkey)
        out["seconds"] = seconds
        text = markdown
    print(json.dumps(out) if args.json else text)
    try:
        if args.json_out:
            _write(args.json_out, json.dumps(out, indent=1) + "\n", args.force)
        if args.markdown_out:
            _write(args.markdown_out, markdown + "\n", args.force)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _write(path: str, text: str, overwrite: bool) -> None:
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, text.encode("utf-8"), overwrite=overwrite)


def format_result(out: dict) -> str:
    from minicache.evaluate.quality import format_interval  # torch: loaded by the run this formats anyway

    return "\n".join(
        [
            f"profile            {out['profile']} ({out['dtype']}"
            + (f", {out['kv_bits']}-bit KV, group {out['kv_group_size']}" if "kv_bits" in out else "")
            + ")",
            f"windows            {out['windows']} x "
            f"({out['prefix_length']} prefix + {out['continuation_length']} scored)",
            f"perplexity         {out['ppl']:.4f} vs {out['ppl_full']:.4f} full ({out['ppl_increase']:+.2%}"
            + (f"; 95 % interval {format_interval(out['ppl_increase_ci95'])}" if out.get("ppl_increase_ci95") else "")
            + ")",
            f"KL mean / q95      {out['kl_mean']:.5f} / {out['kl_q95']:.5f} nats",
            f"top-1 agreement    {out['top1_agreement']:.2%}",
            f"KV memory          {out['kv_bytes'] / 2**20:.2f} MiB vs {out['kv_bytes_full'] / 2**20:.2f} MiB full "
            f"(compression {out['compression_ratio']:.3f}x)",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
