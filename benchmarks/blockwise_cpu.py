#!/usr/bin/env python
"""CPU decode speed of the torch blockwise path (enable_fused_attention(backend="torch")) against the
default torch path (restore the whole layer, then sdpa) and the full cache, on SmolLM2-135M-Instruct.

Same prompt, same cache settings, greedy; checks that both MiniCache paths produce the same tokens.
Prints one JSON object (medians of --repeats, interleaved).

    python benchmarks/blockwise_cpu.py --context 2048 --batch 4 --kv-bits 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minicache import MergeProfile, MiniCache  # noqa: E402
from minicache.models import load_model  # noqa: E402
from minicache.profile import Quantization  # noqa: E402
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-bits", type=int, choices=[2, 4], default=4)
    p.add_argument("--profile", default="paper", help="'paper' or a profile path")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    base = MergeProfile.preset("paper", model.config) if args.profile == "paper" else MergeProfile.load(args.profile)
    profile = base.with_quantization(Quantization(bits=args.kv_bits))
    text = Path("/usr/share/common-licenses/GPL-2").read_text() * 4
    ids = tok(text, return_tensors="pt").input_ids[:, : args.context].repeat(args.batch, 1)
    mask = torch.ones_like(ids)

    def run(make_cache):
        cache = make_cache()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=args.decode_tokens + 1,
                             min_new_tokens=args.decode_tokens + 1, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, out[:, args.context :]

    def prefill_time(make_cache):
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, cache=make_cache(), logits_to_keep=1)
            return time.perf_counter() - start

    methods = {
        "full": (None, lambda: None),
        "torch_path": (None, lambda: MiniCache(profile, model)),
        "blockwise": ("torch", lambda: MiniCache(profile, model)),
    }
    times = {name: [] for name in methods}
    tokens = {}
    for _ in range(args.repeats):
        for name, (backend, make) in methods.items():
            if backend:
                enable_fused_attention(model, backend=backend)
            total, out = run(make)
            pre = prefill_time(make)
            if backend:
                disable_fused_attention(model)
            times[name].append((total - pre) / args.decode_tokens)
            tokens[name] = out
    decode = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "command": " ".join(["python", *sys.argv]),
        "context": args.context, "batch": args.batch, "kv_bits": args.kv_bits, "profile": args.profile,
        "threads": args.threads, "decode_s_per_step": decode,
        "decode_speed_vs_torch_path": decode["torch_path"] / decode["blockwise"],
        "decode_speed_vs_full": {k: decode["full"] / v for k, v in decode.items()},
        "same_tokens_blockwise_vs_torch_path": bool(torch.equal(tokens["blockwise"], tokens["torch_path"])),
    }, indent=1))


if __name__ == "__main__":
    main()
