"""How fast packed codes turn into the values they stand for: unpack-then-look-up against
:func:`minicache.quant.packed.code_values` (a 256-row table per byte), measured in the same run.

Usage::

    python benchmarks/lookup_probe.py --markdown-out benchmarks/results/keys-cpu/lookup-probe.md

One layer's worth of keys at SmolLM2's shapes (3 KV heads x head_dim 64), per-channel groups of 128
tokens; the median of ``--repeats`` timings of each reader, alternating call by call so that both see
the same machine load. Only the conversion of codes is timed (no scales, no rotation). One hot tensor flatters
tables: what counts is ``benchmarks/lookup_decode.py`` (inside decode steps), where only 1- and 2-bit
codes kept their table; the 3- and 4-bit rows here now time the same reader twice (a control).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minicache.quant.lloyd import levels_table
from minicache.quant.packed import code_values, quantize, unpack


def unpack_then_look_up(packed: torch.Tensor, bits: int, levels: torch.Tensor | None = None) -> torch.Tensor:
    """The reader before code_values: every code unpacked, then converted or looked up."""
    codes = unpack(packed, bits)
    return codes.float() if levels is None else levels[codes.int()]


def paired_medians(repeats: int, first: Callable[[], torch.Tensor],
                   second: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """Median milliseconds of each reader, timed in alternation so that both see the same load."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times, strict=True):
            began = time.perf_counter()
            fn()
            out.append(time.perf_counter() - began)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the packed layer (default 4096)")
    parser.add_argument("--repeats", type=int, default=200, help="timings per reader, alternating (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--markdown-out", type=Path, help="write the table here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, args.tokens, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    rows = [f"{args.tokens} tokens x 3 KV heads x 64 channels, {args.threads} threads, median of "
            f"{args.repeats} alternating timings per reader", "",
            "| codes | unpack, then look up (ms) | byte table (ms) | speed-up |", "|---|---:|---:|---:|"]
    for bits, levels, label in [(2, levels_table(2), "2-bit uneven levels"), (2, None, "2-bit even"),
                                (3, None, "3-bit even"), (4, None, "4-bit even")]:
        packed = quantize(x, bits, 128, "tokens", levels=levels).data
        assert torch.equal(code_values(packed, bits, levels), unpack_then_look_up(packed, bits, levels))
        before, after = paired_medians(args.repeats, functools.partial(unpack_then_look_up, packed, bits, levels),
                                       functools.partial(code_values, packed, bits, levels))
        rows.append(f"| {label} | {before:.3f} | {after:.3f} | {before / after:.2f}x |")
    text = "\n".join(rows)
    print(text)
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
