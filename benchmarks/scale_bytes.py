"""What 8-bit scales and zero points save, counted by a real cache: bits per cached value by part.

    python benchmarks/scale_bytes.py --profile benchmarks/results/keys-cpu/auto-rotated-scale8 \
        --markdown-out benchmarks/results/keys-cpu/scale8-bytes.md

A :class:`~minicache.MiniCache` of each variant of the profile's storage is fed SmolLM2-135M's shapes (random
bfloat16 keys and values, as ``window_bytes.py`` does: bytes do not depend on them) up to ``--prefix-length``
tokens; ``memory_report()["parts"]`` in bits per cached value. Variants: the profile's widths with fp16 or
8-bit scales (``quantization.scale_bits``) at key groups of 128 and 64 tokens.
"""

from __future__ import annotations

import argparse
import dataclasses

from window_probe import bits_by_part, bits_table  # benchmarks/ is this script's directory

from minicache import MergeProfile
from minicache.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="benchmarks/results/keys-cpu/auto-rotated-scale8")
    parser.add_argument("--prefix-length", type=int, default=4096)
    parser.add_argument("--markdown-out")
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    profile = MergeProfile.load(args.profile)
    if profile.quantization is None:
        parser.error(f"--profile {args.profile} stores nothing quantized")
    variants = {f"group {g}, {'8-bit' if s else 'fp16'} scales": (g, s) for g in (128, 64) for s in (None, 8)}
    columns = {}
    for name, (group, scale_bits) in variants.items():
        quant = dataclasses.replace(profile.quantization, group_size=group, scale_bits=scale_bits)
        columns[name] = bits_by_part(profile.with_quantization(quant), model.config, args.prefix_length)
    lines = [f"`{args.profile}`'s widths ({profile.quantization.describe()}) on SmolLM2-135M's shapes (bfloat16, "
             f"batch 1) after {args.prefix_length:,} tokens: bits per cached value by part of `memory_report()`.", "",
             *bits_table(columns)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text + f"\nMade by `python benchmarks/scale_bytes.py --profile {args.profile} --markdown-out "
                    f"{args.markdown_out}`.\n")


if __name__ == "__main__":
    main()
