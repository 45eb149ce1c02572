"""Would non-uniform code levels make 2-3-bit rotated storage better? A simulation (issue 18).

``rotated`` storage rounds each group, normalised to ``u = (x − min) / (max − min)`` in ``[0, 1]``, to
one of ``2^b`` *evenly spaced* levels. After the Hadamard rotation the values of a group are
near-Gaussian, so most fall in the middle of the range and the even levels waste resolution on the
tails. This probe fits, per role (keys: per channel over a group of tokens; values: per token over the
channels) and width, ``2^b`` levels in ``[0, 1]`` by Lloyd's algorithm on calibration text (each sample
weighted by its group's squared range, so the levels minimise the squared error of the values), and
stores the same bytes (codes, the group's min and max): only the table of levels differs, a constant
of the scheme.

It measures the levels' squared error on the calibration rows, then runs the protocol of
``transform_coding_probe.py`` (a cached prefix's round trip, a continuation scored against the full
cache) for the even and the fitted levels on the same windows.

    source benchmarks/unseen_text.sh && mkdir -p /tmp/tc && write_unseen_text /tmp/tc
    .venv/bin/python benchmarks/levels_probe.py --anchors 3/3/64,3/3/128,2/2/64,4/2/64

A simulation: nothing here stores less. It decides whether a non-uniform quantizer is worth building.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from transform_coding_probe import packed_bytes_per_token, packed_span, score  # benchmarks/ is this directory

from minicache.data import read_samples, split_text, token_windows
from minicache.evaluate.quality import ppl_increase_interval
from minicache.models import load_model
from minicache.quant.rotated import rotation_matrix


def grouped(x: torch.Tensor, role: str, group: int) -> tuple[torch.Tensor, int]:
    """``x`` ``[B, H, T, D]`` (rotated) as groups: keys ``[B, H, T/g, g, D]`` reduced over dim -2,
    values ``[B, H, T, D/g', g']`` over dim -1 (``g' = min(group, D)``)."""
    b, h, t, d = x.shape
    if role == "keys":
        return x.reshape(b, h, t // group, group, d), -2
    g = min(group, d)
    return x.reshape(b, h, t, d // g, g), -1


def normalised(x: torch.Tensor, role: str, group: int):
    g, dim = grouped(x, role, group)
    lo, hi = g.amin(dim, keepdim=True), g.amax(dim, keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    return (g - lo) / span, lo, span, dim


def fit_levels(samples: torch.Tensor, weights: torch.Tensor, count: int, iterations: int = 60,
               fixed_ends: bool = False) -> torch.Tensor:
    """Lloyd's algorithm on ``samples`` in ``[0, 1]`` (weighted): ``count`` sorted levels; ``fixed_ends``:
    the first and last stay at 0 and 1 (a group's minimum and maximum are restored exactly)."""
    levels = torch.linspace(0, 1, count, dtype=torch.float64)
    s, w = samples.double(), weights.double()
    for _ in range(iterations):
        edges = (levels[1:] + levels[:-1]) / 2
        idx = torch.bucketize(s, edges)
        total = torch.zeros(count, dtype=torch.float64).index_add_(0, idx, w)
        moment = torch.zeros(count, dtype=torch.float64).index_add_(0, idx, w * s)
        levels = torch.where(total > 0, moment / total.clamp_min(1e-30), levels)
        if fixed_ends:
            levels[0], levels[-1] = 0.0, 1.0
    return levels.float()


def roundtrip(x: torch.Tensor, role: str, group: int, levels: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Round trip of ``x`` ``[B, H, T, D]`` with the given levels (min and max kept in float32 here)."""
    u, lo, span, _ = normalised(x.float() @ rotation, role, group)
    edges = (levels[1:] + levels[:-1]) / 2
    restored = lo + levels[torch.bucketize(u, edges)] * span
    return (restored.reshape(x.shape) @ rotation.T).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="minicache/calibrate/corpus/default.jsonl,"
                                                  "profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--unseen", default="/tmp/tc/licences.txt,/tmp/tc/code.txt,/tmp/tc/notes.txt")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--calib-length", type=int, default=1024)
    parser.add_argument("--windows-per-text", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--report-length", type=int, default=4096)
    parser.add_argument("--anchors", default="3/3/64,3/3/128,2/2/64,4/2/64",
                        help="key/value widths and key group size (tokens) to compare")
    parser.add_argument("--fixed-ends", action="store_true",
                        help="keep the first and last level at the group's minimum and maximum")
    parser.add_argument("--out", default="benchmarks/results/transform-cpu/levels-probe.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    cfg = model.config
    layers, h, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    rotation = rotation_matrix(d)
    samples = [s for path in args.calibration.split(",") for s in read_samples(path)]
    calib = token_windows(samples, tok, args.calib_length, args.calib_windows, spread=True)
    with torch.no_grad():
        calib_cache = model(input_ids=calib, use_cache=True).past_key_values
    length = args.prefix + args.continuation
    evals = torch.cat([token_windows(split_text(Path(p).read_text()), tok, length, args.windows_per_text, spread=True)
                       for p in args.unseen.split(",")])
    span = slice(args.sinks, args.prefix - args.window)

    # levels per (role, bits, group), fitted on the calibration cache (sink dropped), and their error
    fitted: dict[tuple[str, int, int], torch.Tensor] = {}
    error_lines = ["| role | bits | group | squared error, even levels | fitted levels | ratio | levels |",
                   "| :--- | ---: | ---: | ---: | ---: | ---: | :--- |"]
    generator = torch.Generator().manual_seed(0)
    for anchor in args.anchors.split(","):
        kb, vb, group = (int(x) for x in anchor.split("/"))
        for role, bits in (("keys", kb), ("values", vb)):
            if (role, bits, group) in fitted:
                continue
            us, ws = [], []
            for lay in calib_cache.layers:
                x = getattr(lay, role)[:, :, 1:1 + (calib.shape[1] - 1) // group * group]
                u, _, sp, _ = normalised(x.float() @ rotation, role, group)
                us.append(u.flatten())
                ws.append((sp**2).expand_as(u).flatten())
            u_all, w_all = torch.cat(us), torch.cat(ws)
            pick = torch.randperm(u_all.numel(), generator=generator)[:4_000_000]
            levels = fit_levels(u_all[pick], w_all[pick], 1 << bits, fixed_ends=args.fixed_ends)
            fitted[(role, bits, group)] = levels
            even = torch.linspace(0, 1, 1 << bits)
            errors = []
            for lv in (even, levels):
                e = 0.0
                for lay in calib_cache.layers:
                    x = getattr(lay, role)[:, :, 1:1 + (calib.shape[1] - 1) // group * group]
                    e += (roundtrip(x, role, group, lv, rotation) - x).pow(2).sum().item()
                errors.append(e)
            error_lines.append(f"| {role} | {bits} | {group} | {errors[0]:.4g} | {errors[1]:.4g} | "
                               f"{errors[1] / errors[0]:.3f} | {', '.join(f'{v:.3f}' for v in levels.tolist())} |")
            print(error_lines[-1], flush=True)

    prefixes = []
    for w in range(evals.shape[0]):
        ids = evals[w:w + 1]
        with torch.no_grad():
            cache = model(input_ids=ids[:, :args.prefix], use_cache=True).past_key_values
        nll, logp, _, _ = score(model, copy.deepcopy(cache), ids[:, args.prefix:], None)
        prefixes.append((ids, cache, nll, logp))

    full_bytes_token = layers * 2 * h * d * 2
    exact_tokens = args.sinks + args.window

    def report_compression(packed: float) -> float:
        n = args.report_length
        return n * full_bytes_token / (exact_tokens * full_bytes_token + (n - exact_tokens) * packed)

    rows = []
    for anchor in args.anchors.split(","):
        kb, vb, group = (int(x) for x in anchor.split("/"))
        per_token = packed_bytes_per_token(prefixes[0][1], "rotated", (kb, vb), span, 0.0, group)
        for name, key_levels, value_levels in (
                ("even", torch.linspace(0, 1, 1 << kb), torch.linspace(0, 1, 1 << vb)),
                ("fitted keys", fitted[("keys", kb, group)], torch.linspace(0, 1, 1 << vb)),
                ("fitted", fitted[("keys", kb, group)], fitted[("values", vb, group)])):
            inner = packed_span(span, group)
            nll_all, ref_all, kls, tops = [], [], [], []
            for ids, cache, ref_nll, ref_logp in prefixes:
                out = copy.deepcopy(cache)
                for lay in out.layers:
                    lay.keys[:, :, inner] = roundtrip(lay.keys[:, :, inner], "keys", group, key_levels, rotation)
                    lay.values[:, :, inner] = roundtrip(lay.values[:, :, inner], "values", group, value_levels,
                                                        rotation)
                nll, _, kl, top1 = score(model, out, ids[:, args.prefix:], ref_logp)
                nll_all.append(nll)
                ref_all.append(ref_nll)
                kls.append(kl.mean())
                tops.append(top1.mean())
            nll_t, ref_t = torch.cat(nll_all), torch.cat(ref_all)
            inc = (nll_t.double().mean() - ref_t.double().mean()).exp().item() - 1
            low, high = ppl_increase_interval(ref_t, nll_t)
            row = {"anchor": anchor, "levels": name, "compression": report_compression(per_token),
                   "ppl_increase": inc, "low": low, "high": high, "kl": torch.stack(kls).mean().item(),
                   "top1": torch.stack(tops).mean().item()}
            rows.append(row)
            print(f"k{kb}v{vb} g{group} {name:12s} {row['compression']:.3f}x {100 * inc:+.2f}% "
                  f"[{100 * low:+.2f}, {100 * high:+.2f}] KL {row['kl']:.4f} top-1 {100 * row['top1']:.1f}%",
                  flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Simulation (round trip on the cached prefix, nothing stored less): SmolLM2-135M-Instruct, float32, "
        f"{evals.shape[0]} windows of {args.prefix} prefix + {args.continuation} scored tokens "
        f"({evals.shape[0] * args.continuation} scored tokens) over {args.unseen}; sinks {args.sinks}, exact window "
        f"{args.window}; levels fitted on {args.calib_windows} x {args.calib_length} tokens of {args.calibration}. "
        f"Compression counted for a {args.report_length}-token bfloat16 context (same bytes for every level table)."
        + (" Fitted levels keep their ends at the group's minimum and maximum." if args.fixed_ends else ""),
        "", "Squared error of the round trip on the calibration cache (all layers, sink dropped):", "",
        *error_lines, "",
        "| widths k/v, key group | levels | compression | ppl increase | 95 % interval | KL mean | top-1 |",
        "| :--- | :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['anchor']} | {r['levels']} | {r['compression']:.3f}x | {100 * r['ppl_increase']:+.2f}% | "
                     f"{100 * r['low']:+.2f}%..{100 * r['high']:+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.2f}% |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                    "levels": {f"{r}/{b}/{g}": v.tolist()
                                                               for (r, b, g), v in fitted.items()}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
