"""Would rounding with error feedback (GPTQ / LDLQ) make low-bit keys and values cheaper? A simulation (issue 18).

A packed group rounds every channel to its nearest level. What attention loses is not the squared error:
a key's error ``e`` moves the logit of query ``q`` by ``q · e``, so it costs ``eᵀ H_k e`` with ``H_k`` the second
moment of the queries that read it; a value's error reaches the residual stream through ``o_proj``, so it
costs ``eᵀ H_v e`` with ``H_v = Σ_g W_gᵀ W_g`` over the query heads ``g`` that share the KV head. Rounding the
channels of a vector one at a time and pushing each one's error onto the channels not yet rounded (LDLQ,
QuIP arXiv 2307.13304; GPTQ arXiv 2210.17323) minimises that form instead, with the same levels, scales
and zero points: the packed format and every reader stay as they are; only packing changes.

* ``H_k`` (pre-RoPE keys, the frame they are packed in): ``E[RoPE_Δ q qᵀ RoPE_Δᵀ]`` over pre-RoPE queries
  of the KV head's query heads and distances ``Δ`` between a query and the packed tokens it reads, fitted on
  ``--calibration`` text (not the scored text);
* ``H_v``: from the weights alone.

Both are taken into the rotated frame (``Rᵀ H R``). Rows compare nearest rounding (the runtime's packing;
checked equal) with feedback on keys, values, or both; key groups of ``--key-group`` tokens, value groups of
one head, 8-bit scales, 4 exact sinks and the exact window as in the runtime.

    source benchmarks/unseen_text.sh && mkdir -p /tmp/tc && write_unseen_text /tmp/tc
    .venv/bin/python benchmarks/adaptive_rounding_probe.py

A simulation: the prefix is rounded and restored in place; nothing stores less.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transform_coding_probe import (  # benchmarks/ is this directory
    add_window_options,
    packed_span,
    reference_prefixes,
    score_variant,
    unseen_windows,
)

from minicache.data import split_text, token_windows
from minicache.models import load_model
from minicache.quant.packed import decode_scales, encode_scales, quantize
from minicache.quant.rotated import rotation_matrix
from minicache.runtime.rope import RopeAngles

DAMP = 0.01  # of the mean diagonal, added to H before its inverse (as GPTQ)


def query_moments(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[H, D, D]``: second moment of the pre-RoPE queries of each KV head's query heads."""
    cfg = model.config
    hq, h, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    moments: list[torch.Tensor] = []

    def hook(_module, _inputs, out):
        q = out.float().reshape(-1, h, hq // h, d)  # [tokens, H, G, D]
        moments.append(torch.einsum("nhgd,nhge->hde", q, q) / (q.shape[0] * q.shape[2]))

    handles = [layer.self_attn.q_proj.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def key_forms(moments: list[torch.Tensor], angles: RopeAngles, distances: range) -> list[torch.Tensor]:
    """``E_Δ[RoPE_Δ Q RoPE_Δᵀ]`` per layer ``[H, D, D]``: how a pre-RoPE key error moves the logits."""
    out = []
    for q in moments:
        vals, vecs = torch.linalg.eigh(q.double())
        cols = (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)).transpose(-1, -2).float()  # [H, D cols, D]
        rows = cols.unsqueeze(-2).expand(*cols.shape[:2], len(distances), cols.shape[-1])
        turned = angles.apply(rows, distances.start)  # [H, cols, Δ, D]
        out.append(torch.einsum("hcnd,hcne->hde", turned, turned) / len(distances))
    return out


def pair_diagonal(form: torch.Tensor, rotary: int) -> torch.Tensor:
    """The diagonal of ``form`` ``[H, D, D]`` with each RoPE pair's two channels given their mean (what the
    average over distances leaves of a pair's 2 × 2 block, once the cross terms between pairs are dropped)."""
    diag = form.diagonal(dim1=-2, dim2=-1).clone()
    half = rotary // 2
    mean = (diag[:, :half] + diag[:, half:rotary]) / 2
    diag[:, :half], diag[:, half:rotary] = mean, mean
    return torch.diag_embed(diag)


def value_fisher(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[H, D, D]``: ``E[g gᵀ]`` of the loss gradient ``g`` at each cached value vector (the
    Fisher form of a value's error), from the next-token loss on ``ids``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, cache=cache).logits
        values = [layer.values for layer in cache.layers]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, values)
    return [torch.einsum("bhtd,bhte->hde", g.float(), g.float()) / (g.shape[0] * g.shape[2]) for g in grads]


def value_forms(model) -> list[torch.Tensor]:
    """``Σ_g W_gᵀ W_g`` per layer ``[H, D, D]`` over the query heads ``g`` of each KV head (``o_proj`` columns)."""
    cfg = model.config
    hq, h, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = []
    for layer in model.model.layers:
        w = layer.self_attn.o_proj.weight.float().reshape(-1, h, hq // h, d)  # [hidden, H, G, D]
        out.append(torch.einsum("ohgd,ohge->hde", w, w))
    return out


def feedback_factor(form: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``[H, D, D]`` upper Cholesky factor of ``(Rᵀ H R + damp)⁻¹`` (GPTQ's ``U``)."""
    r = rotation.double()
    h = r.T @ form.double() @ r
    h = h + DAMP * h.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(h.shape[-1], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def rounded(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, top: int, factor: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, H, N, D]`` (rotated frame) on its levels ``s``, ``z`` (broadcast to ``x``): nearest, or
    channel by channel with each channel's error pushed onto the later ones (``factor`` ``[H, D, D]``)."""
    if factor is None:
        return ((x - z) / s).round().clamp(0, top) * s + z
    w, out = x.clone(), torch.empty_like(x)
    for j in range(x.shape[-1]):
        q = ((w[..., j] - z[..., j]) / s[..., j]).round().clamp(0, top) * s[..., j] + z[..., j]
        out[..., j] = q
        err = (w[..., j] - q) / factor[:, j, j][None, :, None]
        w[..., j + 1:] -= err[..., None] * factor[:, j, j + 1:][None, :, None, :]
    return out


def levels_of(x: torch.Tensor, bits: int, role: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit-coded scales and zero points of ``x`` ``[B, H, N, D]``'s groups, broadcast to ``x``."""
    b, h, n, d = x.shape
    grouped = x.reshape(b, h, n // group, group, d) if role == "keys" else x
    dim = -2 if role == "keys" else -1
    s, z = decode_scales(*encode_scales(grouped.amin(dim), grouped.amax(dim), (1 << bits) - 1))
    if role == "keys":
        return (t.unsqueeze(-2).expand(b, h, n // group, group, d).reshape(b, h, n, d) for t in (s, z))
    return s.unsqueeze(-1).expand_as(x), z.unsqueeze(-1).expand_as(x)


def VARIANTS(k_factor, k_diag, v_factor, v_fisher, v_fisher_diag, names: str):
    every = {"nearest": ("nearest (runtime)", None, None), "keys": ("feedback on keys", k_factor, None),
             "keys-diagonal": ("feedback on keys, diagonal form", k_diag, None),
             "values": ("feedback on values", None, v_factor), "both": ("feedback on both", k_factor, v_factor),
             "values-fisher": ("feedback on values, Fisher form", None, v_fisher),
             "values-fisher-diagonal": ("feedback on values, Fisher diagonal", None, v_fisher_diag),
             "diagonal-both": ("keys diagonal form, values Fisher diagonal", k_diag, v_fisher_diag)}
    return [every[name] for name in names.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_window_options(parser)
    parser.add_argument("--calibration", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--bits", default="3/3,2/2", help="key/value widths")
    parser.add_argument("--key-group", type=int, default=64)
    parser.add_argument("--variants", default="nearest,keys,keys-diagonal,values,both")
    parser.add_argument("--out", default="benchmarks/results/keys-cpu/adaptive-rounding-probe.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    d = model.config.head_dim
    rotation = rotation_matrix(d)
    angles = RopeAngles.of_model(model)
    calib = token_windows(split_text(Path(args.calibration).read_text()), tok, 1024, 4, spread=True)
    forms = key_forms(query_moments(model, calib), angles, range(args.window, args.prefix + args.continuation))
    k_factor = [feedback_factor(f, rotation) for f in forms]
    k_diag = [feedback_factor(pair_diagonal(f, angles.rotary_dim), rotation) for f in forms]
    v_factor = [feedback_factor(f, rotation) for f in value_forms(model)]
    fisher = value_fisher(model, calib)
    v_fisher = [feedback_factor(f, rotation) for f in fisher]
    v_fisher_diag = [feedback_factor(torch.diag_embed(f.diagonal(dim1=-2, dim2=-1)), rotation) for f in fisher]
    evals = unseen_windows(args, tok)
    inner = packed_span(slice(args.sinks, args.prefix - args.window), args.key_group)
    prefixes = reference_prefixes(model, evals, args.prefix)

    def keys(k: torch.Tensor, bits: int, factor) -> torch.Tensor:
        x = angles.remove(k, inner.start) @ rotation
        s, z = levels_of(x, bits, "keys", args.key_group)
        return angles.apply(rounded(x, s, z, (1 << bits) - 1, factor) @ rotation.T, inner.start).to(k.dtype)

    def values(v: torch.Tensor, bits: int, factor) -> torch.Tensor:
        x = v.float() @ rotation
        s, z = levels_of(x, bits, "values", d)
        return (rounded(x, s, z, (1 << bits) - 1, factor) @ rotation.T).to(v.dtype)

    # nearest rounding here is the runtime's packing
    probe = prefixes[0][1].layers[5]
    k, v = probe.keys[:, :, inner], probe.values[:, :, inner]
    pre = angles.remove(k, inner.start)
    packed_k = angles.apply(quantize(pre, 3, args.key_group, "tokens", rotation, scale_bits=8).dequantize(
        torch.float32), inner.start)
    packed_v = quantize(v, 3, d, "channels", rotation, scale_bits=8).dequantize(torch.float32)
    assert torch.allclose(keys(k, 3, None), packed_k, atol=1e-4), "keys: not the runtime's packing"
    assert torch.allclose(values(v, 3, None), packed_v, atol=1e-4), "values: not the runtime's packing"

    lines = [f"Simulation (round trip of the cached prefix in place; nothing stores less): SmolLM2-135M-Instruct, "
             f"float32, {evals.shape[0]} windows of {args.prefix} prefix + {args.continuation} scored tokens "
             f"({evals.shape[0] * args.continuation} scored) over {args.unseen}; sinks {args.sinks}, exact window "
             f"{args.window}; rotated, keys pre-RoPE in groups of {args.key_group} tokens, values per token, 8-bit "
             f"scales; key forms fitted on 4 x 1,024 tokens of {args.calibration}. Same bytes in every row of a "
             "width.", "",
             "| K/V bits | rounding | ppl increase [95 %] | KL | top-1 |", "|---|---|---|---:|---:|"]
    for widths in args.bits.split(","):
        kb, vb = (int(x) for x in widths.split("/"))
        for label, kf, vf in VARIANTS(k_factor, k_diag, v_factor, v_fisher, v_fisher_diag, args.variants):
            def make(cache, kb=kb, vb=vb, kf=kf, vf=vf):
                out = copy.deepcopy(cache)
                for i, lay in enumerate(out.layers):
                    lay.keys[:, :, inner] = keys(lay.keys[:, :, inner], kb, None if kf is None else kf[i])
                    lay.values[:, :, inner] = values(lay.values[:, :, inner], vb, None if vf is None else vf[i])
                return out

            row = score_variant(model, prefixes, args.prefix, make)
            lines.append(f"| {kb}/{vb} | {label} | {100 * row['ppl_increase']:+.2f} % [{100 * row['low']:+.2f}.."
                         f"{100 * row['high']:+.2f}] | {row['kl']:.4f} | {100 * row['top1']:.1f} % |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    command = "Command: `.venv/bin/python benchmarks/adaptive_rounding_probe.py`"
    Path(args.out).write_text("\n".join(lines) + f"\n\n{command}\n")


if __name__ == "__main__":
    main()
