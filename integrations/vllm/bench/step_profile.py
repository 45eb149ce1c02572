"""Where a decode step of the vLLM plugin's reference path spends its time (no engine: the paged stores
alone, as the plugin's attention drives them, and the attention of the step's query tokens).

    .venv-vllm/bin/python integrations/vllm/bench/step_profile.py [--quantized] [--tokens 1024] [--steps 20] \
        [--decode auto|blockwise|restore] [--requests 1] [--one-at-a-time]

``--requests`` requests (request ``i`` of ``--tokens − 37 i`` tokens, prefilled at once), then ``--steps``
decode steps, each request one token per step, their decode rows attended together as the plugin does
(``minicache_vllm.attention.decode_attention``; ``--one-at-a-time``: each request alone), through every
store of SmolLM2 with the shipped profile (``--quantized``: plus 4-bit KIVI with 4 exact sinks and
pre-RoPE keys, as ``benchmarks/vllm_decode.sh``'s ``shipped-4bit``), bfloat16, pages of 128 tokens.
``--decode`` picks the plugin's decode path (``MergedAttention``'s ``decode``): ``restore`` restores
each layer's whole prefix and runs SDPA; ``blockwise`` reads the stores as views a block at a time;
``auto`` (the plugin's default) reads merged groups blockwise and restores packed unmerged layers.
Prints the time per step and the share of it (cumulative, from cProfile) spent in each part.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minicache_vllm.attention import DecodeRow, decode_attention
from minicache_vllm.models import plan_stores
from minicache_vllm.paged import DECODE_PATHS, PagedGroup, reads_blockwise, reads_fused
from minicache_vllm.quantized import PagedQuantizedLayer
from minicache_vllm.windows import WindowPool

from minicache import MergeProfile, MiniCache
from minicache.models import load_model
from minicache.profile import Quantization
from minicache.runtime.store import GroupStore

PAGE, HEADS, QUERY_HEADS, HEAD_DIM, DTYPE = 128, 3, 9, 64, torch.bfloat16
#: (part, [(file suffix, function name, caller's file suffix or None)]): cumulative time of those calls
PARTS = [
    ("restore merged prefix (method decode)", [("runtime/views.py", "restored_block", None)]),
    ("  of which dequantize", [("quant/packed.py", "dequantize", None)]),
    ("put RoPE back on pre-RoPE keys", [("runtime/rope.py", "apply", None)]),
    ("read and parse pages", [("minicache_vllm/layout.py", "read", None),
                              ("minicache_vllm/layout.py", "read_fields", "minicache_vllm/quantized.py")]),
    ("write pages", [("minicache_vllm/layout.py", "write", None),
                     ("minicache_vllm/layout.py", "write_fields", "minicache_vllm/quantized.py")]),
    ("merge (tail re-merge and new units)", [("runtime/store.py", "merge", None)]),
    ("blockwise attention (restores included)", [("runtime/blockwise.py", "blockwise_decode_attention", None)]),
    ("a group's rows read into one batch", [("minicache_vllm/paged.py", "stacked_views", None)]),
    ("a packed layer's rows restored as one batch", [("minicache_vllm/quantized.py", "restored_rows", None)]),
    ("a packed layer's rows read as one batch", [("minicache_vllm/quantized.py", "stacked_views", None)]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantized", action="store_true", help="add 4-bit KIVI, 4 sinks, pre-RoPE keys")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--decode", choices=tuple(DECODE_PATHS), default="auto",
                        help="the plugin's decode path (MINICACHE_VLLM_DECODE; default: auto, the plugin's default)")
    parser.add_argument("--requests", type=int, default=1,
                        help="requests decoding together (request i has --tokens - 37 i tokens; default 1)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="attend each request's decode row alone (the plugin before 2026-12-05), not batched")
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m")
    profile = MergeProfile.load("profiles/smollm2-135m-instruct")
    if args.quantized:
        profile = profile.with_quantization(
            Quantization(bits=4, group_size=128, residual_length=128, sink_tokens=4, pre_rope_keys=True))
    stores = []
    per_request = -(-(args.tokens + 2 * args.steps) // PAGE) + 1
    for plan in plan_stores(MiniCache(profile, model.config), HEADS, HEAD_DIM, DTYPE):
        pages = torch.zeros(per_request * args.requests, plan.layout.units_per_page(PAGE) * plan.layout.unit_bytes,
                            dtype=torch.uint8)
        pool = WindowPool(args.requests, len(plan.layers), HEADS, HEAD_DIM, plan.window_tokens, DTYPE,
                          bits=plan.window_bits)
        kind = PagedGroup if isinstance(plan.template, GroupStore) else PagedQuantizedLayer
        stores.append(kind(plan.template, plan.layout, pool, PAGE, lambda p=pages: p))
    tables = torch.arange(per_request * args.requests).view(args.requests, per_request)
    generator = torch.Generator().manual_seed(0)
    before = [0] * args.requests

    blockwise = reads_blockwise(args.decode)
    fused = reads_fused(args.decode, torch.device("cpu"))

    def step(sizes: list[int]) -> None:
        for store in stores:
            store.begin_step()
            for member in range(store.members):
                rows = []
                for r, n in enumerate(sizes):
                    kv = torch.randn(2, HEADS, n, HEAD_DIM, generator=generator).to(DTYPE)
                    if n > 1:  # the prefill: only the stores matter here
                        store.member_kv(member, r, tables[r], before[r], kv)
                        continue
                    query = torch.randn(1, QUERY_HEADS, 1, HEAD_DIM, generator=generator).to(DTYPE)
                    rows.append(DecodeRow(r, tables[r], before[r], kv, query))
                if rows and args.one_at_a_time:
                    for row in rows:
                        decode_attention(store, member, [row], blockwise, HEAD_DIM**-0.5, fused)
                elif rows:
                    decode_attention(store, member, rows, blockwise, HEAD_DIM**-0.5, fused)
            store.end_step([(r, tables[r], before[r], before[r] + n) for r, n in enumerate(sizes)])
        for r, n in enumerate(sizes):
            before[r] += n

    step([max(2, args.tokens - 37 * r) for r in range(args.requests)])
    ones = [1] * args.requests
    start = time.perf_counter()
    for _ in range(args.steps):
        step(ones)
    plain = (time.perf_counter() - start) / args.steps
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step(ones)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[3] for k, v in stats.items() if k[2] == "step")
    layers = sum(store.members for store in stores)
    print(f"{'shipped + 4-bit' if args.quantized else 'shipped'}: {len(stores)} stores over {layers} layers, "
          f"{args.tokens} tokens, torch {torch.get_num_threads()} thread(s), decode {args.decode}")
    how = "one at a time" if args.one_at_a_time else "batched"
    print(f"decode step (all stores and their attention, {args.requests} request(s), {how}): "
          f"{plain * 1e3:.1f} ms unprofiled")
    for part, functions in PARTS:
        spent = 0.0
        for file, name, caller in functions:
            for (path, _, function), (_, _, _, cumulative, callers) in stats.items():
                if not (path.endswith(file) and function == name):
                    continue
                if caller is None:
                    spent += cumulative
                else:  # only the calls from that file (the others are inside a part already counted)
                    spent += sum(c[3] for where, c in callers.items() if where[0].endswith(caller))
        print(f"  {part:<40} {spent / total:6.1%}")


if __name__ == "__main__":
    main()
