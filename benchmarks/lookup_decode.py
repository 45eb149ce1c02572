"""Codes read inside real decode steps: :func:`minicache.quant.packed.code_values` against the reader it
replaced (unpack every code, then convert or look it up), alternated run by run in one process.

Usage::

    python benchmarks/lookup_decode.py --storage 2l --markdown-out benchmarks/results/keys-cpu/lookup-decode-2l.md

SmolLM2 in bfloat16 on the blockwise torch path (blocks of 512 tokens), one 2,048-token prompt, greedy
decode. ``--storage``: ``2``, ``3`` or ``4`` (rotated with 4 exact sinks), ``2l`` (``rotated-lloyd``:
uneven 2-bit levels), or a profile directory. Prints, per reader, the median seconds per decode step and
the mean milliseconds per ``code_values`` call (both readers timed the same way). Why one process:
step times on a shared 2-core machine drift by a quarter between runs; alternating readers in one
process gives both the same drift.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from lookup_probe import unpack_then_look_up  # benchmarks/ is this script's directory

import minicache.quant.packed as packed_module
from minicache import MergeProfile, MiniCache
from minicache.data import split_text, token_windows
from minicache.evaluate.bench import timed_greedy_decode
from minicache.models import load_model
from minicache.profile import Quantization
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention


def storage_profile(storage: str) -> MergeProfile:
    if Path(storage).is_dir():
        return MergeProfile.load(storage)
    scheme = "rotated-lloyd" if storage.endswith("l") else "rotated"
    return MergeProfile().with_quantization(Quantization(bits=int(storage.rstrip("l")), scheme=scheme, sink_tokens=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="2l", help="2, 3, 4, 2l (uneven 2-bit levels) or a profile directory")
    parser.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="runs per reader, alternating (default 4)")
    parser.add_argument("--markdown-out", type=Path)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dtype="bfloat16")
    ids = token_windows(split_text(Path(args.data).read_text()), tokenizer, args.context, 1)
    mask = torch.ones_like(ids)
    profile = storage_profile(args.storage)
    readers = {"unpack, then look up": unpack_then_look_up, "code_values": packed_module.code_values}
    steps: dict[str, list[float]] = {name: [] for name in readers}
    per_call: dict[str, list[float]] = {name: [] for name in readers}
    enable_fused_attention(model, backend="torch")
    try:
        for _ in range(args.rounds):
            for name, reader in readers.items():
                spent = [0.0, 0]

                def timed(*a, reader=reader, spent=spent, **k):
                    began = time.perf_counter()
                    out = reader(*a, **k)
                    spent[0] += time.perf_counter() - began
                    spent[1] += 1
                    return out

                packed_module.code_values = timed  # dequantize looks the name up in the module at each call
                run = timed_greedy_decode(model, MiniCache(profile, model), ids, args.new_tokens, mask)[0]
                steps[name].append(statistics.median(run))
                per_call[name].append(spent[0] / max(1, spent[1]) * 1e3)
                print(f"{name}: {steps[name][-1]:.4f} s/step, {per_call[name][-1]:.3f} ms per call "
                      f"({spent[1]} calls)", flush=True)
    finally:
        packed_module.code_values = readers["code_values"]
        disable_fused_attention(model)
    lines = [f"`--storage {args.storage}`: {args.context} tokens x 1, {args.new_tokens} greedy tokens, bfloat16, "
             f"blockwise torch path, {torch.get_num_threads()} threads, {args.rounds} alternating runs per reader",
             "", "| reader | s / decode step (median of runs) | ms per call (median of runs) |", "|---|---:|---:|"]
    lines += [f"| {name} | {statistics.median(steps[name]):.4f} | {statistics.median(per_call[name]):.3f} |"
              for name in readers]
    text = "\n".join(lines)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
