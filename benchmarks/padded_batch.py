"""What batch invariance costs: a left-padded batch stored per sequence vs the old batched store.

Eight prompts of different lengths (real text), one left-padded batch, greedy decoding. For each cache:
wall time of ``generate`` (median of ``--repeats``), how many sequences give the same tokens as when run
alone with the same kind of cache, and KV bytes held at the end. ``one batched store`` is MiniCache
with per-sequence storage switched off: one store for the batch, whose schedule counts padded
positions (it still sees the padding for sinks and retention), i.e. the behaviour before.

    PYTHONPATH=. .venv/bin/python benchmarks/padded_batch.py --out benchmarks/results/padded-batch-cpu
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from minicache import MergeProfile, MiniCache
from minicache.fileio import atomic_write
from minicache.models import load_model
from minicache.runtime.memory import cache_bytes

LICENSE = pathlib.Path("/usr/share/common-licenses")
SIZES = (520, 1400, 760, 1150, 600, 1300, 900, 1000)  # characters: ~117-314 SmolLM2 tokens


def _prompts() -> list[str]:
    text = "\n\n".join((LICENSE / n).read_text(errors="replace") for n in ("GPL-3", "Apache-2.0", "LGPL-2.1"))
    return [text[5000 + i * 4000 : 5000 + i * 4000 + n] for i, n in enumerate(SIZES)]


class BatchedStoreMiniCache(MiniCache):
    """MiniCache as it was before per-sequence storage: one batched store even for a padded batch."""

    def _store_per_sequence(self, batch: int) -> None:
        return None


def _generate(model, tokenizer, batch, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(**batch, cache=cache, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="directory for results.json and results.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    profile = MergeProfile.preset("paper", model.config)
    tokenizer.padding_side = "left"
    batch = tokenizer(_prompts(), return_tensors="pt", padding=True)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    caches = {
        "DynamicCache": lambda: DynamicCache(config=model.config),
        "MiniCache, per sequence (now)": lambda: MiniCache(profile, model),
        "MiniCache, one batched store (before)": lambda: BatchedStoreMiniCache(profile, model),
    }
    rows = []
    for name, make in caches.items():
        alone = []
        for row, n in enumerate(lengths):
            one = {key: value[row : row + 1, -n:] for key, value in batch.items()}
            alone.append(_generate(model, tokenizer, one, make(), args.new_tokens)[0, -args.new_tokens:])
        seconds, out, cache = [], None, None
        for _ in range(args.repeats):
            cache = make()
            started = time.perf_counter()
            out = _generate(model, tokenizer, batch, cache, args.new_tokens)
            seconds.append(time.perf_counter() - started)
        same = sum(torch.equal(out[i, -args.new_tokens:], alone[i]) for i in range(len(lengths)))
        held = cache.memory_report()["kv_bytes"] if isinstance(cache, MiniCache) else cache_bytes(cache)[0]
        rows.append({"cache": name, "seconds": statistics.median(seconds), "same_as_alone": same,
                     "kv_bytes": held})
        print(f"{name}: {statistics.median(seconds):.2f} s, {same}/8 same as alone, {held / 2**20:.1f} MiB",
              file=sys.stderr)
    base = rows[0]["seconds"]
    lines = [
        "| cache | generate (s, median) | time / DynamicCache | sequences with the same tokens as alone | KV MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['seconds']:.2f} | {r['seconds'] / base:.2f}× | {r['same_as_alone']} of 8 "
                     f"| {r['kv_bytes'] / 2**20:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "PYTHONPATH=. .venv/bin/python " + " ".join(sys.argv), "machine": platform.platform(),
                "cpus": torch.get_num_threads(), "prompt_tokens": lengths, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "profile": "paper preset", "rows": rows}
        atomic_write(out / "results.json", (json.dumps(meta, indent=1) + "\n").encode(), overwrite=True)
        text = (f"# Padded batch: per-sequence storage vs the old batched store\n\n`{meta['command']}`\n\n"
                f"SmolLM2-135M-Instruct, float32, CPU ({meta['cpus']} threads), paper preset, 8 prompts of "
                f"{min(lengths)}-{max(lengths)} tokens left-padded into one batch, {args.new_tokens} greedy tokens, "
                f"median of {args.repeats}.\n\n{table}\n")
        atomic_write(out / "results.md", text.encode(), overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
