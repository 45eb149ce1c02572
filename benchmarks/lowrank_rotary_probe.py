"""Two more bases a low-rank store could use on SmolLM2, measured out of sample (issue 17, items 2-3).

1. **Keys: a basis that commutes with RoPE.** RoPE turns channel pair ``(i, i + D/2)`` of every head by
   the same angle ``p·θ_i`` at position ``p``; a projection that is complex-linear within each
   frequency's ``H`` heads (one Hermitian ``H × H`` second moment per frequency, its top
   eigenvectors across all frequencies, each one two real columns) commutes with that rotation. Such
   a basis would give pre-RoPE quality to post-RoPE storage and still let attention score the
   coefficients without restoring. Compared with the real PCA of post-RoPE keys (what the runtime
   stores) and of pre-RoPE keys, by restore error and by the queries' logit error.
2. **Values: a basis weighted by the output projection.** Attention's output error for a value error
   ``e`` of KV head ``h`` is ``Σ_j ‖W_o,j e‖²`` over the query heads ``j`` reading it: PCA of
   ``v M^{1/2}`` with ``M = Σ_j W_o,jᵀ W_o,j`` minimises that instead of ``‖e‖²``.

Fitted on 16 windows of 768 tokens of the shipped calibration data, measured on 8 windows of 768
tokens of two licences, one layer at a time, one basis over all KV heads (``joint``).

    .venv/bin/python benchmarks/lowrank_rotary_probe.py --out benchmarks/results/lowrank-cpu/rotary-probe.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowrank_probe import block_diag, capture, flat, query_second_moment, sqrt_and_inverse

from minicache.data import read_samples, split_text, token_windows
from minicache.methods.lowrank import SecondMoments, fit_bases
from minicache.models import load_model

LAYERS = (1, 4, 7, 12, 16, 20, 24, 27)
FRACTIONS = (1 / 16, 1 / 8, 1 / 4)


def rotary_basis(second: torch.Tensor, heads: int, dim: int, width: int) -> torch.Tensor:
    """``[H·D, width]`` real orthonormal basis commuting with RoPE, from the uncentred second moment
    ``[H·D, H·D]`` of post-RoPE keys (invariant to the rotation in its complex form)."""
    half = dim // 2
    candidates = []
    for i in range(half):
        a = torch.tensor([h * dim + i for h in range(heads)])
        b = a + half
        # E[z zᴴ] of z = a + ib: real part E[aaᵀ + bbᵀ], imaginary part E[baᵀ − abᵀ]
        hermitian = torch.complex(second[a][:, a] + second[b][:, b], second[b][:, a] - second[a][:, b])
        values, vectors = torch.linalg.eigh(hermitian)
        candidates += [(float(values[j]), i, vectors[:, j]) for j in range(heads)]
    candidates.sort(key=lambda c: -c[0])
    columns = []
    for _, i, u in candidates[: width // 2]:
        a = torch.tensor([h * dim + i for h in range(heads)])
        b = a + half
        real, imag = torch.zeros(heads * dim, dtype=torch.float64), torch.zeros(heads * dim, dtype=torch.float64)
        real[a], real[b] = u.real, u.imag  # Re(uᴴ z) = uᵣ·a + uᵢ·b
        imag[a], imag[b] = -u.imag, u.real  # Im(uᴴ z) = uᵣ·b − uᵢ·a
        columns += [real, imag]
    return torch.stack(columns, 1)


def output_metric(model, layer: int, heads: int, dim: int) -> torch.Tensor:
    """``[H, D, D]``: Σ W_o,jᵀ W_o,j over the query heads j reading each KV head."""
    w = model.model.layers[layer].self_attn.o_proj.weight.detach().double()
    query_heads = w.shape[1] // dim
    per_head = w.reshape(-1, query_heads, dim)
    group = query_heads // heads
    return torch.stack([sum(per_head[:, h * group + j].T @ per_head[:, h * group + j] for j in range(group))
                        for h in range(heads)])


def weighted_error(error: torch.Tensor, x: torch.Tensor, metric: torch.Tensor) -> float:
    """``Σ eᵀ M e / Σ xᵀ M x`` over rows ``[N, W]``."""
    return float(torch.einsum("ni,ij,nj->", error, metric, error) / torch.einsum("ni,ij,nj->", x, metric, x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--held-out", default="/usr/share/common-licenses/Apache-2.0,/usr/share/common-licenses/GPL-2")
    parser.add_argument("--out", default="benchmarks/results/lowrank-cpu/rotary-probe.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    h, d, n_layers = model.config.num_key_value_heads, model.config.head_dim, model.config.num_hidden_layers
    calib = token_windows(read_samples(args.calibration), tok, 768, 16, spread=True)
    held_samples = [s for path in args.held_out.split(",") for s in split_text(Path(path).read_text())]
    held = token_windows(held_samples, tok, 768, 8, spread=True)

    post, pre = SecondMoments(n_layers, h, d, 0), SecondMoments(n_layers, h, d, 0)
    uncentred = {layer: 0 for layer in LAYERS}
    for batch in capture(model, calib):
        post.add(list(zip(batch["k_post"], batch["v"], strict=True)))
        pre.add(list(zip(batch["k_pre"], batch["v"], strict=True)))
        for layer in LAYERS:
            x = flat([batch["k_post"][layer]])
            uncentred[layer] = uncentred[layer] + x.T @ x
    held_kv = {name: {layer: [] for layer in LAYERS} for name in ("k_post", "k_pre", "v")}
    queries = 0
    for batch in capture(model, held):
        for name, per_layer in held_kv.items():
            for layer in LAYERS:
                per_layer[layer].append(batch[name][layer])
        queries = queries + query_second_moment(batch["q_post"], h)
    held_kv = {name: {layer: flat([torch.cat(v)]) for layer, v in per.items()} for name, per in held_kv.items()}

    rows = []
    for layer in LAYERS:
        w_logit = block_diag(queries[[layer]])
        fit_post, fit_pre = fit_bases(post, (layer,)), fit_bases(pre, (layer,))
        metric = output_metric(model, layer, h, d)
        half, inverse = sqrt_and_inverse(metric.unsqueeze(0))
        s, s_inv = block_diag(half), block_diag(inverse)
        _, cov_v = post.covariance((layer,), 1)
        _, weighted_vectors = torch.linalg.eigh(s.T @ cov_v @ s)
        for fraction in FRACTIONS:
            width = round(fraction * d) * h
            row = {"layer": layer, "fraction": fraction}

            for frame, fitted in (("post", fit_post), ("pre", fit_pre)):
                u = fitted["keys"]["basis_joint"].double().reshape(h * d, -1)[:, :width]
                mean = fitted["keys"]["mean"].double().reshape(-1)
                x = held_kv[f"k_{frame}"][layer]
                restored = mean + (x - mean) @ u @ u.T
                row[f"keys {frame}-RoPE err"] = float((x - restored).square().sum() / x.square().sum())
                if frame == "post":
                    row["keys post-RoPE logit"] = weighted_error(x - restored, x, w_logit)
            u = rotary_basis(uncentred[layer], h, d, width)
            x = held_kv["k_post"][layer]
            restored = x @ u @ u.T
            row["keys rotary err"] = float((x - restored).square().sum() / x.square().sum())
            row["keys rotary logit"] = weighted_error(x - restored, x, w_logit)

            mean = fit_post["values"]["mean"].double().reshape(-1)
            c = held_kv["v"][layer] - mean
            m = torch.block_diag(*metric)
            u = fit_post["values"]["basis_joint"].double().reshape(h * d, -1)[:, :width]
            e = c - c @ u @ u.T
            row["values pca err"] = float(e.square().sum() / c.square().sum())
            row["values pca output"] = weighted_error(e, c, m)
            v = weighted_vectors.flip(-1)[:, :width]
            e = c - c @ s @ v @ v.T @ s_inv
            row["values weighted err"] = float(e.square().sum() / c.square().sum())
            row["values weighted output"] = weighted_error(e, c, m)
            rows.append(row)
            print(json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()}), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = [k for k in rows[0] if k not in ("layer", "fraction")]
    lines = [
        "# RoPE-commuting key bases and output-weighted value bases on SmolLM2-135M-Instruct (held-out text)",
        "",
        f"Fitted on 16 windows of 768 tokens of `{args.calibration}`; measured on 8 windows of 768 tokens of "
        f"`{args.held_out}`; one basis over all KV heads of one layer; width = stored coefficients per token "
        "and KV head as a fraction of D. `err` = Σ‖x − x̂‖² / Σ‖x‖²; `logit` = Σ (q·(k − k̂))² / Σ (q·k)² "
        "with the held-out queries' second moment; `output` = the same with M = Σ_j W_o,jᵀ W_o,j for values.",
        "",
        "Command: `.venv/bin/python benchmarks/lowrank_rotary_probe.py`",
        "",
        "| layer | width | " + " | ".join(columns) + " |",
        "|---:|---:|" + "---:|" * len(columns),
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['fraction']:.4g} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
