"""Decode steps of pre-RoPE stores with RoPE's tables held joined or copied per read, in one process (issue 18).

A layer that packs keys before RoPE puts RoPE back on every block it reads, with rows of cos and sin tables of
1,024 positions each. Until this change a block over several tables copied their rows into one tensor on every
read (every layer, every step); now runs of up to :data:`minicache.runtime.rope.SPAN_HELD` tables are joined once
and read as slices. ``SPAN_HELD = 0`` is the old behaviour exactly, so both are timed in one process, alternated
round by round (the same machine state), beside 4-bit KIVI and 3-bit rotated (no RoPE to put back) for scale.

    .venv/bin/python benchmarks/rope_tables_decode.py --markdown-out benchmarks/results/keys-cpu/rope-tables-decode.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import minicache.runtime.rope as rope_module
from minicache import MergeProfile, MiniCache
from minicache.data import split_text, token_windows
from minicache.evaluate.bench import timed_greedy_decode
from minicache.models import load_model
from minicache.profile import Quantization
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", default=[],
                        help="pre-RoPE profiles to time (default: the 4.92x and 5.03x profiles)")
    parser.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown-out")
    args = parser.parse_args()
    profiles = args.profile or ["benchmarks/results/keys-cpu/auto-rotated-queries",
                                "benchmarks/results/keys-cpu/auto-rotated-queries-g128"]

    model, tokenizer = load_model("smollm2-135m", dtype="bfloat16")
    ids = token_windows(split_text(Path(args.data).read_text()), tokenizer, args.context, 1)
    none = MergeProfile()
    stores = {"4-bit kivi": none.with_quantization(Quantization(bits=4)),
              "3-bit rotated": none.with_quantization(Quantization(bits=3, scheme="rotated")),
              "3-bit rotated + keys pre-RoPE": none.with_quantization(
                  Quantization(bits=3, scheme="rotated", pre_rope_keys=True))}
    stores.update({f"profile {path}": MergeProfile.load(path) for path in profiles})
    rope_stores = [name for name, p in stores.items() if p.quantization.pre_rope_keys]
    held = rope_module.SPAN_HELD
    runs: dict[tuple[str, int], list[float]] = {}

    def run(name: str, span_held: int) -> list[float]:
        rope_module.SPAN_HELD = span_held
        rope_module._span.cache_clear()
        return timed_greedy_decode(model, MiniCache(stores[name], model), ids, args.new_tokens)[0]

    enable_fused_attention(model, backend="torch")
    try:
        plan = [(name, held) for name in stores] + [(name, 0) for name in rope_stores]
        for name, span in plan:
            run(name, span)  # warm-up
        for _ in range(args.repeats):  # round by round: every variant sees the same drift
            for name, span in plan:
                runs.setdefault((name, span), []).extend(run(name, span))
    finally:
        rope_module.SPAN_HELD = held
        disable_fused_attention(model)
    median = {key: statistics.median(v) for key, v in runs.items()}
    base = median[("4-bit kivi", held)]
    lines = [f"{args.context} tokens x 1, {args.new_tokens} greedy tokens, bfloat16, blockwise torch path, "
             f"{torch.get_num_threads()} threads, median of {args.repeats} x {args.new_tokens} steps, each timed, "
             "variants alternated round by round in one process", "",
             "| storage | tables | s / decode step | speed vs 4-bit KIVI |", "|---|---|---:|---:|"]
    for (name, span), seconds in median.items():
        tables = "–" if name not in rope_stores else ("joined (now)" if span else "copied per read (before)")
        lines.append(f"| {name} | {tables} | {seconds:.4f} | {base / seconds:.2f} |")
    for name in rope_stores:
        lines.append(f"\n{name}: {median[(name, 0)] / median[(name, held)]:.2f}x faster with joined tables")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text)


if __name__ == "__main__":
    main()
