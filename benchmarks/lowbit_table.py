"""Table and frontier plot of the low-bit comparison (benchmarks/lowbit_results.sh).

    python benchmarks/lowbit_table.py RESULT.json OUT_DIR [MORE.json ...]

Reads one ``minicache-eval --compare ... --json-out`` file (and the rows of more runs on the same
windows, each method once); writes ``OUT_DIR/table.md`` (also printed)
and ``OUT_DIR/frontier.png``: KV compression (x) against perplexity increase and KL (y), one marker per
method, quantizers at 2/3/4 bits joined by a line, calibrated profiles starred.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SCHEMES = ("kivi", "rotated", "rotated-mse")


def family(method: str) -> str:
    """Line a method belongs to in the plot: the scheme of a ``none@scheme:bits`` row (one width for keys
    and values, default groups) with its key options (``+s4``, ``+prerope``), else the method itself."""
    m = re.fullmatch(r"(?:preset:)?none@(?:([\w-]+):)?(\d+)((?:\+s\d+)?(?:\+prerope)?)", method)
    if m and (m.group(1) or "kivi") in SCHEMES:
        return (m.group(1) or "kivi") + m.group(3)
    return method


def main(path: str, out: str, *more: str) -> None:
    data = json.loads(Path(path).read_text())
    rows = data["results"]
    for extra in more:
        if not Path(extra).exists():  # a part of the benchmark that has not run
            print(f"({extra} does not exist: its rows are left out)", file=sys.stderr)
            continue
        seen = {r["method"] for r in rows}
        rows += [r for r in json.loads(Path(extra).read_text())["results"] if r["method"] not in seen]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    lines = [
        "| method | compression | ppl increase | 95 % interval | KL mean | top-1 | mean bits |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "kv_value_bits" not in r and Path(r["method"]).is_dir():  # older JSON: read the profile's widths
            from minicache import MergeProfile

            q = MergeProfile.load(r["method"]).quantization
            if q is not None and q.value_bits is not None:
                layers = len(q.value_bits) if isinstance(q.value_bits, tuple) else len(q.bits)
                r["kv_value_bits"] = [q.bits_of(i, "values") for i in range(layers)]
        lo, hi = r.get("ppl_increase_ci95") or (float("nan"), float("nan"))
        bits = r.get("kv_bits", "–")
        values = r.get("kv_value_bits", bits)
        if isinstance(bits, list) or isinstance(values, list):
            keys_list = bits if isinstance(bits, list) else [bits] * len(values)
            values_list = values if isinstance(values, list) else [values] * len(keys_list)
            bits = f"{(sum(keys_list) + sum(values_list)) / (2 * len(keys_list)):.2f}"
        elif values != bits:
            bits = f"{(bits + values) / 2:.2f}"
        lines.append(
            f"| `{r['method']}` | {r['compression_ratio']:.3f}x | {r['ppl_increase']:+.2%} | {lo:+.2%}..{hi:+.2%} "
            f"| {r['kl_mean']:.4f} | {r['top1_agreement']:.2%} | {bits} |"
        )
    lines += [
        "",
        f"{data['dtype']}, {first['windows']} windows × ({first['prefix_length']} prefix + "
        f"{first['continuation_length']} scored tokens) = {first['tokens_scored']} scored tokens of "
        f"`{Path(data['data']).name}`; "
        "compression after the prefix; 95 % interval of the perplexity increase: paired bootstrap over windows. "
        "The `full` row is the noise floor: the full cache scored through the same chunked path.",
    ]
    text = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax in axes:  # more lines than the default 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    lines_by_family: dict[str, list[dict]] = {}
    for r in rows:
        lines_by_family.setdefault(family(r["method"]), []).append(r)
    for name, members in lines_by_family.items():
        members = sorted(members, key=lambda r: r["compression_ratio"])
        quantizer_line = name.split("+")[0] in SCHEMES and "@" not in name
        star = "/" in name.split("@")[0]  # a profile on disk (calibrated), stored as it says or as @ says
        style = "o-" if quantizer_line else "*" if star else "d"
        for ax, key, scale in ((axes[0], "ppl_increase", 100), (axes[1], "kl_mean", 1)):
            ax.plot([r["compression_ratio"] for r in members], [r[key] * scale for r in members], style,
                    markersize=12 if star else 6, label=name)
    for ax, label in ((axes[0], "perplexity increase (%)"), (axes[1], "KL to the full cache (mean per token)")):
        ax.set_xlabel("KV compression (x)")
        ax.set_ylabel(label)
        ax.set_yscale("symlog", linthresh=1 if "%" in label else 0.01)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct, {data['dtype']}, {first['prefix_length']}-token prefixes, "
                 f"{first['tokens_scored']} scored tokens")
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
