"""Decode speed of packed stores on the blockwise torch path (issue 18): 3-bit and rotated packings
against 4-bit KIVI, on the same prompts in the same run.

The blockwise path (``enable_fused_attention(model, backend="torch")``) dequantizes one block of the
packed prefix at a time while it is attended; on CPU there is no Triton kernel. Prints, per storage:
seconds per decode step (median over every step of ``--repeats`` runs, each step timed on its own after
an untimed prefill; the storages take turns run by run, so that a drifting machine slows them alike),
the speed ratio to 4-bit KIVI,
and the compression after the prompt.

    .venv/bin/python benchmarks/lowbit_decode.py --profile benchmarks/results/lowbit-cpu/auto-rotated
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from minicache import MergeProfile, MiniCache
from minicache.data import split_text, token_windows
from minicache.evaluate.bench import timed_greedy_decode
from minicache.models import load_model
from minicache.profile import Quantization
from minicache.runtime import blockwise
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention
from minicache.runtime.memory import cache_bytes, compression_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", default=[],
                        help="also time this (calibrated) profile as it is stored (repeat for several)")
    parser.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json-out")
    parser.add_argument("--markdown-out")
    parser.add_argument("--path", choices=("blockwise", "default"), default="blockwise",
                        help="blockwise: attend a restored block at a time; default: restore each layer whole")
    parser.add_argument("--block-tokens", type=int, default=None,
                        help="merged tokens the blockwise path restores at a time "
                             "(default: minicache.runtime.blockwise.DEFAULT_BLOCK_TOKENS)")
    parser.add_argument("--baselines", default=None,
                        help="comma-separated subset of the uniform storages (default: all; 4-bit kivi always)")
    args = parser.parse_args()

    if args.block_tokens is not None:
        blockwise.DEFAULT_BLOCK_TOKENS = args.block_tokens
    model, tokenizer = load_model("smollm2-135m", dtype=args.dtype)
    ids = token_windows(split_text(Path(args.data).read_text()), tokenizer, args.context, args.batch)
    mask = torch.ones_like(ids)
    none = MergeProfile()
    stores = {
        "4-bit kivi": none.with_quantization(Quantization(bits=4)),
        "3-bit kivi": none.with_quantization(Quantization(bits=3)),
        "2-bit kivi": none.with_quantization(Quantization(bits=2)),
        "4-bit rotated": none.with_quantization(Quantization(bits=4, scheme="rotated")),
        "3-bit rotated": none.with_quantization(Quantization(bits=3, scheme="rotated")),
        "3-bit rotated + 4 sinks": none.with_quantization(Quantization(bits=3, scheme="rotated", sink_tokens=4)),
        "3-bit rotated + keys pre-RoPE": none.with_quantization(
            Quantization(bits=3, scheme="rotated", pre_rope_keys=True)),
        "3-bit rotated + 4 sinks + keys pre-RoPE": none.with_quantization(
            Quantization(bits=3, scheme="rotated", sink_tokens=4, pre_rope_keys=True)),
        "3-bit rotated + 4 sinks + keys pre-RoPE + 8-bit window": none.with_quantization(
            Quantization(bits=3, scheme="rotated", sink_tokens=4, pre_rope_keys=True, window_bits=8)),
        "3-bit rotated + 4 sinks + key groups 64": none.with_quantization(
            Quantization(bits=3, scheme="rotated", sink_tokens=4, group_size=64)),
        "3-bit rotated + 8-bit scales": none.with_quantization(Quantization(bits=3, scheme="rotated", scale_bits=8)),
        "3-bit rotated + 4 sinks + key groups 64 + 8-bit scales": none.with_quantization(
            Quantization(bits=3, scheme="rotated", sink_tokens=4, group_size=64, scale_bits=8)),
        "2-bit rotated + 4 sinks": none.with_quantization(Quantization(bits=2, scheme="rotated", sink_tokens=4)),
        "2-bit rotated-lloyd + 4 sinks": none.with_quantization(
            Quantization(bits=2, scheme="rotated-lloyd", sink_tokens=4)),
    }
    if args.baselines:
        keep = {"4-bit kivi", *(name.strip() for name in args.baselines.split(","))}
        unknown = keep - set(stores)
        if unknown:
            parser.error(f"--baselines: unknown {sorted(unknown)}; allowed: {sorted(stores)}")
        stores = {name: p for name, p in stores.items() if name in keep}
    for path in args.profile:
        stores[f"profile {path}"] = MergeProfile.load(path)

    def generate(profile):
        cache = MiniCache(profile, model)
        return cache, timed_greedy_decode(model, cache, ids, args.new_tokens, mask)[0]

    if args.path == "blockwise":
        enable_fused_attention(model, backend="torch")
    results = {}
    runs: dict[str, list[float]] = {name: [] for name in stores}
    ratios = {}
    try:
        for profile in stores.values():
            generate(profile)  # warm-up
        # Round by round, every storage once per round: a shared machine's speed drifts by a quarter over
        # minutes, and alternating gives every storage the same drift (storage by storage did not).
        for _ in range(args.repeats):
            for name, profile in stores.items():
                cache, steps = generate(profile)
                runs[name].extend(steps)
                held, full = cache_bytes(cache)
                ratios[name] = compression_ratio(full, held)
        for name in stores:
            results[name] = (statistics.median(runs[name]), ratios[name])
            print(f"{name}: {results[name][0]:.4f} s/step", flush=True)
    finally:
        disable_fused_attention(model)
    base = results["4-bit kivi"][0]
    lines = [
        f"{args.context} tokens x {args.batch}, {args.new_tokens} greedy tokens, {args.dtype}, "
        f"{'blockwise torch path' if args.path == 'blockwise' else 'default path (whole-layer restore)'}, "
        f"blocks of {blockwise.DEFAULT_BLOCK_TOKENS} tokens, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} x {args.new_tokens} steps, each timed, "
        "storages alternated run by run" + "".join(
            f", {name}={os.environ[name]}" for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
            if name in os.environ),
        "",
        "| storage | s / decode step | speed vs 4-bit KIVI | compression |",
        "|---|---:|---:|---:|",
    ]
    rows = []
    for name, (seconds, ratio) in results.items():
        rows.append({"storage": name, "seconds_per_step": seconds, "speed_vs_kivi4": base / seconds,
                     "compression_ratio": ratio})
        lines.append(f"| {name} | {seconds:.4f} | {base / seconds:.2f} | {ratio:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
