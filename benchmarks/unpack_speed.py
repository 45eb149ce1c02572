"""Speed of unpacking 2/4-bit codes: byte shifts (minicache.quant.packed.unpack) against the int32
word path it replaced (kept here as the baseline), same run, same tensors.

    OMP_NUM_THREADS=1 python benchmarks/unpack_speed.py [--tokens 2048] [--repeats 50]

Prints, per width, the median time of each and their ratio, and checks that both give the same codes.
The codes of one SmolLM2 layer's keys at ``--tokens`` tokens: [1, 3 KV heads, tokens, 64 channels].
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minicache.quant.packed import pack, unpack


def unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The previous unpack for widths dividing 8: bytes gathered into int32 words, then shifted."""
    per = 8 // bits
    p = packed.shape[-1]
    rows = packed.reshape(-1, p)
    byte_shifts = torch.arange(0, 8, 8, dtype=torch.int32)  # one byte per word at these widths
    shifts = torch.arange(0, per * bits, bits, dtype=torch.int32)
    word = (rows.to(torch.int32).reshape(rows.shape[0], p, 1) << byte_shifts).sum(-1, dtype=torch.int32)
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], p * per)


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), codes [1, 3, {args.tokens}, 64]")
    generator = torch.Generator().manual_seed(0)
    for bits in (4, 2):
        codes = torch.randint(0, 1 << bits, (1, 3, args.tokens, 64), generator=generator, dtype=torch.uint8)
        packed = pack(codes, bits)
        if not (torch.equal(unpack(packed, bits), codes) and torch.equal(unpack_words(packed, bits), codes)):
            raise SystemExit(f"{bits}-bit: the two unpacks disagree")
        new = median_ms(lambda p=packed, b=bits: unpack(p, b), args.repeats)
        old = median_ms(lambda p=packed, b=bits: unpack_words(p, b), args.repeats)
        print(f"{bits}-bit: byte shifts {new:.3f} ms, int32 words {old:.3f} ms, speed-up {old / new:.2f}x")


if __name__ == "__main__":
    main()
