"""`minicache-eval`: quality and memory of a merge profile against the full cache."""

from __future__ import annotations

import argparse
import json
import sys
import time

from minicache.data import DataError, read_samples, token_windows
from minicache.profile import MergeProfile, ProfileError, Quantization

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicache-eval",
        description=(
            "Measure what a MiniCache merge profile costs in quality and saves in memory. Each window of "
            "the data is split into a prefix, which goes through the merged cache, and a continuation, "
            "fed teacher-forced through the same cache and scored against one pass with the full cache: "
            "perplexity, KL divergence of next-token distributions (mean, q95) and top-1 agreement. "
            "Memory is the cache after the prefix; compression_ratio = full-cache bytes / bytes held."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="HF directory, .gguf file, hub id (local cache) or alias"
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help="merge profile: a YAML file or a model directory holding minicache_config.yaml")
    what.add_argument(
        "--preset",
        choices=["paper", "none"],
        help="a built-in profile (paper: S = L/2, t = 0.6, γ = 0.05; none: no merging, e.g. with --kv-bits)",
    )
    what.add_argument(
        "--baseline",
        choices=["full", "quantized-cache-fp8", "quantized-cache-quanto", "quantized-cache-hqq"],
        help="full: transformers' DynamicCache (sanity check, 0 loss); quantized-cache-<backend>: transformers' "
        "QuantizedCache (fp8 runs anywhere; quanto/hqq need their packages and take --kv-bits/--kv-group-size)",
    )
    parser.add_argument(
        "--data", required=True, help="JSON Lines (text / messages / input_ids per line) or a .txt file"
    )
    parser.add_argument("--prefix-length", type=int, default=512, help="tokens merged before scoring")
    parser.add_argument("--continuation-length", type=int, default=256, help="tokens scored after the prefix")
    parser.add_argument("--num-windows", type=int, default=16, help="at most this many windows")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--chunk-size", type=int, default=64, help="continuation tokens per forward pass")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model and cache dtype")
    parser.add_argument(
        "--kv-bits", type=int, choices=[2, 4], help="quantize the cache KIVI-style to this many bits (issue 6)"
    )
    parser.add_argument(
        "--kv-group-size", type=int, default=128, help="with --kv-bits: tokens per key group, channels per value group"
    )
    parser.add_argument("--allow-model-mismatch", action="store_true", help="use a profile made for another model")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("prefix_length", "continuation_length", "num_windows", "batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.kv_bits is not None and args.baseline in ("full", "quantized-cache-fp8"):
        print(f"error: --kv-bits does not apply to --baseline {args.baseline}", file=sys.stderr)
        return 2
    try:
        samples = read_samples(args.data)  # validate before spending time on the model
        profile = MergeProfile.load(args.profile) if args.profile else None
        quantization = None
        if args.kv_bits is not None:
            quantization = Quantization(bits=args.kv_bits, group_size=args.kv_group_size)
    except (DataError, ProfileError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    from minicache.evaluate.quality import evaluate_profile, full_cache_factory, quantized_cache_factory
    from minicache.models import load_model

    started = time.perf_counter()
    try:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
        length = args.prefix_length + args.continuation_length
        windows = token_windows(samples, tokenizer, length, max_windows=args.num_windows)
        if windows.shape[0] == 0:
            raise DataError(f"{args.data}: fewer than {length} tokens, not one prefix + continuation window")
        factory = None
        if args.preset:
            profile = MergeProfile.preset(args.preset, model.config)
        elif args.baseline == "full":
            profile, factory = MergeProfile(), full_cache_factory
        elif args.baseline:
            backend = args.baseline.removeprefix("quantized-cache-")
            profile = MergeProfile()
            factory = quantized_cache_factory(backend, args.kv_bits or 4, args.kv_group_size)
        if quantization is not None and not args.baseline:
            profile = profile.with_quantization(quantization)
        result = evaluate_profile(
            model,
            windows,
            args.prefix_length,
            profile,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            cache_factory=factory,
            allow_model_mismatch=args.allow_model_mismatch,
        )
    except (DataError, ProfileError, OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = result.to_dict()
    out["profile"] = args.profile or (f"preset:{args.preset}" if args.preset else f"baseline:{args.baseline}")
    out["dtype"] = args.dtype
    if args.baseline and args.baseline.startswith("quantized-cache-") and args.baseline != "quantized-cache-fp8":
        out["kv_bits"], out["kv_group_size"] = args.kv_bits or 4, args.kv_group_size
    elif profile is not None and profile.quantization is not None:
        out["kv_bits"], out["kv_group_size"] = profile.quantization.bits, profile.quantization.group_size
        out["kv_residual_length"] = profile.quantization.residual_length
    out["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(out))
    else:
        print(format_result(out))
    return 0


def format_result(out: dict) -> str:
    return "\n".join(
        [
            f"profile            {out['profile']} ({out['dtype']}"
            + (f", {out['kv_bits']}-bit KV, group {out['kv_group_size']}" if "kv_bits" in out else "")
            + ")",
            f"windows            {out['windows']} x "
            f"({out['prefix_length']} prefix + {out['continuation_length']} scored)",
            f"perplexity         {out['ppl']:.4f} vs {out['ppl_full']:.4f} full ({out['ppl_increase']:+.2%})",
            f"KL mean / q95      {out['kl_mean']:.5f} / {out['kl_q95']:.5f} nats",
            f"top-1 agreement    {out['top1_agreement']:.2%}",
            f"KV memory          {out['kv_bytes'] / 2**20:.2f} MiB vs {out['kv_bytes_full'] / 2**20:.2f} MiB full "
            f"(compression {out['compression_ratio']:.3f}x)",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
