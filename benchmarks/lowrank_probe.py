"""How well a calibrated low-rank basis restores SmolLM2's KV, by layout (issue 17, items 1-3).

Fits PCA bases on calibration windows and measures, on held-out text, the relative restore error
``Σ‖x − x̂‖² / Σ‖x‖²`` at several stored widths, for:

* keys post-RoPE (as the cache stores them) vs pre-RoPE (rotation undone at each position; RoPE is
  orthogonal per position, so the error norms compare directly);
* one basis over all KV heads of the group's layers (``joint``) vs one per KV head (``each``);
* for keys, plain PCA vs a query-weighted basis (PCA of ``x W^{1/2}`` with ``W = E[q qᵀ]`` of the
  query heads reading that KV head, Eigen Attention / Palu style), scored by the relative *logit*
  error ``Σ (q·(k − k̂))² / Σ (q·k)²`` that attention sees.

    .venv/bin/python benchmarks/lowrank_probe.py --out benchmarks/results/lowrank-cpu/probe.md

Restore errors only: the damage to perplexity of what the runtime stores is measured by
``minicache-calibrate --methods slerp,lowrank`` and ``minicache-eval``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minicache.data import read_samples, split_text, token_windows
from minicache.methods.lowrank import SecondMoments, fit_bases
from minicache.models import load_model

GROUPS = [(4,), (12,), (20,), (27,), (4, 5), (12, 13), (20, 21), (26, 27), (24, 25, 26, 27)]
FRACTIONS = (1 / 8, 1 / 4, 3 / 8)


def capture(model, windows: torch.Tensor, batch: int = 4):
    """Yield per batch: {"q_pre","k_pre","q_post","k_post","v"} lists over layers, [B, H, T, D] float64."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layers = model.model.layers
    store: dict[str, list] = {}
    hooks = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            def hook(_m, _inp, out, i=i, name=name, d=attn.head_dim):
                b, t, _ = out.shape
                store.setdefault(name, {})[i] = out.view(b, t, -1, d).transpose(1, 2).double()
            hooks.append(getattr(attn, name).register_forward_hook(hook))
    try:
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch]
            store.clear()
            with torch.no_grad():
                model(input_ids=ids)
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            cos, sin = model.model.rotary_emb(store["k_proj"][0].float(), pos)
            out = {"q_pre": [], "k_pre": [], "q_post": [], "k_post": [], "v": []}
            for i in range(len(layers)):
                q, k = store["q_proj"][i], store["k_proj"][i]
                q_post, k_post = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
                out["q_pre"].append(q)
                out["k_pre"].append(k)
                out["q_post"].append(q_post)
                out["k_post"].append(k_post)
                out["v"].append(store["v_proj"][i])
            yield out
    finally:
        for h in hooks:
            h.remove()


