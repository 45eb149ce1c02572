"""Would 8-bit scales and zero points make low-bit storage smaller at the same quality? A simulation (issue 18).

A packed group stores an fp16 scale and an fp16 zero point: 32 bits per group, so 0.5 bits per value
for value groups of 64 channels and 0.25 for key groups of 128 tokens; in the 4.57x profile they are
0.363 of its 3.505 bits per value. This probe rounds both to 8 bits and measures what it costs:

* the scale as ``2^(c / 8)`` for an integer ``c`` (8 codes per octave: the step of a group grows or shrinks
  by at most 4.4 %, over 32 octaves);
* the zero point in quarter steps of that scale, ``z / 4 · scale`` for an integer ``z`` in ``[-128, 127]``
  (a group whose minimum lies more than 32 steps from zero is widened until it fits; counted).

This is the format :func:`minicache.quant.packed.encode_scales` then implemented. Codes are computed from
the rounded scale and zero point and clamped. Rows compare, at the same key/value widths, fp16 and 8-bit
scales at key groups of 128 and 64 tokens (value groups: 64 channels, or 32).

    source benchmarks/unseen_text.sh && mkdir -p /tmp/tc && write_unseen_text /tmp/tc
    .venv/bin/python benchmarks/scale_bits_probe.py

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
from minicache.quant.rotated import rotation_matrix

ZERO_STEPS = 4  # zero point resolution: quarter steps


def grouped(x: torch.Tensor, role: str, group: int) -> tuple[torch.Tensor, int]:
    b, h, t, d = x.shape
    if role == "keys":
        return x.reshape(b, h, t // group, group, d), -2
    g = min(group, d)
    return x.reshape(b, h, t, d // g, g), -1


def roundtrip(x: torch.Tensor, role: str, bits: int, group: int, mode: str, rotation: torch.Tensor,
              overflow: list[int]) -> torch.Tensor:
    """Round trip of ``x`` ``[B, H, T, D]`` through rotated uniform groups with ``mode`` scales."""
    top = (1 << bits) - 1
    g, dim = grouped(x.float() @ rotation, role, group)
    lo, hi = g.amin(dim, keepdim=True), g.amax(dim, keepdim=True)
    if mode == "fp16":
        zero = lo.half().float()
        scale = ((hi - zero) / top).half().float()
    else:
        exact = ((hi - lo) / top).clamp_min(2.0**-24)
        scale = torch.exp2(torch.round(torch.log2(exact) * 8) / 8)
        z = torch.round(lo / scale * ZERO_STEPS)
        wide = (z < -128) | (z > 127)
        overflow[0] += int(wide.sum())
        overflow[1] += wide.numel()
        # a group whose minimum is too far from zero: a coarser scale until it fits (the range is kept)
        need = (lo.abs() * ZERO_STEPS / 127.5).clamp_min(scale)
        scale = torch.where(wide, torch.exp2(torch.ceil(torch.log2(need) * 8) / 8), scale)
        z = torch.round(lo / scale * ZERO_STEPS).clamp(-128, 127)
        zero = z / ZERO_STEPS * scale
    codes = torch.where(scale > 0, (g - zero) / torch.where(scale > 0, scale, 1.0), 0.0).round().clamp(0, top)
    return ((codes * scale + zero).reshape(x.shape) @ rotation.T).to(x.dtype)


def scale_bits_per_value(role: str, group: int, head_dim: int, scale_bits: int) -> float:
    return 2 * scale_bits / (group if role == "keys" else min(group, head_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_window_options(parser)
    parser.add_argument("--anchors", default="3/3,3/2,2/2", help="key/value widths")
    parser.add_argument("--variants", default="16/128/64,8/128/64,16/64/64,8/64/64,8/64/32",
                        help="scale bits (16: fp16, 8) / key group (tokens) / value group (channels)")
    parser.add_argument("--out", default="benchmarks/results/keys-cpu/scale-bits-probe.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    d = model.config.head_dim
    rotation = rotation_matrix(d)
    evals = unseen_windows(args, tok)
    span = slice(args.sinks, args.prefix - args.window)
    prefixes = reference_prefixes(model, evals, args.prefix)

    lines = [f"Simulation (round trip of the cached prefix in place; nothing stores less): SmolLM2-135M-Instruct, "
             f"float32, rotated groups, {evals.shape[0]} windows of {args.prefix} prefix + {args.continuation} scored "
             f"tokens ({evals.shape[0] * args.continuation} scored) over {args.unseen}; sinks {args.sinks}, exact "
             f"window {args.window}. Bits per value: codes + scales and zero points of the packed tokens.", "",
             "| keys/values bits | key group | value group | scales | bits per packed value | ppl increase [95 %] "
             "| KL | top-1 | zero points widened |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|"]
    for anchor in args.anchors.split(","):
        kb, vb = (int(x) for x in anchor.split("/"))
        for variant in args.variants.split(","):
            sbits, kg, vg = (int(x) for x in variant.split("/"))
            mode = "fp16" if sbits == 16 else "8-bit"
            inner = packed_span(span, 128)
            overflow = [0, 0]

            def rounded(cache, kb=kb, vb=vb, kg=kg, vg=vg, mode=mode, inner=inner, overflow=overflow):
                out = copy.deepcopy(cache)
                for lay in out.layers:
                    lay.keys[:, :, inner] = roundtrip(lay.keys[:, :, inner], "keys", kb, kg, mode, rotation, overflow)
                    lay.values[:, :, inner] = roundtrip(lay.values[:, :, inner], "values", vb, vg, mode, rotation,
                                                        overflow)
                return out

            row = score_variant(model, prefixes, args.prefix, rounded)
            inc, low, high = row["ppl_increase"], row["low"], row["high"]
            bits = (kb + vb) / 2 + (scale_bits_per_value("keys", kg, d, sbits)
                                    + scale_bits_per_value("values", vg, d, sbits)) / 2
            widened = f"{overflow[0]} of {overflow[1]}" if overflow[1] else "–"
            lines.append(f"| {kb}/{vb} | {kg} | {vg} | {mode} | {bits:.3f} | {100 * inc:+.2f} % "
                         f"[{100 * low:+.2f}..{100 * high:+.2f}] | {row['kl']:.4f} | {100 * row['top1']:.1f} % | "
                         f"{widened} |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n\nCommand: `.venv/bin/python benchmarks/scale_bits_probe.py`\n")


if __name__ == "__main__":
    main()
