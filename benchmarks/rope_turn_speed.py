"""Speed of putting RoPE back on a block of keys (minicache.runtime.rope.RopeAngles.apply) against the turn it
replaced (kept here as the baseline: ``cos``/``sin`` computed on every call, four products into two halves),
same run, same tensors; checks that both give the same bits. Then the step before it for pre-RoPE keys of the
rotated scheme: rotating a dequantized block back, in float32 (before) and in bf16 (now, on CPUs with bf16
kernels; the cast included).

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 \\
        python benchmarks/rope_turn_speed.py [--tokens 1024] [--repeats 2000]

The block: one SmolLM2 layer's keys ``[1, 3 KV heads, tokens, 64 channels]`` at indices ``tokens ..``. The two
turns alternate call by call (without the raised allocator thresholds, some processes page-fault on every
temporary and read several times slower: see the README's decode changes of 2026-12-07).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minicache.quant.rotated import rotation_matrix
from minicache.runtime.rope import RopeAngles


def turn_before(rope: RopeAngles, x: torch.Tensor, start: int) -> torch.Tensor:
    """The turn before 2026-12-07: angles computed for the block on every call, halves written one by one."""
    positions = torch.arange(start, start + x.shape[-2], dtype=torch.float32)
    angles = positions[:, None] * rope.inv_freq[None, :]
    cos, sin = angles.cos() * rope.scaling, angles.sin() * rope.scaling
    half = len(rope.inv_freq)
    first, second = x[..., :half], x[..., half : 2 * half]
    out = torch.empty_like(x)
    out[..., :half] = first * cos - second * sin
    out[..., half : 2 * half] = second * cos + first * sin
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    rope = RopeAngles(100000.0 ** -(torch.arange(0, 64, 2, dtype=torch.float32) / 64))  # SmolLM2's theta
    keys = torch.randn(1, 3, args.tokens, 64, generator=torch.Generator().manual_seed(0))
    start = args.tokens
    same = torch.equal(rope.apply(keys, start), turn_before(rope, keys, start))
    now, before = [], []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        rope.apply(keys, start)
        now.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        turn_before(rope, keys, start)
        before.append(time.perf_counter() - begin)
    now_ms, before_ms = statistics.median(now) * 1e3, statistics.median(before) * 1e3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), keys [1, 3, {args.tokens}, 64]")
    print(f"RoPE turn: tables {now_ms:.3f} ms, before {before_ms:.3f} ms, speed-up {before_ms / now_ms:.2f}x; "
          f"same bits: {same}")
    rotation = rotation_matrix(64)
    block = torch.randn(1, 3, 2 * args.tokens, 64, generator=torch.Generator().manual_seed(1))
    half_rotation = rotation.T.to(torch.bfloat16)
    in_float, in_half = [], []
    for _ in range(args.repeats // 4):
        begin = time.perf_counter()
        block @ rotation.T
        in_float.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        block.to(torch.bfloat16) @ half_rotation
        in_half.append(time.perf_counter() - begin)
    float_ms, half_ms = statistics.median(in_float) * 1e3, statistics.median(in_half) * 1e3
    print(f"unrotation of [1, 3, {2 * args.tokens}, 64]: float32 {float_ms:.3f} ms, bf16 {half_ms:.3f} ms, "
          f"speed-up {float_ms / half_ms:.2f}x")


if __name__ == "__main__":
    main()