def query_second_moment(qs, num_kv_heads: int, sink: int = 1) -> torch.Tensor:
    """``[L, H, D, D]``: Σ q qᵀ over the query heads reading each KV head."""
    out = []
    for q in qs:
        b, hq, t, d = q.shape
        g = q[..., sink:, :].reshape(b, num_kv_heads, hq // num_kv_heads, t - sink, d)
        out.append(torch.einsum("bhgtd,bhgte->hde", g, g))
    return torch.stack(out)


def sqrt_and_inverse(w: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``W^{1/2}`` and ``W^{-1/2}`` of symmetric PSD matrices ``[..., D, D]`` (ridge for invertibility)."""
    d = w.shape[-1]
    w = w + ridge * w.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(d, dtype=w.dtype)
    values, vectors = torch.linalg.eigh(w)
    values = values.clamp_min(1e-30)
    half = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(-1, -2)
    inv = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(-1, -2)
    return half, inv


def block_diag(mats: torch.Tensor) -> torch.Tensor:
    """``[k, H, D, D]`` → block-diagonal ``[k·H·D, k·H·D]`` (member-major, head-major)."""
    k, h, d, _ = mats.shape
    return torch.block_diag(*mats.reshape(k * h, d, d))


def flat(xs: list[torch.Tensor], sink: int = 1) -> torch.Tensor:
    """Members ``[B, H, T, D]`` → ``[B·T', k·H·D]`` (member-major, head-major)."""
    return torch.cat([x[..., sink:, :].permute(0, 2, 1, 3).flatten(2).flatten(0, 1) for x in xs], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--held-out", default="/usr/share/common-licenses/Apache-2.0,/usr/share/common-licenses/GPL-2")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--out", default="benchmarks/results/lowrank-cpu/probe.md")
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m", dtype="float32")
    h, d = model.config.num_key_value_heads, model.config.head_dim
    n_layers = model.config.num_hidden_layers
    calib = token_windows(read_samples(args.calibration), tok, args.length, args.windows, spread=True)
    held_samples = [s for path in args.held_out.split(",") for s in split_text(Path(path).read_text())]
    held = token_windows(held_samples, tok, args.length, max(args.windows // 2, 4), spread=True)

    # 1. fit: second moments of post-RoPE keys, pre-RoPE keys and values; query second moments
    span = max(len(g) for g in GROUPS) - 1
    moments = {"post": SecondMoments(n_layers, h, d, span), "pre": SecondMoments(n_layers, h, d, span)}
    wq = {"post": 0, "pre": 0}
    for batch in capture(model, calib):
        moments["post"].add(list(zip(batch["k_post"], batch["v"], strict=True)))
        moments["pre"].add(list(zip(batch["k_pre"], batch["v"], strict=True)))
        for frame in ("post", "pre"):
            wq[frame] = wq[frame] + query_second_moment(batch[f"q_{frame}"], h)
    # 2. held-out data of the probed layers
    probed = sorted({layer for g in GROUPS for layer in g})
    held_kv = {name: {layer: [] for layer in probed} for name in ("k_post", "k_pre", "v")}
    wq_held = {"post": 0, "pre": 0}
    for batch in capture(model, held):
        for name in held_kv:
            for layer in probed:
                held_kv[name][layer].append(batch[name][layer])
        for frame in ("post", "pre"):
            wq_held[frame] = wq_held[frame] + query_second_moment(batch[f"q_{frame}"], h)
    held_kv = {name: {layer: torch.cat(v) for layer, v in per.items()} for name, per in held_kv.items()}

    rows = []
    for group in GROUPS:
        k = len(group)
        fits = {frame: fit_bases(moments[frame], group) for frame in ("post", "pre")}
        for what, frame, component in (("keys post-RoPE", "post", "keys"), ("keys pre-RoPE", "pre", "keys"),
                                        ("values", "post", "values")):
            name = {"keys": f"k_{frame}", "values": "v"}[component]
            x = flat([held_kv[name][layer] for layer in group])
            fitted = fits[frame][component]
            mean = fitted["mean"].double().reshape(-1)
            centred = x - mean
            energy = x.square().sum()
            w_held = block_diag(wq_held[frame][list(group)]) if component == "keys" else None
            for layout in ("joint", "each"):
                for basis_kind in (("pca", "query-weighted") if component == "keys" else ("pca",)):
                    row = {"group": f"{group[0]}-{group[-1]}", "k": k, "data": what, "heads": layout,
                           "basis": basis_kind}
                    for f in FRACTIONS:
                        rank = max(1, round(f * k * d))  # per KV head
                        restored = _restore(centred, fitted, layout, rank, k, h, d, basis_kind, wq[frame], group,
                                            moments[frame], component)
                        err = restored - centred
                        row[f"err@{f:.3f}"] = float(err.square().sum() / energy)
                        if w_held is not None:
                            logit_err = torch.einsum("ni,ij,nj->", err, w_held, err)
                            logit = torch.einsum("ni,ij,nj->", x, w_held, x)
                            row[f"logit@{f:.3f}"] = float(logit_err / logit)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.write_text(_table(rows, args))
    print(f"wrote {out}")


def _restore(centred, fitted, layout, rank, k, h, d, basis_kind, wq, group, moments, component):
    """Projection of centred ``[N, k·H·D]`` rows on the fitted basis of ``rank`` per KV head."""
    if basis_kind == "pca":
        if layout == "joint":
            u = fitted["basis_joint"].double().reshape(k * h * d, -1)[:, : rank * h]
            return centred @ u @ u.T
        u = fitted["basis_each"].double()[..., :rank]  # [k, H, D, r]
        out = torch.zeros_like(centred)
        for head in range(h):
            idx = torch.arange(k * h * d).reshape(k, h, d)[:, head].reshape(-1)
            uh = u[:, head].reshape(k * d, rank)
            out[:, idx] = centred[:, idx] @ uh @ uh.T
        return out
    # query-weighted: PCA of x S with S = blockdiag(W^{1/2}); restore through S^{-1}
    half, inv = sqrt_and_inverse(wq[list(group)])  # [k, H, D, D]
    s, s_inv = block_diag(half), block_diag(inv)
    _, cov = moments.covariance(tuple(group), 0 if component == "keys" else 1)
    cov_y = s.T @ cov @ s
    if layout == "joint":
        _, vectors = torch.linalg.eigh(cov_y)
        v = vectors.flip(-1)[:, : rank * h]
        return centred @ s @ v @ v.T @ s_inv
    out = torch.zeros_like(centred)
    for head in range(h):
        idx = torch.arange(k * h * d).reshape(k, h, d)[:, head].reshape(-1)
        cy = cov_y[idx][:, idx]
        _, vectors = torch.linalg.eigh(cy)
        v = vectors.flip(-1)[:, :rank]
        out[:, idx] = centred[:, idx] @ s[idx][:, idx] @ v @ v.T @ s_inv[idx][:, idx]
    return out


def _table(rows, args) -> str:
    cols = [f"{f:.3f}" for f in FRACTIONS]
    lines = [
        "# Low-rank restore error on SmolLM2-135M-Instruct (held-out text)",
        "",
        f"Fitted on {args.windows} windows of {args.length} tokens of `{args.calibration}`; measured on "
        f"windows of `{args.held_out}`. Stored width as a fraction of the group's full width per KV head "
        "(1/8 = 8x fewer values on those layers). `err` = Σ‖x − x̂‖² / Σ‖x‖²; `logit` (keys) = "
        "Σ (q·(k − k̂))² / Σ (q·k)² with the held-out queries' second moment.",
        "",
        "Command: `.venv/bin/python benchmarks/lowrank_probe.py`",
        "",
        "| group | data | heads | basis | " + " | ".join(f"err @{c}" for c in cols) + " | "
        + " | ".join(f"logit @{c}" for c in cols) + " |",
        "|---|---|---|---|" + "---:|" * (2 * len(cols)),
    ]
    for r in rows:
        errs = " | ".join(f"{r[f'err@{c}']:.3f}" for c in cols)
        logits = " | ".join(f"{r[f'logit@{c}']:.3f}" if f"logit@{c}" in r else "" for c in cols)
        lines.append(f"| {r['group']} | {r['data']} | {r['heads']} | {r['basis']} | {errs} | {logits} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
