"""Compression of quantized storage while decoding, not only at the prefix end: the exact window moves.

    python benchmarks/window_bytes.py --compare none@rotated:3/64+s4+prerope,none@rotated:3/64+s4+r0+prerope

An unmerged quantized layer holds its newest tokens exact: at least ``residual_length`` (R) of them, and
up to R + chunk - 1 while a key group fills (a chunk is ``group_size`` tokens for per-channel keys).
``minicache-eval`` reads the cache's bytes at the prefix end; with a 4,096-token prefix and
4,096 - R a whole number of chunks that is the window's smallest moment. This script feeds a real
:class:`~minicache.MiniCache` the shapes of SmolLM2-135M (random bfloat16 keys and values: bytes do not
depend on them), one token at a time after the prefix, and prints the compression at the prefix end
and its mean, smallest and largest over the decode steps, as ``memory_report()`` counts them.
"""

from __future__ import annotations

import argparse

import torch

from minicache import MiniCache
from minicache.evaluate.compare import MethodSpec, parse_methods
from minicache.model_spec import ModelSpec
from minicache.models import load_model
from minicache.runtime.memory import cache_bytes


def feed(cache: MiniCache, model: ModelSpec, n: int, generator: torch.Generator) -> None:
    """Append ``n`` tokens of random bfloat16 keys and values (batch 1) to every layer of ``cache``."""
    for layer in range(model.num_layers):
        heads, dim = model.kv_shape(layer)
        k, v = (torch.randn(1, heads, n, dim, generator=generator).to(torch.bfloat16) for _ in range(2))
        cache.update(k, v, layer)


def decode_compression(spec: MethodSpec, config, prefix: int, steps: int) -> dict[str, float]:
    """Compression at the prefix end and over ``steps`` single-token appends after it (batch 1)."""
    profile, _ = spec.build(config)
    cache = MiniCache(profile, config)
    model = ModelSpec.from_config(config)
    gen = torch.Generator().manual_seed(0)
    cache.observe_attention_mask(torch.ones(1, prefix, dtype=torch.long))
    feed(cache, model, prefix, gen)
    ratios = []
    held, full = cache_bytes(cache)
    at_prefix = full / held
    for _ in range(steps):
        feed(cache, model, 1, gen)
        held, full = cache_bytes(cache)
        ratios.append(full / held)
    t = torch.tensor(ratios, dtype=torch.float64)
    return {"prefix_end": at_prefix, "decode_mean": t.mean().item(), "decode_min": t.min().item(),
            "decode_max": t.max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", required=True, help="methods as minicache-eval --compare takes them")
    parser.add_argument("--prefix-length", type=int, default=4096)
    parser.add_argument("--decode-steps", type=int, default=256,
                        help="single-token appends after the prefix (a multiple of every chunk: whole cycles)")
    parser.add_argument("--markdown-out", help="also write the table here")
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    lines = [f"Compression of SmolLM2-135M's KV cache (bfloat16, batch 1): at the end of a "
             f"{args.prefix_length:,}-token prefix and over the next {args.decode_steps:,} decode steps.", "",
             "| method | at prefix end | decode mean | decode min | decode max |",
             "| :--- | ---: | ---: | ---: | ---: |"]
    for spec in parse_methods(args.compare):
        r = decode_compression(spec, model.config, args.prefix_length, args.decode_steps)
        lines.append(f"| `{spec.label}` | {r['prefix_end']:.3f}x | {r['decode_mean']:.3f}x | {r['decode_min']:.3f}x | "
                     f"{r['decode_max']:.3f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
