"""Markdown table of the minicache-eval JSON files written by benchmarks/quantized_results.sh."""

import json
import pathlib
import sys

ROWS = (
    ("full", "full (DynamicCache)"),
    ("4bit", "4-bit"),
    ("2bit", "2-bit"),
    ("2bit-g64", "2-bit"),
    ("minicache", "MiniCache (paper preset)"),
    ("minicache-4bit", "MiniCache + 4-bit"),
    ("minicache-2bit", "MiniCache + 2-bit"),
    ("shipped", "MiniCache (shipped profile)"),
    ("shipped-4bit", "MiniCache (shipped profile) + 4-bit"),
    ("quantized-cache-fp8", "QuantizedCache fp8"),
    ("quantized-cache-quanto-4bit", "QuantizedCache quanto 4-bit"),
    ("quantized-cache-quanto-2bit", "QuantizedCache quanto 2-bit"),
    ("quantized-cache-hqq-4bit", "QuantizedCache HQQ 4-bit"),
    ("quantized-cache-hqq-2bit", "QuantizedCache HQQ 2-bit"),
)


def main(out: str) -> None:
    out_dir = pathlib.Path(out)
    print("| cache | ppl increase | KL mean | top-1 agreement | compression |")
    print("| --- | ---: | ---: | ---: | ---: |")
    first = None
    for name, label in ROWS:
        path = out_dir / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        first = first or r
        if "kv_bits" in r:
            label += f" (group {r['kv_group_size']})"
        print(
            f"| {label} | {r['ppl_increase']:+.2%} | {r['kl_mean']:.4f} | {r['top1_agreement']:.2%} "
            f"| {r['compression_ratio']:.2f}x |"
        )
    if first:
        print(
            f"\n{first['dtype']}, {first['windows']} windows x ({first['prefix_length']} prefix + "
            f"{first['continuation_length']} scored tokens); compression after the prefix."
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quantized-cpu")
