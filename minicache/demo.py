"""`minicache-demo`: apply a profile to a model, generate, and print memory saved and agreement.

Runs on the built-in default (SmolLM2-135M-Instruct with the paper preset, a prompt of real
license text) with no arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from minicache.cli_options import add_allow_mismatch_option, add_model_option, add_profile_option
from minicache.profile import MergeProfile
from minicache.runtime.cache import MiniCache

_DEFAULT_TEXTS = ("GPL-3", "Apache-2.0", "GPL-2", "LGPL-2.1", "MPL-2.0")
_LICENSES = Path("/usr/share/common-licenses")


def default_prompt_text() -> str:
    """Real English text from Debian's license files, or a built-in paragraph where they are missing."""
    texts = [(_LICENSES / name).read_text(errors="replace") for name in _DEFAULT_TEXTS if (_LICENSES / name).exists()]
    if texts:
        return "\n\n".join(texts)
    paragraph = (
        "The cache of keys and values grows with every token a language model reads. Adjacent layers "
        "of deep models often hold similar states, so their caches can share one direction per token "
        "while each layer keeps its own magnitude. "
    )
    return paragraph * 400


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicache-demo",
        description=(
            "Load a model, apply a MiniCache merge profile, generate greedily with the merged cache and "
            "with the full cache, and print how much KV memory merging saved and how closely the merged "
            "run agrees with the full one. With no arguments: SmolLM2-135M-Instruct (built in), the "
            "paper preset, a 2,048-token prompt of license text."
        ),
    )
    add_model_option(parser)
    add_profile_option(parser, help="merge profile (YAML file or model directory); default: the paper preset")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="length of the text prompt in tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    add_allow_mismatch_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minicache.models import load_model

    try:
        started = time.perf_counter()
        model, tokenizer = load_model(args.model)
        print(f"loaded {args.model} in {time.perf_counter() - started:.1f}s", flush=True)
        if args.profile:
            profile = MergeProfile.load(args.profile)
            label = args.profile
        else:
            profile = MergeProfile.preset("paper", model.config)
            label = "paper preset"
        cache = MiniCache(profile, model, allow_model_mismatch=args.allow_model_mismatch)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    ids = tokenizer(default_prompt_text(), return_tensors="pt").input_ids[:, : args.prompt_tokens]
    mask = torch.ones_like(ids)
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        full = model.generate(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config), **gen)
        merged = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **gen)
        # Teacher-forced agreement: feed the full-cache continuation through a fresh merged cache
        # and compare next-token choices step by step, so one early divergence does not hide the rest.
        forced_cache = MiniCache(profile, model, allow_model_mismatch=args.allow_model_mismatch)
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), cache=forced_cache).logits
        full_logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
    n = ids.shape[1]
    new_full, new_merged = full[0, n:], merged[0, n:]
    same = (new_full == new_merged).long()
    prefix = int(same.cumprod(0).sum())
    top1 = (logits[0, n - 1 : -1].argmax(-1) == full_logits[0, n - 1 : -1].argmax(-1)).float().mean().item()
    report = cache.memory_report()
    saved = 1 - report["kv_bytes"] / report["kv_bytes_full"]
    print(f"profile: {label}: {profile.describe()}")
    print(f"prompt {n} tokens, generated {len(new_full)} tokens greedily")
    print(
        f"KV cache: {report['kv_bytes'] / 2**20:.2f} MiB vs {report['kv_bytes_full'] / 2**20:.2f} MiB full "
        f"-> {saved:.1%} saved (compression {report['compression_ratio']:.3f}x) at {report['seq_length']} tokens"
    )
    print(
        f"greedy tokens identical to the full cache: first {prefix} of {len(new_full)} "
        f"({same.float().mean():.1%} of positions)"
    )
    print(f"teacher-forced top-1 agreement with the full cache: {top1:.1%}")
    print("full   :", repr(tokenizer.decode(new_full[:40])))
    print("merged :", repr(tokenizer.decode(new_merged[:40])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
