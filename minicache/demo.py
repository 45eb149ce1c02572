"""`minicache-demo`: apply a profile to a model, generate, and print memory saved and agreement.

Runs on the built-in default (SmolLM2-135M-Instruct with the paper preset, a prompt of real
license text) with no arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from minicache.cli_options import (
    ArgumentParser,
    add_allow_mismatch_option,
    add_model_option,
    add_profile_option,
    interruptible,
)

if TYPE_CHECKING:  # torch, transformers and the runtime load in main(), after the arguments are parsed
    from minicache.profile import MergeProfile

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
    parser = ArgumentParser(
        prog="minicache-demo",
        description=(
            "Load a model, apply a MiniCache merge profile, generate greedily with the merged cache and "
            "with the full cache, and print how much KV memory merging saved and how closely the merged "
            "run agrees with the full one (teacher-forced after the merged prompt, as minicache-eval "
            "measures it). With no arguments: SmolLM2-135M-Instruct (built in), the paper preset, a "
            "2,048-token prompt of license text. A model directory written by minicache-convert uses the "
            "profile shipped in it unless --profile says otherwise."
        ),
    )
    add_model_option(parser)
    add_profile_option(parser, help="merge profile (YAML file or model directory); default: the profile shipped "
                       "with --model, else the paper preset")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="length of the text prompt in tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    add_allow_mismatch_option(parser)
    return parser


@interruptible
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    import torch
    from transformers import DynamicCache

    from minicache.evaluate.quality import evaluate_profile
    from minicache.model_spec import ModelSpec
    from minicache.models import load_model
    from minicache.runtime.cache import MiniCache

    try:
        profile, source = _profile_of(args) if args.profile else (None, None)
        started = time.perf_counter()
        model, tokenizer = load_model(args.model)
        print(f"loaded {args.model} in {time.perf_counter() - started:.1f}s", flush=True)
        if profile is None:
            profile, source = _shipped_or_preset(args.model, model)
        cache = MiniCache(profile, model, allow_model_mismatch=args.allow_model_mismatch)
        what = f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens}"
        ModelSpec.from_config(model).check_fits(args.prompt_tokens + args.new_tokens, what)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # Only the tokens needed: a whole file would overflow the tokenizer's model length (and warn).
    text_ids = tokenizer(default_prompt_text(), return_tensors="pt", truncation=True,
                         max_length=args.prompt_tokens + args.new_tokens).input_ids
    n = min(args.prompt_tokens, text_ids.shape[1] - 1)
    ids = text_ids[:, :n]
    mask = torch.ones_like(ids)
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        full = model.generate(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config), **gen)
        merged = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **gen)
    # Agreement measured as minicache-eval measures it, on the same text: the prompt goes through a
    # merged cache, then the text's next tokens are fed teacher-forced through the same cache, and every
    # next-token distribution is compared with the full cache's. (Scoring prompt and continuation in one
    # pass would attend exact keys and values and agree 100 % whatever the profile does.)
    quality = evaluate_profile(model, text_ids, n, profile, allow_model_mismatch=args.allow_model_mismatch)
    new_full, new_merged = full[0, n:], merged[0, n:]
    same = (new_full == new_merged[: len(new_full)]).long()
    prefix = int(same.cumprod(0).sum())
    report = cache.memory_report()
    saved = 1 - report["kv_bytes"] / report["kv_bytes_full"]
    print(f"profile: {profile.describe()}" + (f" (from {source})" if source else ""))
    print(f"prompt {n} tokens, generated {len(new_full)} tokens greedily")
    print(
        f"KV cache: {report['kv_bytes'] / 2**20:.2f} MiB vs {report['kv_bytes_full'] / 2**20:.2f} MiB full "
        f"-> {saved:.1%} saved (compression {report['compression_ratio']:.3f}x) at {report['seq_length']} tokens"
    )
    print(
        f"greedy tokens identical to the full cache: first {prefix} of {len(new_full)} "
        f"({same.float().mean():.1%} of positions)"
    )
    print(
        f"teacher-forced top-1 agreement with the full cache after the merged prompt: "
        f"{quality.top1_agreement:.1%} on the text's next {text_ids.shape[1] - n} tokens "
        f"(KL {quality.kl_mean:.4f} nats, perplexity {quality.ppl_increase:+.2%}; minicache-eval's metrics)"
    )
    print("full   :", repr(tokenizer.decode(new_full[:40])))
    print("merged :", repr(tokenizer.decode(new_merged[:40])))
    return 0


def _profile_of(args) -> tuple[MergeProfile, str]:
    from minicache.profile import MergeProfile

    return MergeProfile.load(args.profile), args.profile


def _shipped_or_preset(model_spec: str, model) -> tuple[MergeProfile, str | None]:
    """The profile shipped in a model directory (minicache-convert writes one), else the paper preset."""
    from minicache.profile import PROFILE_FILENAME, MergeProfile

    directory = Path(model_spec)
    if directory.is_dir() and (directory / PROFILE_FILENAME).is_file():
        return MergeProfile.load(directory), f"{directory / PROFILE_FILENAME}, shipped with the model"
    return MergeProfile.preset("paper", model.config), None


if __name__ == "__main__":
    raise SystemExit(main())
