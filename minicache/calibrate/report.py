"""Calibration report: `minicache_report.md` and PNG plots next to the profile."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from minicache.calibrate.search import Budget, SearchResult
from minicache.calibrate.statistics import PairStatistics
from minicache.fileio import atomic_write, save_figure
from minicache.profile import MergeProfile, MergeSettings

#: Report files, named after the profile: ``<stem>_report.md`` etc.; ``minicache_*`` for a profile in a
#: (model) directory, ``<name>_*`` for ``--out <name>.yaml``, so that reports never overwrite each other.
REPORT_PARTS = ("report.md", "similarity.png", "groups.png", "search.png", "spectra.png", "bits.png")
DEFAULT_STEM = "minicache"


def report_stem(profile_file: Path) -> str:
    """``"minicache"`` for ``minicache_config.yaml``, else the profile file's stem (``a.yaml`` → ``"a"``)."""
    from minicache.profile import PROFILE_FILENAME

    return DEFAULT_STEM if Path(profile_file).name == PROFILE_FILENAME else Path(profile_file).stem


def report_files(directory: Path, stem: str = DEFAULT_STEM) -> dict[str, Path]:
    """``{"report.md": path, "similarity.png": ..., ...}`` of a report."""
    return {part: Path(directory) / f"{stem}_{part}" for part in REPORT_PARTS}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data, overwrite=True)


def similarity_figure(stats: PairStatistics):
    """Heatmaps of mean cos Ω per pair and KV head (keys, values), and median angle per pair.

    Returns a matplotlib `Figure` (no pyplot state: notebooks display it, reports save it).
    """
    from matplotlib.figure import Figure

    cos = stats.mean_cosine()  # [P, 2, H]
    median = stats.angle_quantiles((0.5,))[..., 0] * 180.0  # degrees, [P, 2, H]
    fig = Figure(figsize=(15, 4.5))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.3]})
    limit = max(float(cos.abs().max()), 0.05)
    for ax, comp, name in ((axes[0], 0, "keys"), (axes[1], 1, "values")):
        im = ax.imshow(cos[:, comp].T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"{name}: mean cos between layers l and l+1")
        ax.set_xlabel("pair (l, l+1): l")
        ax.set_ylabel("KV head")
        ax.set_yticks(range(cos.shape[-1]))
        fig.colorbar(im, ax=ax)
    pairs = range(cos.shape[0])
    for comp, name in ((0, "keys"), (1, "values")):
        axes[2].plot(pairs, median[:, comp].mean(-1).numpy(), marker="o", label=name)
    axes[2].axhline(90, color="grey", lw=0.8, ls="--", label="90° (unrelated)")
    axes[2].set_title("median angle between adjacent layers (mean over heads)")
    axes[2].set_xlabel("pair (l, l+1): l")
    axes[2].set_ylabel("degrees")
    axes[2].legend()
    return fig


def plot_similarity(stats: PairStatistics, path: Path) -> None:
    """Write :func:`similarity_figure` as a PNG."""
    save_figure(similarity_figure(stats), path)


