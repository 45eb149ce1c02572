"""How much a profile's loss rises on a kind of text its calibration data lacked, per unit of held-out KL.

    python benchmarks/kl_ratio_table.py --results manual.json notes.json --names manual notes \\
        [--markdown-out kl-ratio.md]

For every calibrated profile in ``minicache-eval --compare`` results: the loss increase there
(ΔCE = log(1 + ppl increase), nats per token), the KL to the full cache there, and ΔCE divided by the
upper end of the KL interval the profile states for its held-out data. The largest of those ratios is
what ``minicache-calibrate --kl-guard`` must be at least for a perplexity promise to hold on these texts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from promise_table import parse_results_args  # this folder: the same --results / --names arguments

from minicache.profile import MergeProfile


def held_out_kl_upper(profile_dir: str) -> float | None:
    """The upper end of the held-out KL interval a calibrated profile states (None for other rows)."""
    path = Path(profile_dir)
    if not path.exists():
        return None
    interval = ((MergeProfile.load(path).calibration or {}).get("measured") or {}).get("kl_mean_ci95")
    return None if interval is None else float(interval[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_results_args(__doc__, argv)
    lines = ["| text | profile | ppl increase [95 %] | ΔCE (nats) | KL there | held-out KL, upper | ΔCE / KL there "
             "| ΔCE / held-out KL upper |", "|---|---|---|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for name, path in zip(args.names, args.results, strict=True):
        for row in json.loads(Path(path).read_text())["results"]:
            upper = held_out_kl_upper(row["method"])
            if upper is None:
                continue
            low, high = row["ppl_increase_ci95"]
            d_ce = math.log1p(row["ppl_increase"])
            worst = max(worst, d_ce / upper)
            lines.append(f"| {name} | `{row['method']}` | {row['ppl_increase']:+.2%} [{low:+.2%}..{high:+.2%}] "
                         f"| {d_ce:.4f} | {row['kl_mean']:.4f} | {upper:.4f} | {d_ce / row['kl_mean']:.2f} "
                         f"| {d_ce / upper:.2f} |")
    lines += ["", f"Largest ΔCE / held-out KL upper: **{worst:.2f}**."]
    print("\n".join(lines))
    if args.markdown_out:
        Path(args.markdown_out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
