"""Where a profile's damage falls on each kind of text: per-token loss increase (ΔCE) beside KL (issue 21).

A profile's perplexity increase on a text is its mean ΔCE = CE(profile) − CE(full cache) over the scored tokens.
KL(full ‖ profile) measures how far the predicted distributions move whatever the text says; ΔCE also depends
on where the text's true token sits in them. This probe scores a profile and the full cache on the same
windows of each text (512-token prefix, 256 scored tokens; float32; the prefix replayed exactly, as
``minicache-eval`` does) and splits ΔCE and KL by

* whether the token is *copyable*: the window already held the same three tokens (the two before it and it),
  the pattern induction heads complete;
* the full cache's probability of the true token, in bins.

    .venv/bin/python benchmarks/text_shift_probe.py --profile benchmarks/results/promise-cpu/full-0.005 \\
        --text /tmp/tc/notes.txt /tmp/tc/code.txt /tmp/tc/calib.txt --windows 32

(``source benchmarks/unseen_text.sh && write_unseen_text /tmp/tc`` writes notes.txt and code.txt; calib.txt
was the shipped profile's calibration data, its texts joined by blank lines.)
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

import minicache.evaluate.quality as quality
from minicache import MergeProfile
from minicache.data import read_samples, token_windows
from minicache.models import load_model

PREFIX, LENGTH = 512, 768
BINS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.01)


def copyable(windows: torch.Tensor) -> torch.Tensor:
    """``[N, LENGTH - PREFIX]`` bool: the scored token ends a trigram the window held before it."""
    out = torch.zeros(windows.shape[0], LENGTH - PREFIX, dtype=torch.bool)
    for w, seq in enumerate(windows.tolist()):
        seen = set()
        for i in range(2, LENGTH):
            key = (seq[i - 2], seq[i - 1], seq[i])
            if i >= PREFIX and key in seen:
                out[w, i - PREFIX] = True
            seen.add(key)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, nargs="+")
    parser.add_argument("--text", required=True, nargs="+")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--markdown-out")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    # Per-token losses and log-probabilities as the evaluation computes them: recorded from its own calls.
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    token_nll = quality.token_nll

    def recording(log_probs, target):
        nll = token_nll(log_probs, target)
        recorded.append((log_probs, nll))
        return nll

    quality.token_nll = recording
    lines = []
    for text in args.text:
        windows = token_windows(read_samples(text), tokenizer, LENGTH, max_windows=args.windows)
        recorded.clear()
        reference = quality.reference_run(model, windows, PREFIX, keep_prefix_kv=True)
        ref_lp = torch.cat([r[0] for r in recorded])
        ref_nll = torch.cat([r[1] for r in recorded])
        target = windows[:, PREFIX:]
        copy = copyable(windows)
        p_true = ref_lp.gather(-1, target.unsqueeze(-1)).squeeze(-1).exp()
        for path in args.profile:
            recorded.clear()
            result = quality.evaluate_profile(model, windows, PREFIX, MergeProfile.load(path), reference=reference)
            lp = torch.cat([r[0] for r in recorded])
            d_ce = (torch.cat([r[1] for r in recorded]) - ref_nll).double()
            kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).double()

            def part(mask: torch.Tensor, d_ce: torch.Tensor = d_ce, kl: torch.Tensor = kl) -> str:
                return (f"{mask.float().mean().item():5.1%} of tokens | {d_ce[mask].mean().item():+.4f} | "
                        f"{kl[mask].mean().item():.4f} | {d_ce[mask].sum().item() / d_ce.sum().item():6.1%}")

            block = [
                f"### {Path(text).name} × {Path(path).name}",
                "",
                f"{result.tokens_scored} scored tokens: ppl {result.ppl_increase:+.2%} "
                f"{quality.format_interval(result.ppl_increase_ci95)}, ΔCE {d_ce.mean().item():+.4f}, "
                f"KL {kl.mean().item():.4f}, full cache's p(true token) {p_true.mean().item():.3f}",
                "",
                "| tokens | share | ΔCE (nats) | KL | share of ΔCE |",
                "|---|---|---:|---:|---:|",
                f"| copyable | {part(copy)} |",
                f"| not copyable | {part(~copy)} |",
            ]
            for lo, hi in itertools.pairwise(BINS):
                inside = (p_true >= lo) & (p_true < hi)
                if inside.any():
                    block.append(f"| p(true) in [{lo:.2f}, {hi:.2f}) | {part(inside)} |")
            print("\n".join(block) + "\n", flush=True)
            lines += [*block, ""]
    if args.markdown_out:
        Path(args.markdown_out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
