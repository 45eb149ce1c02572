"""What rounding keys for the queries costs at packing time (issue 18): one layer's keys packed to the nearest
level and with error feedback (``Quantization.key_rounding``), the same call timed in the same run.

Packing happens once per chunk and layer (every ``group_size`` decode steps, and for the whole prompt at
prefill); reading is unchanged. Prints, per chunk length, milliseconds per call (median of
``torch.utils.benchmark``'s blocked runs) and the ratio.

    .venv/bin/python benchmarks/key_rounding_speed.py --out benchmarks/results/keys-cpu/key-rounding-speed.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from minicache.quant.packed import quantize
from minicache.quant.rotated import rotation_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64,2048,4096", help="chunk lengths (tokens of one layer)")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    torch.manual_seed(0)
    rotation = rotation_matrix(args.head_dim)
    weights = torch.rand(args.heads, args.head_dim) + 0.1
    lines = [f"{args.heads} KV heads x {args.head_dim} channels, {args.bits}-bit rotated keys in groups of 64 tokens, "
             f"8-bit scales, float32, {torch.get_num_threads()} threads; ms per call, same run", "",
             "| tokens | nearest | for the queries | ratio |", "|---:|---:|---:|---:|"]
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(1, args.heads, n, args.head_dim)
        ms = []
        for extra in ({}, {"weights": weights}):
            timer = Timer("f()", globals={"f": lambda x=x, extra=extra: quantize(x, args.bits, 64, "tokens", rotation,
                                                                                scale_bits=8, **extra)})
            ms.append(timer.blocked_autorange(min_run_time=1).median * 1e3)
        lines.append(f"| {n} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[1] / ms[0]:.1f}x |")
        print(lines[-1], flush=True)
    if args.out:
        command = "Command: `.venv/bin/python benchmarks/key_rounding_speed.py --out " + args.out + "`"
        Path(args.out).write_text("\n".join(lines) + f"\n\n{command}\n")


if __name__ == "__main__":
    main()
