"""Frontier table and plot of minicache beside its peers (benchmarks/frontier_results.sh, issue 20).

    python benchmarks/frontier_table.py OUT_DIR

For every ``OUT_DIR/<dtype>.json`` (``minicache-eval --compare ... --json-out``) writes
``table-<dtype>.md`` (also printed) and ``frontier-<dtype>.png``: KV compression (x) against the
perplexity increase (y, with its 95 % interval); with ``OUT_DIR/tasks-<dtype>.json``
(``minicache-eval --task ruler``), a second panel of mean task accuracy. kvpress presses at several
ratios are joined by a line per press; calibrated minicache profiles are stars.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SHIPPED = "profiles/smollm2-135m-instruct"


def family(method: str) -> str:
    """Line a method belongs to: its press for ``kvpress:NAME@RATIO``, else the method itself."""
    m = re.fullmatch(r"kvpress:(\w+)@[\d.]+", method)
    return f"kvpress {m.group(1)}" if m else method


def who(method: str) -> str:
    """Whose method it is, for the table: minicache, kvpress or transformers."""
    if method.startswith("kvpress:"):
        return "kvpress"
    if method.startswith("quantized-cache-") or method == "full":
        return "transformers"
    return "minicache"


#: One colour per line, the same in every dtype's plot (methods not listed take the next free colour).
COLOURS = dict(zip([
    "full", "paper", "average", SHIPPED, f"{SHIPPED}@kivi:4", "none@kivi:4",
    "benchmarks/results/lowbit-cpu/auto-rotated", "quantized-cache-hqq@4",
    "kvpress snapkv", "kvpress expected", "kvpress streaming", "kvpress knorm",
], [
    "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
    "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "navy", "black",
], strict=True))
SPARE = ["gold", "teal", "maroon", "lime", "indigo"]


def colour(name: str, taken: set[str]) -> str:
    if name in COLOURS:
        return COLOURS[name]
    free = next((c for c in SPARE if c not in taken), "darkgray")
    taken.add(free)
    return free


def short(method: str) -> str:
    return method.replace(SHIPPED, "shipped").replace("benchmarks/results/lowbit-cpu/", "")


def table(data: dict, tasks: dict | None) -> str:
    rows = sorted(data["results"], key=lambda r: r["compression_ratio"])
    first = rows[0]
    accuracy = _task_accuracy(tasks) if tasks else {}
    head = "| method | by | compression | ppl increase | 95 % interval | KL mean | top-1 |"
    rule = "| :--- | :--- | ---: | ---: | ---: | ---: | ---: |"
    if accuracy:
        head += " task accuracy |"
        rule += " ---: |"
    lines = [head, rule]
    for r in rows:
        lo, hi = r.get("ppl_increase_ci95") or (float("nan"), float("nan"))
        line = (f"| `{short(r['method'])}` | {who(r['method'])} | {r['compression_ratio']:.3f}x "
                f"| {r['ppl_increase']:+.2%} | {lo:+.2%}..{hi:+.2%} | {r['kl_mean']:.4f} | {r['top1_agreement']:.2%} |")
        if accuracy:
            acc = accuracy.get(r["method"])
            line += f" {acc:.1%} |" if acc is not None else " – |"
        lines.append(line)
    versions = sorted({r["kvpress_version"] for r in rows if r.get("kvpress_version")})
    lines += [
        "",
        f"SmolLM2-135M-Instruct, {data['dtype']}, {first['windows']} windows × ({first['prefix_length']} prefix + "
        f"{first['continuation_length']} scored tokens) = {first['tokens_scored']:,} scored tokens, half Python "
        "source, half Python release notes (no profile saw them); compression: full-cache bytes ÷ bytes the cache "
        "holds after the prefix; 95 % interval: paired bootstrap over windows"
        + (f"; kvpress {', '.join(versions)}" if versions else "") + ". `shipped` is `" + SHIPPED + "`.",
    ]
    if accuracy:
        lines.append("Task accuracy: mean over the tasks of `tasks-" + data["dtype"] + ".md`.")
    return "\n".join(lines) + "\n"


def _task_accuracy(tasks: dict) -> dict[str, float]:
    """Mean accuracy over tasks (each task's cells pooled) per method."""
    out = {}
    for method, per_task in tasks["table"].items():
        means = []
        for cells in per_task.values():
            hits = sum(c["accuracy"] * c["n"] for c in cells.values())
            means.append(hits / sum(c["n"] for c in cells.values()))
        out[method] = sum(means) / len(means)
    return out


def plot(data: dict, tasks: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    accuracy = _task_accuracy(tasks) if tasks else {}
    panels = 2 if accuracy else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 2, 5), squeeze=False)
    groups: dict[str, list[dict]] = {}
    taken: set[str] = set()
    for r in data["results"]:
        groups.setdefault(family(r["method"]), []).append(r)
    for name, members in groups.items():
        members = sorted(members, key=lambda r: r["compression_ratio"])
        press = name.startswith("kvpress")
        star = "/" in name.split("@")[0]
        style = "o--" if press else "*" if star else "s" if who(name) == "minicache" else "d"
        x = [r["compression_ratio"] for r in members]
        y = [r["ppl_increase"] * 100 for r in members]
        lo = [max(0.0, (r["ppl_increase"] - (r.get("ppl_increase_ci95") or [r["ppl_increase"]] * 2)[0]) * 100)
              for r in members]
        hi = [max(0.0, ((r.get("ppl_increase_ci95") or [r["ppl_increase"]] * 2)[1] - r["ppl_increase"]) * 100)
              for r in members]
        line = axes[0][0].errorbar(x, y, yerr=[lo, hi], fmt=style, markersize=13 if star else 6, capsize=2,
                                   color=colour(name, taken), label=short(name))
        if accuracy:
            points = [(r["compression_ratio"], accuracy[r["method"]] * 100) for r in members if r["method"] in accuracy]
            if points:
                axes[0][1].plot(*zip(*points, strict=True), style, color=line.lines[0].get_color(),
                                markersize=13 if star else 6, label=short(name))
    ax = axes[0][0]
    ax.set_yscale("symlog", linthresh=1)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g}%" if v else "0"))
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel("perplexity increase on unseen text (%)")
    if accuracy:
        axes[0][1].set_ylabel("task accuracy, mean over tasks (%)")
    for a in axes[0]:
        a.set_xscale("log", base=2)
        a.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([1, 1.25, 1.5, 2, 3, 4, 6, 8]))
        a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.set_xlabel("KV compression (x, bytes held after the prefix)")
        a.grid(alpha=0.3, which="both")
    if accuracy:  # same x range on both panels, and the full cache's accuracy as the line to keep
        axes[0][1].set_xlim(axes[0][0].get_xlim())
        if "full" in accuracy:
            axes[0][1].axhline(accuracy["full"] * 100, color="gray", linestyle=":", linewidth=1)
    # one legend for every method (the task panel shows only those the task run measured)
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    first = data["results"][0]
    fig.suptitle(f"SmolLM2-135M-Instruct, {data['dtype']}: minicache, kvpress and transformers' caches\n"
                 f"{first['tokens_scored']:,} scored tokens of unseen text, {first['prefix_length']}-token prefixes",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str) -> None:
    out_dir = Path(out)
    found = False
    for dtype in ("float32", "bfloat16"):
        path = out_dir / f"{dtype}.json"
        if not path.exists():
            continue
        found = True
        data = json.loads(path.read_text())
        tasks_path = out_dir / f"tasks-{dtype}.json"
        tasks = json.loads(tasks_path.read_text()) if tasks_path.exists() else None
        text = table(data, tasks)
        (out_dir / f"table-{dtype}.md").write_text(text)
        print(f"## {dtype}\n\n{text}")
        plot(data, tasks, out_dir / f"frontier-{dtype}.png")
    if not found:
        sys.exit(f"no float32.json or bfloat16.json in {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:])
