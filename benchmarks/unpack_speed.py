"""Speed of unpacking 2/3/4-bit codes (minicache.quant.packed.unpack) against the int32 word paths they
replaced (kept here as the baselines), same run, same tensors: 2/4 bits shift bytes instead of words, 3 bits
read each 3-byte word as one int32 after a pad byte instead of widening, shifting and summing its bytes.
For 3 bits, also the float codes that dequantization reads (``code_values``), against the old unpack + float.

    OMP_NUM_THREADS=1 python benchmarks/unpack_speed.py [--tokens 2048] [--repeats 50]

Prints, per width, the median time of each and their ratio, and checks that both give the same codes.
The codes of one SmolLM2 layer's keys at ``--tokens`` tokens: [1, 3 KV heads, tokens, 64 channels].
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minicache.quant.packed import code_values, codes_per_word, pack, unpack


def unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The previous unpack: bytes widened to int32, shifted into words and summed, then the codes shifted out."""
    per = codes_per_word(bits)
    word_bytes = per * bits // 8
    p = packed.shape[-1]
    rows = packed.reshape(-1, p)
    byte_shifts = torch.arange(0, 8 * word_bytes, 8, dtype=torch.int32)
    shifts = torch.arange(0, per * bits, bits, dtype=torch.int32)
    grouped = rows.to(torch.int32).reshape(rows.shape[0], p // word_bytes, word_bytes)
    word = (grouped << byte_shifts).sum(-1, dtype=torch.int32)
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], p * 8 // bits)


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
    for bits in (4, 3, 2):
        codes = torch.randint(0, 1 << bits, (1, 3, args.tokens, 64), generator=generator, dtype=torch.uint8)
        packed = pack(codes, bits)
        if not (torch.equal(unpack(packed, bits), codes) and torch.equal(unpack_words(packed, bits), codes)):
            raise SystemExit(f"{bits}-bit: the two unpacks disagree")
        new = median_ms(lambda p=packed, b=bits: unpack(p, b), args.repeats)
        old = median_ms(lambda p=packed, b=bits: unpack_words(p, b), args.repeats)
        now = "int32 after a pad byte" if bits == 3 else "byte shifts"
        print(f"{bits}-bit: {now} {new:.3f} ms, int32 words {old:.3f} ms, speed-up {old / new:.2f}x")
        if bits == 3:
            new = median_ms(lambda p=packed: code_values(p, 3), args.repeats)
            old = median_ms(lambda p=packed: unpack_words(p, 3).float(), args.repeats)
            print(f"3-bit float codes: code_values {new:.3f} ms, int32 words + float {old:.3f} ms, "
                  f"speed-up {old / new:.2f}x")


if __name__ == "__main__":
    main()
