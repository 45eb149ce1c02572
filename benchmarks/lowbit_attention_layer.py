"""Blockwise decode attention of one unmerged packed layer (issue 18's stores), without the model around it.

One layer of ``--tokens`` random bf16 keys and values (3 KV heads, 9 query heads, D = 64: SmolLM2's
shape), packed as each store packs it; prints the median milliseconds of
:func:`~minicache.runtime.blockwise.blockwise_decode_attention` (medians of 5 × 10 calls). What a
store's layout costs attention alone; ``lowbit_decode.py`` measures whole decode steps.

    PYTHONPATH=. .venv/bin/python benchmarks/lowbit_attention_layer.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minicache.profile import Quantization
from minicache.runtime.blockwise import blockwise_decode_attention
from minicache.runtime.layers import QuantizedLayer
from minicache.runtime.rope import RopeAngles

STORES = {
    "4-bit kivi": Quantization(bits=4),
    "3-bit rotated": Quantization(bits=3, scheme="rotated"),
    "3-bit rotated + 4 sinks": Quantization(bits=3, scheme="rotated", sink_tokens=4),
    "3-bit rotated + keys pre-RoPE": Quantization(bits=3, scheme="rotated", pre_rope_keys=True),
    "3-bit rotated + 4 sinks + keys pre-RoPE": Quantization(bits=3, scheme="rotated", sink_tokens=4,
                                                            pre_rope_keys=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    rope = RopeAngles(10000.0 ** -(torch.arange(32) / 32))
    k, v = (torch.randn(1, 3, args.tokens, 64, dtype=torch.bfloat16) for _ in range(2))
    query = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)
    print(f"| store | ms per call ({args.tokens} tokens, one layer) |\n|---|---:|")
    for name, quant in STORES.items():
        layer = QuantizedLayer(quant, rope=rope if quant.pre_rope_keys else None)
        layer.update(k, v)
        keys, values = layer.views_of()
        for _ in range(3):
            blockwise_decode_attention(query, keys, values)
        medians = []
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(10):
                blockwise_decode_attention(query, keys, values)
            medians.append((time.perf_counter() - began) / 10 * 1e3)
        print(f"| {name} | {statistics.median(medians):.2f} |")


if __name__ == "__main__":
    main()
