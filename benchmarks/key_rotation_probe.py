"""Do pre-RoPE keys need the rotation? A simulation (issue 18).

Keys packed before RoPE (``quantization.pre_rope_keys``) cannot be attended in the rotated frame: every
decode step rotates each packed key back (a ``[n, D] × [D, D]`` product per block) before RoPE is put
back, which is most of what makes pre-RoPE profiles slower than 4-bit KIVI on the blockwise torch path.
Per-channel key groups already follow each channel's range, and before RoPE a channel keeps its range
from token to token (KVQuant, arXiv 2401.18079, packs pre-RoPE keys per channel without a rotation). This
probe rounds the cached prefix's keys through the runtime's own packing (:func:`minicache.quant.packed.quantize`,
key groups of ``--key-group`` tokens, 8-bit scales) with and without the rotation, before and after RoPE,
values packed rotated at ``--value-bits`` (the same in every row), and scores the continuation.

    source benchmarks/unseen_text.sh && mkdir -p /tmp/tc && write_unseen_text /tmp/tc
    .venv/bin/python benchmarks/key_rotation_probe.py

A simulation: the prefix is rounded and restored in place; nothing stores less.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transform_coding_probe import (  # benchmarks/ is this directory
    add_window_options,
    packed_span,
    reference_prefixes,
    score_variant,
    unseen_windows,
)

from minicache.models import load_model
from minicache.quant.packed import quantize
from minicache.quant.rotated import rotation_matrix
from minicache.runtime.rope import RopeAngles

#: (label, rotated, pre-RoPE) per key packing.
KEY_PACKINGS = (("rotated, after RoPE", True, False), ("rotated, before RoPE", True, True),
                ("not rotated, before RoPE", False, True), ("not rotated, after RoPE", False, False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_window_options(parser)
    parser.add_argument("--key-bits", default="3,2")
    parser.add_argument("--value-bits", type=int, default=3)
    parser.add_argument("--key-group", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/keys-cpu/key-rotation-probe.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    d = model.config.head_dim
    rotation = rotation_matrix(d)
    angles = RopeAngles.of_model(model)
    evals = unseen_windows(args, tok)
    inner = packed_span(slice(args.sinks, args.prefix - args.window), args.key_group)
    prefixes = reference_prefixes(model, evals, args.prefix)

    def values_rounded(v: torch.Tensor) -> torch.Tensor:
        return quantize(v, args.value_bits, d, "channels", rotation, scale_bits=8).dequantize(v.dtype)

    def keys_rounded(k: torch.Tensor, bits: int, rotated: bool, pre_rope: bool) -> torch.Tensor:
        x = angles.remove(k, inner.start) if pre_rope else k.float()
        x = quantize(x, bits, args.key_group, "tokens", rotation if rotated else None, scale_bits=8).dequantize(
            torch.float32)
        return (angles.apply(x, inner.start) if pre_rope else x).to(k.dtype)

    lines = [f"Simulation (round trip of the cached prefix in place; nothing stores less): SmolLM2-135M-Instruct, "
             f"float32, {evals.shape[0]} windows of {args.prefix} prefix + {args.continuation} scored tokens "
             f"({evals.shape[0] * args.continuation} scored) over {args.unseen}; sinks {args.sinks}, exact window "
             f"{args.window}; key groups of {args.key_group} tokens, values {args.value_bits}-bit rotated per token, "
             "8-bit scales. Every row has the same bytes at its key width.", "",
             "| key bits | keys packed | ppl increase [95 %] | KL | top-1 |", "|---:|---|---|---:|---:|"]
    for bits in (int(b) for b in args.key_bits.split(",")):
        for label, rotated, pre_rope in KEY_PACKINGS:
            def rounded(cache, bits=bits, rotated=rotated, pre_rope=pre_rope):
                out = copy.deepcopy(cache)
                for lay in out.layers:
                    lay.keys[:, :, inner] = keys_rounded(lay.keys[:, :, inner], bits, rotated, pre_rope)
                    lay.values[:, :, inner] = values_rounded(lay.values[:, :, inner])
                return out

            row = score_variant(model, prefixes, args.prefix, rounded)
            lines.append(f"| {bits} | {label} | {100 * row['ppl_increase']:+.2f} % [{100 * row['low']:+.2f}.."
                         f"{100 * row['high']:+.2f}] | {row['kl']:.4f} | {100 * row['top1']:.1f} % |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n\nCommand: `.venv/bin/python benchmarks/key_rotation_probe.py`\n")


if __name__ == "__main__":
    main()
