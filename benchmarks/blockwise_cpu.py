#!/usr/bin/env python
"""CPU decode speed of the torch blockwise path (enable_fused_attention(backend="torch")) against the
default torch path (restore the whole layer, then sdpa) and the full cache, on SmolLM2-135M-Instruct.

Same prompt, same cache settings, greedy; checks that both MiniCache paths produce the same tokens.
Prints one JSON object: seconds per decode step, the median over every step of --repeats runs
(interleaved), each step timed on its own after an untimed prefill.

    python benchmarks/blockwise_cpu.py --context 2048 --batch 4 --kv-bits 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minicache import MergeProfile, MiniCache  # noqa: E402
from minicache.evaluate.bench import timed_greedy_decode  # noqa: E402
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
        return timed_greedy_decode(model, make_cache(), ids, args.decode_tokens, mask)

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
            steps, out = run(make)
            if backend:
                disable_fused_attention(model)
            times[name].extend(steps)
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
