"""What a quantized profile's bytes are made of, and what a coded recent window costs a decode step.

    python benchmarks/window_probe.py --profile benchmarks/results/keys-cpu/auto-rotated-prerope \
        --markdown-out benchmarks/results/keys-cpu/window8-probe.md
    python benchmarks/window_probe.py --profile benchmarks/results/keys-cpu/auto-rotated-queries --window-bits 8,6 \
        --markdown-out benchmarks/results/keys-cpu/window6-probe.md

1. Bytes: a real :class:`~minicache.MiniCache` of the profile is fed SmolLM2-135M's shapes (random
   bfloat16 keys and values, as ``window_bytes.py`` does: bytes do not depend on them) up to
   ``--prefix-length`` tokens, with an exact window and at each of ``--window-bits``
   (``quantization.window_bits``); ``memory_report()["parts"]`` in bits per cached value.
2. Time: one unmerged layer's ``update`` of a decode step (one token, views on, as the fused attention
   paths read it) with each window, in one process and alternated, so that all see the
   same machine; the window is cropped back after each step so that it keeps its size.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from window_bytes import feed  # benchmarks/ is this script's directory

from minicache import MergeProfile, MiniCache
from minicache.model_spec import ModelSpec
from minicache.models import load_model
from minicache.runtime.layers import QuantizedLayer
from minicache.runtime.rope import RopeAngles


def bits_by_part(profile: MergeProfile, config, prefix: int) -> tuple[dict[str, float], float]:
    """Bits per cached value of each memory part, and the compression, after ``prefix`` tokens (batch 1)."""
    cache = MiniCache(profile, config)
    cache.observe_attention_mask(torch.ones(1, prefix, dtype=torch.long))
    feed(cache, ModelSpec.from_config(config), prefix, torch.Generator().manual_seed(0))
    report = cache.memory_report()
    values = report["kv_bytes_full"] / 2  # bfloat16: two bytes a value
    return {part: 8 * n / values for part, n in report["parts"].items() if n}, report["compression_ratio"]


def bits_table(columns: dict[str, tuple[dict[str, float], float]]) -> list[str]:
    """Markdown rows: bits per cached value of each part, their total and the compression, one column per
    ``name -> (bits_by_part(...))``."""
    lines = ["| part | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for part in dict.fromkeys(part for bits, _ in columns.values() for part in bits):
        lines.append(f"| {part} | " + " | ".join(f"{bits.get(part, 0):.3f}" for bits, _ in columns.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(bits.values()):.3f}" for bits, _ in columns.values()) + " |")
    lines.append("| compression | " + " | ".join(f"{ratio:.3f}x" for _, ratio in columns.values()) + " |")
    return lines


def update_ms(spec, rope: RopeAngles, heads: int, dim: int, context: int, steps: int) -> float:
    """Median milliseconds of one decode step's ``update`` over ``steps`` steps, for ``spec``."""
    gen = torch.Generator().manual_seed(1)
    layer = QuantizedLayer(spec, rope=rope)
    layer.views = True
    layer.update(*(torch.randn(1, heads, context, dim, generator=gen).to(torch.bfloat16) for _ in range(2)))
    new = torch.randn(1, heads, 1, dim, generator=gen).to(torch.bfloat16)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        layer.update(new, new)
        times.append(time.perf_counter() - began)
        layer.crop(-1)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="benchmarks/results/keys-cpu/auto-rotated-prerope")
    parser.add_argument("--prefix-length", type=int, default=4096)
    parser.add_argument("--context", type=int, default=2048, help="tokens in the timed layer (default 2048)")
    parser.add_argument("--rounds", type=int, default=6, help="alternated rounds of timed steps per window")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round")
    parser.add_argument("--window-bits", default="8", help="comma-separated widths of the coded windows (default 8)")
    parser.add_argument("--markdown-out")
    args = parser.parse_args()
    widths = [int(b) for b in args.window_bits.split(",")]
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    config = model.config
    profile = MergeProfile.load(args.profile)
    if profile.quantization is None:
        parser.error(f"--profile {args.profile} stores nothing quantized")
    windows = {"exact": profile.with_quantization(dataclasses.replace(profile.quantization, window_bits=None))}
    windows.update({f"{b}-bit": profile.with_quantization(dataclasses.replace(profile.quantization, window_bits=b))
                    for b in widths})
    columns = {f"{name} window": bits_by_part(p, config, args.prefix_length) for name, p in windows.items()}
    lines = [f"`{args.profile}` on SmolLM2-135M's shapes (bfloat16, batch 1) after {args.prefix_length:,} tokens: "
             "bits per cached value by part of `memory_report()`.", "", *bits_table(columns)]
    spec = ModelSpec.from_config(config)
    heads, dim = spec.kv_shape(0)
    rope = RopeAngles.of_model(model)
    times: dict[str, list[float]] = {name: [] for name in windows}
    for _ in range(args.rounds):  # alternated: every window sees the same machine
        for name, quant in ((name, p.quantization) for name, p in windows.items()):
            # nearest rounding: the timed steps never pack (the window is cropped back), so how keys are rounded when
            # packed does not enter, and the layer needs no key weights
            layer_spec = dataclasses.replace(quant, bits=quant.bits_of(0), value_bits=quant.bits_of(0, "values"),
                                             key_rounding="nearest")
            times[name].append(update_ms(layer_spec, rope, heads, dim, args.context, args.steps))
    lines += ["", f"One layer's `update` of a decode step (layer 0's widths, {args.context:,} tokens, views on, "
              f"{torch.get_num_threads()} threads; median of {args.steps} steps, {args.rounds} alternated rounds; "
              f"min–max over rounds):", "", "| window | ms per layer and step |", "|---|---:|"]
    for name, ms in times.items():
        lines.append(f"| {name} | {statistics.median(ms):.3f} ({min(ms):.3f}–{max(ms):.3f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text + f"\nMade by `python benchmarks/window_probe.py --profile {args.profile} --window-bits "
                    f"{args.window_bits} --markdown-out {args.markdown_out}`.\n")


if __name__ == "__main__":
    main()
