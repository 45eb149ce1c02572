"""What one profile costs over another scored on the same windows: a paired interval, from minicache-eval JSON.

    python benchmarks/paired_difference.py benchmarks/results/keys-cpu/window6.json \
        --baseline benchmarks/results/keys-cpu/auto-rotated-queries [--markdown-out FILE]

Every other row of the file(s) is compared with the ``--baseline`` row: ``ppl_row / ppl_baseline - 1``
with a 95 % interval from a bootstrap over windows that resamples both rows together
(:func:`minicache.evaluate.quality.paired_ppl_difference`), so the windows' own difficulty cancels. Two
rows' separate intervals against the full cache overlap far more than their difference's interval does.
Rows need the per-window numbers (``window_nll_increase``) that minicache-eval writes since 2026-12-07, and
must come from the same windows (same data, prefix, continuation and window count: checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minicache.evaluate.quality import format_interval, paired_ppl_difference

#: Fields two rows must share to have been scored on the same windows.
SAME_WINDOWS = ("windows", "prefix_length", "continuation_length", "tokens_scored", "ppl_full")


def rows_of(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data.get("results", [data]):
            rows.append({**row, "data": data.get("data")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="minicache-eval --json-out files (their rows are compared)")
    parser.add_argument("--baseline", required=True, help="the method label of the row the others are compared with")
    parser.add_argument("--markdown-out")
    args = parser.parse_args()
    rows = rows_of(args.results)
    by_label = {row["method"]: row for row in rows}
    if args.baseline not in by_label:
        parser.error(f"--baseline {args.baseline!r} is not a row; rows: {sorted(by_label)}")
    base = by_label[args.baseline]
    lines = [f"Against `{args.baseline}` ({base['windows']} windows × {base['continuation_length']} scored tokens "
             f"after {base['prefix_length']}-token prefixes): perplexity of each row over the baseline's, 95 % "
             "interval from a paired bootstrap over windows.", "",
             "| method | compression | ppl increase (vs full) | vs baseline | 95 % interval |",
             "| :--- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row is base:
            continue
        for field in SAME_WINDOWS:  # the full cache's perplexity pins the windows; the data path is a temporary
            if row.get(field) != base.get(field):
                parser.error(f"{row['method']!r} was not scored on the baseline's windows: {field} "
                             f"{row.get(field)!r} against {base.get(field)!r}")
        if row.get("window_nll_increase") is None or base.get("window_nll_increase") is None:
            parser.error(f"{row['method']!r} or the baseline has no per-window numbers (window_nll_increase): "
                         "score them again with this minicache-eval")
        point, interval = paired_ppl_difference(base["window_nll_increase"], row["window_nll_increase"])
        lines.append(f"| `{row['method']}` | {row['compression_ratio']:.3f}x | {row['ppl_increase']:+.2%} | "
                     f"{point:+.2%} | {format_interval(interval) if interval else '–'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text + f"\nMade by `python benchmarks/paired_difference.py "
                                           f"{' '.join(args.results)} --baseline {args.baseline}`.\n")


if __name__ == "__main__":
    main()
