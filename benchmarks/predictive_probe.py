"""How much of a layer's KV a linear map from the layer below predicts, on text the fit never saw (issue 18).

Fits ridge maps ``x_l ≈ μ_l + (x_{l−1} − μ_{l−1}) W_l`` per layer on calibration windows and reports,
on held-out windows, the residual's share of the energy, by what is predicted from what:

* keys post-RoPE from the keys below (as the cache stores them: what ``predictive_residual`` does);
* keys pre-RoPE from the keys below, pre-RoPE (the rotation undone at each position);
* values from the values below (what ``predictive_residual`` does);
* values from the values below *and the same layer's keys* (pre-RoPE), which the method's
  per-component protocol cannot do yet;

each with one map over all KV heads (``joint``) and one per KV head (``each``). Two shares per row:
of the centred energy (against storing ``x − μ``; KIVI's per-channel key groups remove about that)
and of the raw energy (against storing ``x`` per token).

    .venv/bin/python benchmarks/predictive_probe.py --out benchmarks/results/predictive-cpu/probe.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lowrank_probe import capture  # benchmarks/ is this script's directory

from minicache.data import read_samples, split_text, token_windows
from minicache.models import load_model

RIDGE = 1e-3


def collect(model, windows: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per kind, per layer: ``[N, H·D]`` float64 rows (sink token dropped)."""
    layers = model.config.num_hidden_layers
    acc = {name: [[] for _ in range(layers)] for name in ("k_post", "k_pre", "v")}
    for batch in capture(model, windows):
        for name in acc:
            for layer in range(layers):
                acc[name][layer].append(batch[name][layer][..., 1:, :].permute(0, 2, 1, 3).flatten(2).flatten(0, 1))
    return {name: [torch.cat(rows) for rows in per] for name, per in acc.items()}


def fit(z: torch.Tensor, y: torch.Tensor, heads: int | None):
    """Ridge map from ``z`` to ``y`` (``heads``: block-diagonal per head of ``y``'s width)."""
    zm, ym = z.mean(0), y.mean(0)
    z1, y1 = z - zm, y - ym

    def solve(a, b):
        gram = a.T @ a
        gram += RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        return torch.linalg.solve(gram, a.T @ b)

    if heads is None:
        w = solve(z1, y1)
    else:
        d = y.shape[1] // heads
        w = torch.block_diag(*[solve(z1[:, i * d:(i + 1) * d], y1[:, i * d:(i + 1) * d]) for i in range(heads)])
    return lambda zz: (zz - zm) @ w + ym


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--held-out", default="/usr/share/common-licenses/Apache-2.0,/usr/share/common-licenses/GPL-2")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/predictive-cpu/probe.md")
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m", dtype="float32")
    heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    calib = collect(model, token_windows(read_samples(args.calibration), tok, args.length, args.windows, spread=True))
    held_samples = [s for path in args.held_out.split(",") for s in split_text(Path(path).read_text())]
    held = collect(model, token_windows(held_samples, tok, args.length, max(args.windows // 2, 4), spread=True))

    rows = []
    for what, target, inputs in (("keys post-RoPE ← keys below", "k_post", ("k_post",)),
                                 ("keys pre-RoPE ← keys below", "k_pre", ("k_pre",)),
                                 ("values ← values below", "v", ("v",)),
                                 ("values ← values below + own keys", "v", ("v", "k_pre"))):
        for layout in ("joint", "each"):
            if len(inputs) > 1 and layout == "each":
                continue
            centred, raw = [], []
            for layer in range(1, layers):
                def source(data, layer=layer, inputs=inputs):
                    parts = [data[inputs[0]][layer - 1]] + [data[name][layer] for name in inputs[1:]]
                    return torch.cat(parts, dim=1)
                predict = fit(source(calib), calib[target][layer], None if layout == "joint" else heads)
                y = held[target][layer]
                residual = (y - predict(source(held))).square().sum()
                centred.append(float(residual / (y - calib[target][layer].mean(0)).square().sum()))
                raw.append(float(residual / y.square().sum()))
            row = {"predicted": what, "map": layout, "centred_share_mean": sum(centred) / len(centred),
                   "raw_share_mean": sum(raw) / len(raw), "centred_share_per_layer": centred}
            rows.append(row)
            print(f"{what:34s} {layout:5s} centred {row['centred_share_mean']:.3f} raw {row['raw_share_mean']:.3f}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    lines = [
        f"Residual energy share of a ridge prediction from the layer below, layers 1-{layers - 1} averaged; fit on "
        f"{args.windows} x {args.length} tokens of `{args.calibration}`, scored on held-out `{args.held_out}` "
        f"(`python benchmarks/predictive_probe.py`). Lower is better; ½·log2(1/share) is about the bits saved.",
        "",
        "| predicted | map | share of centred energy | share of raw energy |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['predicted']} | {r['map']} | {r['centred_share_mean']:.3f} | {r['raw_share_mean']:.3f} |"
              for r in rows]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
