"""What a profile's cache holds, part by part, after one prefill of batch 1 (no batch to share its tensors).

    python benchmarks/cache_parts.py --profile profiles/smollm2-135m-instruct-lowrank --tokens 512 --dtype bfloat16

Prints ``memory_report()``'s compression and parts, and the compression without the profile's shared
tensors (bases, alignment, rotations, RoPE frequencies), i.e. what it tends to when a large batch
shares them. The text is the README's held-out licences (Debian's Apache-2.0, GPL-2, LGPL-2.1).
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from minicache import MiniCache
from minicache.models import load_model

#: Parts held once for a whole batch besides the methods' tensors (as ``memory_report`` counts them).
SHARED_PARTS = ("rotations", "levels", "rope")
LICENCES = ("Apache-2.0", "GPL-2", "LGPL-2.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", required=True, help="profile directory (repeatable)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", dtype=getattr(torch, args.dtype))
    text = "".join(pathlib.Path("/usr/share/common-licenses", name).read_text() for name in LICENCES)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    for profile in args.profile:
        cache = MiniCache.from_pretrained(profile, model)
        with torch.no_grad():
            model(input_ids=ids, cache=cache)
        report = cache.memory_report()
        parts = report["parts"]
        methods = {c.method.tensor_part for store in cache.stores for c in store.components.values()}
        shared = sum(n for part, n in parts.items() if part in methods or part in SHARED_PARTS)
        print(f"{profile} ({args.dtype}, {ids.shape[1]} tokens, batch 1): compression "
              f"{report['compression_ratio']:.4f}x, {report['kv_bytes'] / 2**20:.3f} MiB of which "
              f"{shared / 2**20:.3f} MiB shared tensors; without them "
              f"{report['kv_bytes_full'] / (report['kv_bytes'] - shared):.4f}x")
        print("  MiB by part:", {part: round(n / 2**20, 3) for part, n in parts.items() if n})


if __name__ == "__main__":
    main()