def angle_histogram_figure(stats: PairStatistics, pairs: Sequence[int] | None = None):
    """Distribution of the angle Ω between adjacent layers, per pair, for keys and values.

    Top row: the histogram of every pair as one column of an image (heads summed, each column
    normalised). Bottom row: the histograms of ``pairs`` (default: first, middle and last pair)
    as curves, with 90° (unrelated directions) marked.
    """
    from matplotlib.figure import Figure

    hist = stats.angle_hist.sum(dim=2)  # [P, 2, bins]
    density = hist / hist.sum(-1, keepdim=True).clamp_min(1)
    count = hist.shape[0]
    pairs = list(pairs) if pairs is not None else sorted({0, count // 2, count - 1})
    edges = torch.linspace(0, 180, hist.shape[-1] + 1)
    centres = (edges[1:] + edges[:-1]) / 2
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for comp, name in ((0, "keys"), (1, "values")):
        ax = axes[0, comp]
        im = ax.imshow(density[:, comp].T.numpy(), aspect="auto", origin="lower", cmap="viridis",
                       extent=(-0.5, count - 0.5, 0, 180))
        ax.axhline(90, color="white", lw=0.8, ls="--")
        ax.set_title(f"{name}: angle between layers l and l+1 (fraction of tokens)")
        ax.set_xlabel("pair (l, l+1): l")
        ax.set_ylabel("angle Ω (degrees)")
        fig.colorbar(im, ax=ax)
        ax = axes[1, comp]
        for p in pairs:
            ax.plot(centres.numpy(), density[p, comp].numpy(), label=f"pair {p}-{p + 1}")
        ax.axvline(90, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("angle Ω (degrees)")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"{name}: angle histograms of selected pairs")
        ax.legend(fontsize=8)
    return fig


def magnitude_ratio_figure(stats: PairStatistics):
    """Ratio of the norms of the same token in layers l+1 and l, per pair and KV head.

    Heatmaps of the geometric mean ``exp(mean log(m_b / m_a))`` (log colour scale around 1) for keys
    and values, and the spread (std of the log ratio) per pair. SLERP merging keeps both norms, so a
    ratio far from 1 costs nothing in itself; a wide spread says the layers scale tokens differently.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    mean, std = stats.magnitude_log_ratio()  # [P, 2, H]
    ratio = mean.exp()
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.3]})
    span = max(float(ratio.max()), 1 / float(ratio.min().clamp_min(1e-6)), 1.1)
    for ax, comp, name in ((axes[0], 0, "keys"), (axes[1], 1, "values")):
        im = ax.imshow(ratio[:, comp].T.numpy(), aspect="auto", cmap="PuOr_r", norm=LogNorm(1 / span, span))
        ax.set_title(f"{name}: norm ratio m(l+1) / m(l) (geometric mean)")
        ax.set_xlabel("pair (l, l+1): l")
        ax.set_ylabel("KV head")
        ax.set_yticks(range(ratio.shape[-1]))
        fig.colorbar(im, ax=ax)
    pairs = range(ratio.shape[0])
    for comp, name in ((0, "keys"), (1, "values")):
        axes[2].plot(pairs, std[:, comp].mean(-1).numpy(), marker="o", label=name)
    axes[2].set_title("spread of log(m(l+1) / m(l)) over tokens (mean over heads)")
    axes[2].set_xlabel("pair (l, l+1): l")
    axes[2].set_ylabel("std of the log ratio")
    axes[2].legend()
    return fig


def plot_groups(num_layers: int, profile: MergeProfile, predicted: dict[int, float], path: Path,
                metric: str = "ppl_increase") -> None:
    """Which layers are merged, over the predicted damage of merging each adjacent pair alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 3.5))
    if predicted:
        pairs = sorted(predicted)
        ax.bar(pairs, [max(predicted[p], 1e-6) for p in pairs], color="lightgrey", label="merging the pair alone")
        ax.set_yscale("log")
        unit = "relative perplexity increase, 0.01 = +1 %" if metric == "ppl_increase" else "nats per token"
        ax.set_ylabel(f"predicted / measured {metric}\n({unit})")
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no search (a preset): no damage predicted per pair", transform=ax.transAxes,
                ha="center", va="center", color="grey")
    for group in profile.groups:
        ax.axvspan(group.layers[0] - 0.4, group.layers[-1] - 0.6, color="tab:green", alpha=0.35)
    ax.set_xlim(-0.5, num_layers - 1.5)
    ax.set_xlabel("pair (l, l+1): l   (green: merged groups)")
    merged = len(profile.merged_layers)
    n = len(profile.groups)
    ax.set_title(f"{n} group{'s' if n != 1 else ''} chosen: {merged} of {num_layers} layers merged "
                 f"({num_layers - 1} adjacent pairs)")
    if predicted:
        ax.legend(loc="upper right")
    save_figure(fig, path)
    plt.close(fig)


