"""Greedy decode with low-rank groups: the blockwise torch path (no restore) against the restore path
and the full cache, on the same prompts in the same run (issue 17, item 4).

Prints, per path: seconds per decode step (median over every step of ``--repeats`` runs, each step
timed on its own after an untimed prefill), the ratio to the full cache,
and whether the generated tokens equal the restore path's.

    .venv/bin/python benchmarks/lowrank_decode.py --profile benchmarks/results/lowrank-cpu/profile
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from minicache import MergeProfile, MiniCache
from minicache.data import split_text, token_windows
from minicache.evaluate.bench import timed_greedy_decode
from minicache.models import load_model
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, tokenizer = load_model("smollm2-135m", dtype=args.dtype)
    profile = MergeProfile.load(args.profile)
    ids = token_windows(split_text(Path(args.data).read_text()), tokenizer, args.context, args.batch)
    mask = torch.ones_like(ids)

    paths = {
        "full (DynamicCache)": (lambda: None, False),
        "lowrank, restore path": (lambda: MiniCache(profile, model), False),
        "lowrank, blockwise (no restore)": (lambda: MiniCache(profile, model), True),
    }
    results, tokens = {}, {}
    for name, (make, blockwise) in paths.items():
        if blockwise:
            enable_fused_attention(model, backend="torch")
        try:
            timed_greedy_decode(model, make(), ids, 2, mask)  # warm-up
            runs = []
            for _ in range(args.repeats):
                steps, out = timed_greedy_decode(model, make(), ids, args.new_tokens, mask)
                runs.extend(steps)
            tokens[name] = out
            results[name] = statistics.median(runs)
        finally:
            if blockwise:
                disable_fused_attention(model)
    full = results["full (DynamicCache)"]
    restore = tokens["lowrank, restore path"]
    rows = []
    print(f"{args.context} tokens x {args.batch}, {args.new_tokens} greedy tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} x {args.new_tokens} steps, each timed")
    print("| path | s / decode step | speed vs full | tokens = restore path |")
    print("|---|---:|---:|---|")
    for name, seconds in results.items():
        same = bool(torch.equal(tokens[name], restore))
        rows.append({"path": name, "seconds_per_step": seconds, "speed_vs_full": full / seconds,
                     "tokens_equal_restore": same})
        print(f"| {name} | {seconds:.4f} | {full / seconds:.2f} | {'yes' if same else 'no'} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
