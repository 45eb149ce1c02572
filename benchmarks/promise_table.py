"""Does a calibrated profile keep its promise on text it never saw? A table from minicache-eval JSON.

    python benchmarks/promise_table.py --results unseen1.json unseen2.json --names code notes \
        [--markdown-out promise.md]

For every calibrated profile in the ``--compare`` results, the promise is what its calibration
states: budget ``B`` and the 95 % interval ``[low, high]`` of its held-out perplexity increase (or of
its KL to the full cache, for a profile calibrated with ``--budget-metric kl_mean``). It holds on an
unseen text when the same measure there is at most ``B + (high - low) / 2``, the budget plus the
half-width of the interval the profile states (issue 21's acceptance). Rows that are not profile
directories (``full``, ``paper``, ...) are skipped. Exits 1 if a promise is broken.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minicache.evaluate.quality import format_interval
from minicache.profile import MergeProfile

#: How each budget metric is shown: perplexity increase as a signed percentage, KL in nats per token.
FORMATS = {"ppl_increase": "{:+.2%}", "kl_mean": "{:.4f}"}
NAMES = {"ppl_increase": "ppl increase", "kl_mean": "KL"}


def _shown(metric: str, value: float) -> str:
    return FORMATS[metric].format(value)


def _interval(metric: str, interval) -> str:
    return format_interval(interval) if metric == "ppl_increase" else "..".join(f"{v:.4f}" for v in interval)


def promise(profile_dir: str) -> dict | None:
    """Budget, stated point and interval of a calibrated profile (None for other methods)."""
    path = Path(profile_dir)
    if not (path.is_dir() or path.suffix in (".yaml", ".yml")) or not path.exists():
        return None
    profile = MergeProfile.load(path)
    calibration = profile.calibration or {}
    measured = calibration.get("measured", {})
    budget = calibration.get("budget", {})
    metric = budget.get("metric")
    interval = measured.get(f"{metric}_ci95")
    if metric not in FORMATS or interval is None:
        return None
    return {"metric": metric, "budget": float(budget["max"]), "point": float(measured[metric]),
            "interval": tuple(interval), "groups": len(profile.groups),
            "windows": calibration.get("data", {}).get("held_out_windows")}


def parse_results_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    """``--results`` (minicache-eval JSON files), one ``--names`` entry each, ``--markdown-out``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True, help="minicache-eval --compare --json-out files")
    parser.add_argument("--names", nargs="+", required=True, help="a short name per results file (kind of text)")
    parser.add_argument("--markdown-out", help="also write the table here")
    args = parser.parse_args(argv)
    if len(args.names) != len(args.results):
        parser.error("give one name per results file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_results_args(__doc__, argv)
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    # each profile's promise, read once (a profile directory is loaded from disk)
    promises = {m: promise(m) for m in (r["method"] for r in runs[0]["results"])}
    promises = {m: p for m, p in promises.items() if p is not None}
    metrics = {p["metric"] for p in promises.values()}
    measure = NAMES[metrics.pop()] if len(metrics) == 1 else "budget's measure"
    header = ["profile", "budget", "groups", "stated (held-out)", "allowed on unseen"]
    header += [f"{n}: {measure} [95 %]" for n in args.names] + ["compression", "holds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    broken = 0
    for method, stated in promises.items():
        metric = stated["metric"]
        low, high = stated["interval"]
        allowed = stated["budget"] + (high - low) / 2
        cells, holds, compression = [], True, None
        for run in runs:
            row = next(r for r in run["results"] if r["method"] == method)
            interval = row.get(f"{metric}_ci95")
            cells.append(_shown(metric, row[metric]) + (f" [{_interval(metric, interval)}]" if interval else ""))
            holds &= row[metric] <= allowed
            compression = row["compression_ratio"]
        broken += not holds
        budget = f"{stated['budget']:.1%}" if metric == "ppl_increase" else f"KL {stated['budget']:.4f}"
        lines.append(
            f"| `{method}` | {budget} | {stated['groups']} | {_shown(metric, stated['point'])} "
            f"[{_interval(metric, stated['interval'])}] on {stated['windows']} windows | "
            f"≤ {_shown(metric, allowed)} | " + " | ".join(cells)
            + f" | {compression:.3f}x | {'yes' if holds else '**no**'} |"
        )
    tokens = ", ".join(f"{n}: {run['results'][0]['tokens_scored']:,} tokens in {run['results'][0]['windows']} "
                       f"windows" for n, run in zip(args.names, runs, strict=True))
    text = "\n".join(lines) + f"\n\nScored on unseen text ({tokens}).\n"
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