def plot_search(search: SearchResult, metric: str, budget: float, path: Path) -> None:
    """Quality loss vs KV memory saved for every profile measured during the search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("probe", "o"), ("verify", "s"), ("extend", "^")):
        steps = [s for s in search.steps if s.kind == kind]
        if steps:
            saved = [1 - 1 / s.result.compression_ratio for s in steps]
            points = [getattr(s.result, metric) for s in steps]
            # error bars: the 95 % interval whose upper end the search compares with the budget
            intervals = [getattr(s.result, f"{metric}_ci95") or (p, p) for s, p in zip(steps, points, strict=True)]
            below = [max(p - lo, 0.0) for p, (lo, _) in zip(points, intervals, strict=True)]
            above = [max(hi - p, 0.0) for p, (_, hi) in zip(points, intervals, strict=True)]
            ax.errorbar(saved, points, yerr=[below, above], fmt=marker, capsize=3, label=kind)
    if search.final is not None:
        ax.scatter([1 - 1 / search.final.compression_ratio], [getattr(search.final, metric)], s=160,
                   facecolors="none", edgecolors="tab:red", label="chosen")
    ax.axhline(budget, color="tab:red", ls="--", lw=1, label=f"budget {budget:g}")
    values = [getattr(s.result, metric) for s in search.steps] + [budget]
    values += [(getattr(s.result, f"{metric}_ci95") or (0.0, 0.0))[1] for s in search.steps]
    ax.set_yscale("symlog", linthresh=max(budget / 10, 1e-6))
    # No empty negative half when nothing improved on the full cache; headroom above the largest point.
    low = min(values)
    ax.set_ylim(low * 1.5 if low < 0 else 0.0, max(values) * 1.8)
    ax.margins(x=0.08)
    ax.set_xlabel("KV memory saved (fraction of the full cache)")
    ax.set_ylabel(metric)
    ax.set_title("quality vs memory along the search (held-out data)")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def plot_spectra(spectra: dict[str, dict[str, tuple[torch.Tensor, int]]], path: Path) -> None:
    """Calibration variance kept vs stored width per KV head, one line per group, the chosen width marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, component in zip(axes, ("keys", "values"), strict=True):
        for label, parts in spectra.items():
            if component not in parts:
                continue
            curve, chosen = parts[component]
            widths = torch.arange(1, curve.numel() + 1)
            line, = ax.plot(widths, curve, label=label)
            if 0 < chosen <= curve.numel():
                ax.plot([chosen], [float(curve[chosen - 1])], "o", color=line.get_color())
        ax.set_title(f"{component}: variance kept (dot: the rank chosen)")
        ax.set_xlabel("stored values per token and KV head (rank)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of calibration variance kept")
    axes[0].legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def plot_bits(profile: MergeProfile, num_layers: int, frontier: Sequence[dict], metric: str, budget: float,
              path: Path) -> None:
    """Left: the chosen width per layer, keys and values. Right: every measured point of the width
    allocation (compression vs the budget's metric, upper bound as an error bar), the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = profile.quantization
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    layers = range(num_layers)
    for offset, role in ((-0.2, "keys"), (0.2, "values")):
        left.bar([i + offset for i in layers], [q.bits_of(i, role) for i in layers], width=0.4, label=role)
    left.set_xlabel("layer")
    left.set_ylabel("bits")
    left.set_title(f"widths chosen (mean {q.mean_bits(num_layers):.2f} bits)")
    left.set_ylim(0, max(q.widths()) + 1.5)
    left.legend(loc="upper right", ncol=2)
    points = sorted(frontier, key=lambda p: p["compression_ratio"])
    xs = [p["compression_ratio"] for p in points]
    ys = [p["value"] for p in points]
    ups = [max(p["upper"] - p["value"], 0.0) for p in points]
    right.errorbar(xs, ys, yerr=[[0.0] * len(ys), ups], fmt="o-", capsize=3, label="measured (upper 95 % bound)")
    chosen = [p for p in points if p["fits"] and abs(p["mean_bits"] - q.mean_bits(num_layers)) < 1e-4]
    if chosen:
        right.plot([chosen[0]["compression_ratio"]], [chosen[0]["value"]], "r*", markersize=14, label="chosen")
    right.axhline(budget, color="gray", linestyle="--", label="budget")
    right.set_yscale("symlog", linthresh=budget / 4)
    right.set_ylim(bottom=min(0.0, *ys, *(p["upper"] for p in points)))
    right.set_xlabel("compression (held-out windows)")
    right.set_ylabel(metric)
    right.set_title("width allocation: quality vs memory")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def _held_out_line(data: dict, measured: dict) -> list[str]:
    """The held-out windows behind the measured figures (none when the profile did not record them)."""
    if not (data.get("held_out_windows") and data.get("max_length") and data.get("prefix_length")):
        return []
    return [f"- held-out: {data['held_out_windows']} windows of {data['max_length']} tokens, the last "
            f"{data['max_length'] - data['prefix_length']} of each scored ({measured.get('tokens_scored')} tokens)"]


def _step_groups(step) -> list[list[int]] | str:
    if step.settings and any("(" in text for text in step.settings):  # not all plain SLERP: say how
        return ", ".join(step.settings)
    return [list(g) for g in step.groups]


def _settings(s: MergeSettings) -> str:
    """``"0.6 / 0.05 (aligned)"`` for SLERP; other methods named, with their parameters."""
    params = s.params.to_dict()
    weights = params.pop("weights", None)
    t = params.pop("t", None)
    fitted = bool(params.pop("align", False))
    if weights is not None:
        shown = "/".join(f"{w:g}" for w in weights)
    elif t is not None:
        shown = f"{t:g}"
    else:
        shown = ", ".join(f"{k} {v}" for k, v in params.items()) or "defaults"
        params = {}
    text = f"{shown} / {s.gamma:g}" + (" (aligned)" if fitted else "") + (" (pre-RoPE)" if s.pre_rope else "")
    if params:
        text += " (" + ", ".join(f"{k} {v}" for k, v in params.items()) + ")"
    return text if s.method == "slerp" else f"{s.method}: {text}"


def _coverage_lines(rule: Budget, measured: dict) -> list[str]:
    """What the stated interval covers, and the KL guard's bound where the search used one."""
    kl_guard, budget = rule.kl_guard, rule.max
    if not kl_guard:
        return ["- what the interval covers: text like these data. On a kind of text they lack, the loss can be "
                "several times larger (minicache's README, \"What a profile promises\"): calibrate on every kind "
                "of text you will run, or pass --kl-guard"]
    interval = measured.get("kl_mean_ci95")
    bound = f"{rule.guard_bound(interval[1]):+.2%}" if interval else "unresolved (no interval)"
    return [f"- KL guard {kl_guard:g}: the search also held expm1({kl_guard:g} x KL) within the budget, at the upper "
            f"end of the KL's interval ({bound} here, budget {budget:+.2%}): the perplexity increase on a kind of "
            f"text the data lacks, if there the loss rises at most {kl_guard:g} times the held-out KL (measured up "
            "to 3.7 times; README, \"What a profile promises\")"]


