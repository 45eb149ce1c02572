#!/usr/bin/env python
"""Fused decode attention (Triton) over the packings of issue 18, against 4-bit KIVI in the same run.

One unmerged layer of a Llama-3-8B shape (32 query heads, 8 KV heads, D = 128, bf16) holding
``--context`` tokens, packed as each store packs it (:class:`~minicache.runtime.layers.QuantizedLayer`,
random data): 4-bit KIVI (the baseline), 3-bit KIVI, 3-bit rotated, 3-bit rotated with 4 exact sinks,
keys 4 / values 3 bits rotated, and 3-bit rotated with keys packed before RoPE (+ sinks). Times the
kernel with CUDA events (median, L2 flushed before each run, as ``kernel_bench.py``), checks each
store's output against the blockwise torch path, and prints the speed ratio to 4-bit KIVI and to
SDPA over the full bf16 cache. ``--reduced``: tiny shapes through Triton's interpreter on CPU (checks
this script, not the GPU).

    python benchmarks/lowbit_kernel_bench.py --out benchmarks/results/gpu-h200/lowbit-kernels.json
    TRITON_INTERPRET=1 python benchmarks/lowbit_kernel_bench.py --reduced --out /tmp/lowbit-kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.kernel_bench import Timer, command_line, sdpa  # noqa: E402
from minicache.profile import Quantization  # noqa: E402
from minicache.runtime.blockwise import blockwise_decode_attention  # noqa: E402
from minicache.runtime.kernels import why_unusable  # noqa: E402
from minicache.runtime.layers import QuantizedLayer  # noqa: E402
from minicache.runtime.rope import RopeAngles  # noqa: E402

STORES = {
    "4-bit kivi": Quantization(bits=4),
    "3-bit kivi": Quantization(bits=3),
    "3-bit rotated": Quantization(bits=3, scheme="rotated"),
    "3-bit rotated + 4 sinks": Quantization(bits=3, scheme="rotated", sink_tokens=4),
    "keys 4 / values 3 rotated + 4 sinks": Quantization(bits=4, value_bits=3, scheme="rotated", sink_tokens=4),
    "3-bit rotated + keys pre-RoPE": Quantization(bits=3, scheme="rotated", pre_rope_keys=True),
    "3-bit rotated + 4 sinks + keys pre-RoPE": Quantization(bits=3, scheme="rotated", sink_tokens=4,
                                                            pre_rope_keys=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.reduced else "cuda")
    reason = why_unusable(device, allow_interpreter=args.reduced)
    if reason:
        print(f"the kernel cannot run here: {reason}")
        return 2
    q_heads, kv_heads, d = (4, 2, 64) if args.reduced else (32, 8, 128)
    batches = args.batches or ([1] if args.reduced else [1, 16])
    context = args.context or (200 if args.reduced else 4096)
    repeats = args.repeats or (2 if args.reduced else 20)
    timer = Timer(device, repeats, warmup=1 if args.reduced else 3)
    dtype = torch.bfloat16
    rope = RopeAngles(500000.0 ** -(torch.arange(d // 2, dtype=torch.float32) / (d // 2)))
    from minicache.runtime.kernels.decode import fused_decode_attention

    rows = []
    for batch in batches:
        g = torch.Generator(device="cpu").manual_seed(batch)
        k, v = (torch.randn(batch, kv_heads, context, d, generator=g).to(device, dtype) for _ in range(2))
        query = torch.randn(batch, q_heads, 1, d, generator=g).to(device, dtype)
        full_ms = timer(lambda query=query, k=k, v=v: sdpa(query, k, v))
        base_ms = None
        for name, quant in STORES.items():
            if args.reduced:  # small groups and window, so that tiny shapes pack most tokens
                quant = replace(quant, group_size=32, residual_length=16)
            layer = QuantizedLayer(quant, rope=rope if quant.pre_rope_keys else None)
            layer.update(k, v)
            if layer.quantized_length < context // 2:
                raise SystemExit(f"{name}: only {layer.quantized_length} of {context} tokens packed")
            keys, values = layer.views_of()
            got = fused_decode_attention(query, keys, values)
            want = blockwise_decode_attention(query, keys, values)
            error = float((got.float() - want.float()).abs().max())
            ms = timer(lambda query=query, keys=keys, values=values: fused_decode_attention(query, keys, values))
            base_ms = ms if base_ms is None else base_ms
            row = {"batch": batch, "context": context, "store": name, "ms": ms, "speed_vs_kivi4": base_ms / ms,
                   "speed_vs_sdpa_full": full_ms / ms, "sdpa_full_ms": full_ms, "max_abs_diff_vs_blockwise": error}
            rows.append(row)
            print(f"B={batch:>3} {name:<42} {ms:8.3f} ms  vs 4-bit KIVI {base_ms / ms:5.2f}  "
                  f"vs SDPA full {full_ms / ms:5.2f}  |fused - blockwise| {error:.1e}")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "shape": {"q_heads": q_heads, "kv_heads": kv_heads, "head_dim": d},
              "dtype": "bfloat16", "command": command_line(), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    bad = [r for r in rows if r["max_abs_diff_vs_blockwise"] > 5e-2]
    if bad:
        print(f"{len(bad)} stores differ from the blockwise path by more than 5e-2")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
