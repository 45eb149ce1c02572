"""The low-bit frontier near the 1 % line: every row of several ``minicache-eval --compare`` runs on the same
windows, perplexity increase (with its 95 % interval) against compression, one labelled point per row.

    python benchmarks/frontier_zoom.py OUT.png RESULT.json [MORE.json ...] [--max-increase 0.05]

Rows above ``--max-increase`` are left out (they are in the tables), so the points that matter for a 1 %
budget can be told apart; calibrated profiles (paths) are stars, fixed storages circles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def is_profile(method: str) -> bool:
    """Whether a row is a calibrated profile (a directory path, no ``@storage``)."""
    return "@" not in method and "/" in method


def label(method: str) -> str:
    """A short name: a profile's directory name, or the storage after ``none@`` (a profile's storage:
    ``NAME@STORAGE``, the directory's name only)."""
    if is_profile(method):
        return Path(method).name
    base, at, storage = method.partition("@")
    if at and "/" in base:
        return f"{Path(base).name}@{storage}"
    return method.removeprefix("preset:").removeprefix("none@")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the plot (.png)")
    parser.add_argument("results", nargs="+", type=Path, help="--json-out files of runs on the same windows")
    parser.add_argument("--max-increase", type=float, default=0.05, help="leave out rows above this (default 0.05)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, seen = [], set()
    for path in args.results:
        for row in json.loads(path.read_text())["results"]:
            if row["method"] not in seen and row["method"] != "full" and row["ppl_increase"] <= args.max_increase:
                seen.add(row["method"])
                rows.append(row)
    fig, ax = plt.subplots(figsize=(11, 6.5))
    for row in sorted(rows, key=lambda r: r["compression_ratio"]):
        x, y = row["compression_ratio"], 100 * row["ppl_increase"]
        lo, hi = (100 * v for v in row["ppl_increase_ci95"])
        profile = is_profile(row["method"])
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt="*" if profile else "o", ms=11 if profile else 5,
                    color="tab:red" if profile else "tab:blue", alpha=0.8, capsize=2, lw=0.8)
        # profiles labelled below their star, storages above their dot: the two kinds crowd the same x
        ax.annotate(label(row["method"]), (x, y), textcoords="offset points", xytext=(6, -11) if profile else (5, 3),
                    fontsize=7, color="tab:red" if profile else "black")
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.text(ax.get_xlim()[0], 1.02, " 1 % budget", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("KV compression (x), everything counted")
    ax.set_ylabel("perplexity increase on unseen text (%), 95 % interval")
    ax.set_title(f"Low-bit storage near the 1 % line: rows up to +{100 * args.max_increase:g} % "
                 "(stars: calibrated profiles)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