def write_report(
    directory: Path,
    profile: MergeProfile,
    stats: PairStatistics,
    search: SearchResult | None,
    metric: str,
    budget: float,
    summary: str,
    stem: str = DEFAULT_STEM,
    spectra: dict[str, dict[str, tuple[torch.Tensor, int]]] | None = None,
    kl_guard: float = 0.0,
) -> list[Path]:
    """Write the Markdown report and its plots into ``directory`` as ``<stem>_*``; returns the paths written.

    ``kl_guard``: the search's :attr:`~minicache.calibrate.search.Budget.kl_guard` (0: none)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = report_files(directory, stem)
    written = []
    plot_similarity(stats, files["similarity.png"])
    written.append(files["similarity.png"])
    predicted = search.predicted_damage if search else {}
    plot_groups(stats.num_layers, profile, predicted, files["groups.png"], metric)
    written.append(files["groups.png"])
    if search and search.steps:
        plot_search(search, metric, budget, files["search.png"])
        written.append(files["search.png"])
    if spectra:
        plot_spectra(spectra, files["spectra.png"])
        written.append(files["spectra.png"])

    rule = Budget(metric, budget, kl_guard)
    cal = profile.calibration or {}
    bits = cal.get("bits")
    if bits and profile.quantization is not None:
        plot_bits(profile, stats.num_layers, bits["frontier"], metric, budget, files["bits.png"])
        written.append(files["bits.png"])
    measured = cal.get("measured", {})
    data = cal.get("data", {})
    source = f"`{data['path']}`" if data.get("path") else data.get("source", "not recorded")
    lines = [
        "# MiniCache calibration report",
        "",
        summary,
        "",
        f"- model: `{profile.model.name_or_path if profile.model else 'unknown'}`",
        f"- data: {source} ({data.get('samples')} samples, {data.get('tokens')} tokens captured, "
        f"seed {data.get('seed')})",
        f"- budget: {metric} ≤ {budget:g} on held-out data, for the upper end of the 95 % interval (bootstrap "
        f"over the held-out windows), not only the point estimate",
        *_held_out_line(data, measured),
        *_coverage_lines(rule, measured),
        "",
        "## Result on held-out data",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("ppl_full", "ppl", "ppl_increase", "kl_mean", "kl_q95", "top1_agreement", "compression_ratio",
                "kv_bytes", "kv_bytes_full", "tokens_scored"):
        if key in measured:
            value = measured[key]
            lines.append(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")
    interval = measured.get("ppl_increase_ci95")
    if interval:
        lines.append(f"| ppl_increase, 95 % interval (paired bootstrap over windows) | "
                     f"{interval[0]:+.4%}..{interval[1]:+.4%} |")
    interval = measured.get("kl_mean_ci95")
    if interval:
        lines.append(f"| kl_mean, 95 % interval (bootstrap over windows) | {interval[0]:.5f}..{interval[1]:.5f} |")
    lines += ["", "## Groups", ""]
    if profile.groups:
        lines += ["| layers | keys (t or parameters) / γ | values (t or parameters) / γ |", "|---|---|---|"]
        for g in profile.groups:
            lines.append(f"| {list(g.layers)} | {_settings(g.keys)} | {_settings(g.values)} |")
    else:
        lines.append("No group fits the budget: the profile merges nothing (the cache behaves as a full cache).")
    lines += ["", f"![groups]({files['groups.png'].name})", ""]
    if spectra:
        lines += [
            "## Low-rank groups: variance kept",
            "",
            "Share of the calibration data's variance (about its mean) each basis keeps at the rank chosen; the "
            "rest is the restore error the search traded for bytes. Query-weighted key bases (`basis: query`) "
            "count the share of the calibration queries' logit energy instead (q·k about the mean).",
            "",
            "| group | keys rank | keys kept | values rank | values kept |",
            "|---|---|---|---|---|",
        ]
        for label, parts in spectra.items():
            cells = []
            for component in ("keys", "values"):
                curve, chosen = parts.get(component, (None, 0))
                kept = f"{float(curve[chosen - 1]):.1%}" if curve is not None and 0 < chosen <= curve.numel() else "–"
                cells += [str(chosen) if curve is not None else "–", kept]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"![spectra]({files['spectra.png'].name})", ""]
    if bits and profile.quantization is not None:
        q = profile.quantization
        lines += [
            "## Widths (--kv-bits auto)",
            "",
            f"{q.describe()}. Steps down from the widest width were ordered by a Fisher estimate of their damage "
            f"and the longest prefix within the budget was found by measuring (merging had "
            f"{bits.get('merge_budget_share', 0):.0%} of the budget first).",
            "",
            "| layer | " + " | ".join(str(i) for i in range(stats.num_layers)) + " |",
            "|---|" + "---|" * stats.num_layers,
            "| keys | " + " | ".join(str(q.bits_of(i)) for i in range(stats.num_layers)) + " |",
            "| values | " + " | ".join(str(q.bits_of(i, "values")) for i in range(stats.num_layers)) + " |",
            "",
            f"| steps taken | mean bits | compression | {metric} | upper 95 % | fits |",
            "|---|---|---|---|---|---|",
        ]
        for point in bits["frontier"]:
            lines.append(f"| {point['steps']} | {point['mean_bits']:.2f} | {point['compression_ratio']:.3f}x | "
                         f"{point['value']:+.5f} | {point['upper']:+.5f} | {'yes' if point['fits'] else 'no'} |")
        lines += ["", f"![bits]({files['bits.png'].name})", ""]
    lines += [
        "## Similarity between adjacent layers",
        "",
        "Mean cosine of the directions of the same token and KV head in layers l and l+1 (0 = unrelated).",
        "",
        "| pair | keys mean cos | values mean cos | keys median angle | values median angle | retained at γ |",
        "|---|---|---|---|---|---|",
    ]
    cos = stats.mean_cosine().mean(-1)
    median = stats.angle_quantiles((0.5,))[..., 0].mean(-1) * 180
    gamma_index = min(range(len(stats.gammas)), key=lambda g: abs(stats.gammas[g] - profile.defaults.gamma))
    retained = stats.retained_fraction()[..., gamma_index].mean(dim=(1, 2))
    for p in range(cos.shape[0]):
        lines.append(
            f"| {p}-{p + 1} | {cos[p, 0]:+.3f} | {cos[p, 1]:+.3f} | {median[p, 0]:.1f}° | {median[p, 1]:.1f}° "
            f"| {retained[p]:.1%} |"
        )
    lines += ["", f"![similarity]({files['similarity.png'].name})", ""]
    if search and search.steps:
        lines += [
            "## Search",
            "",
            "Every profile measured on held-out data (probe: one group alone; verify: a candidate set; "
            "extend: the best set so far plus one group). A set fits when the upper end of its 95 % interval "
            "is within the budget.",
            "",
            f"| step | groups | {metric} | 95 % interval | fits | compression |",
            "|---|---|---|---|---|---|",
        ]
        for s in search.steps:
            interval = getattr(s.result, f"{metric}_ci95")
            shown = f"{interval[0]:+.5f}..{interval[1]:+.5f}" if interval else "none (1 window)"
            lines.append(
                f"| {s.kind} | {_step_groups(s)} | {getattr(s.result, metric):+.5f} | {shown} "
                f"| {'yes' if rule.fits(s.result) else 'no'} | {s.result.compression_ratio:.4f}x |"
            )
        lines += ["", f"![search]({files['search.png'].name})", ""]
    path = files["report.md"]
    _atomic_write_bytes(path, "\n".join(lines).encode())
    written.append(path)
    return written

