"""Blockwise decode attention of a merged group packed rotated: the packing's frame against rotating every block back.

SmolLM2-135M-Instruct (bf16) with the shipped merge profile packed ``--bits``-bit ``rotated`` (its groups 25–26 and
27–29 store SLERP directions rotated), prefilled with ``--tokens`` tokens of GPL-3; then, for every member layer of a
merged group, one decode query against the layer's views, attended by
:func:`~minicache.runtime.blockwise.blockwise_decode_attention` two ways, alternated call by call:

* ``each block rotated back``: the views as stored (what the blockwise path did before 2026-12-07: every
  packed block dequantized and rotated back, ``x Rᵀ``, before it is scored and summed);
* ``in the packing's frame``: :func:`~minicache.runtime.kernels.support.in_packing_frame` first (the dense tail
  rotated in, the query rotated once and the output back once), as ``decode_views`` reads them now.

Prints the median milliseconds per call of each, summed over the member layers, their ratio, and the largest
difference between the two outputs (float rounding only: both read the same codes).

    PYTHONPATH=. .venv/bin/python benchmarks/rotated_group_decode.py [--bits 3] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from minicache import MergeProfile, MiniCache
from minicache.data import split_text, token_windows
from minicache.models import load_model
from minicache.profile import Quantization
from minicache.runtime.blockwise import blockwise_decode_attention
from minicache.runtime.kernels.support import in_packing_frame

SHIPPED = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=40, help="timed calls per way and layer")
    parser.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--markdown-out")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16)
    profile = MergeProfile.load(SHIPPED).with_quantization(Quantization(bits=args.bits, scheme="rotated"))
    ids = token_windows(split_text(Path(args.data).read_text()), tokenizer, args.tokens, 1)
    cache = MiniCache(profile, model)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, logits_to_keep=1)
    members = [layer for group in profile.groups for layer in group.layers]
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    generator = torch.Generator().manual_seed(0)
    times = {"each block rotated back": [], "in the packing's frame": []}
    worst = 0.0
    with torch.inference_mode():
        for layer in members:
            keys, values = cache.views(layer)[:2]
            assert keys.qdirection is not None and keys.qdirection.rotation is not None, "a rotated packed group"
            query = torch.randn(1, heads, 1, d, generator=generator).to(torch.bfloat16)
            ways = {"each block rotated back": lambda q=query, k=keys, v=values: blockwise_decode_attention(q, k, v),
                    "in the packing's frame": lambda q=query, k=keys, v=values: blockwise_decode_attention(
                        q, in_packing_frame(k), in_packing_frame(v))}
            outs = {name: way() for name, way in ways.items()}  # warm-up
            worst = max(worst, (outs["each block rotated back"].float() - outs["in the packing's frame"].float())
                        .abs().max().item())
            per_layer = {name: [] for name in ways}
            for _ in range(args.calls):
                for name, way in ways.items():  # alternated: drift slows both alike
                    start = time.perf_counter()
                    way()
                    per_layer[name].append(time.perf_counter() - start)
            for name in ways:
                times[name].append(statistics.median(per_layer[name]))
    before, after = (sum(times[name]) * 1e3 for name in times)
    lines = [
        f"SmolLM2-135M-Instruct, bf16, shipped profile ({len(members)} merged layers, {kv_heads} KV heads) packed "
        f"{args.bits}-bit rotated, {args.tokens} tokens, {torch.get_num_threads()} threads; median of {args.calls} "
        "calls per layer, ways alternated, summed over the merged layers",
        "",
        "| blockwise decode attention | ms per step (merged layers) |",
        "|---|---:|",
        f"| each block rotated back | {before:.2f} |",
        f"| in the packing's frame | {after:.2f} |",
        "",
        f"speed-up {before / after:.2f}x; largest output difference {worst:.2e} (bf16 outputs)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text)


if __name__ == "__main__":
    main()
