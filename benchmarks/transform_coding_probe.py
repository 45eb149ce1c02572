"""Would transform coding make low bits usable? A simulation on SmolLM2 (issue 18), before building it.

Transform coding (the route of KVTC, arXiv 2511.01815): per layer and K/V, a PCA basis over all KV
heads together is fitted on calibration text; a token's ``H·D`` coefficients ``(x − μ) U`` are
quantized *each with its own width* (0-8 bits), widths allocated by reverse water-filling (greedy on
the measured squared-error drop per bit, keys optionally weighted by the queries that read them), so
that strong directions get many bits, weak ones few or none. Step sizes are fixed per coefficient
(calibrated), optionally scaled per token by the token's coefficient norm (one float16 per token).

The simulation runs the full model on a prefix, replaces the prefix's cached keys and values (except
``--sinks`` first tokens and the last ``--window`` ones) by their round trip, then scores a continuation
against the full cache (perplexity increase, KL, top-1). The same round trip is applied with the
registered ``rotated`` quantizer (KIVI groups, 3 and 4 bits) so the rows compare with what the runtime
stores today (whose real figures at 4,096 tokens are in the README). Compression is counted for a
``--report-length``-token context: exact sinks and window, packed codes, per-token scales, and the
bases/steps once per sequence (only the columns of coefficients that get bits).

    source benchmarks/unseen_text.sh && mkdir -p /tmp/tc && write_unseen_text /tmp/tc
    .venv/bin/python benchmarks/transform_coding_probe.py --calib-windows 16 --windows-per-text 3 --prefix 1024 \
        --continuation 256 --variants 3/3,2.5/2.5/tok,3/3/pre/tok,3/2.5/pre/q/tok   # probe.md, 6 min
    .venv/bin/python benchmarks/transform_coding_probe.py --calib-windows 4 --windows-per-text 3 --prefix 1024 \
        --continuation 256 --anchors 3/3,2/2,4/2 --retain 0,0.02,0.05 --variants "" \
        --out benchmarks/results/transform-cpu/retain-probe.md                       # 2 min

A variant ``K/V[/pre][/q][/tok]`` is transform coding at ``K`` and ``V`` mean bits per key and value
coefficient, with keys pre-RoPE, query-weighted widths, a per-token scale. ``--retain`` adds to each
``--anchors`` row of the ``rotated`` quantizer rows where the worst-rounded vectors are kept exact.

A simulation: nothing here stores less. It decides whether a ``transform`` method is worth building.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from lowrank_probe import capture, flat, query_second_moment  # benchmarks/ is this script's directory

from minicache.data import read_samples, split_text, token_windows
from minicache.evaluate.quality import kl_divergence, ppl_increase_interval, top1_agreement
from minicache.models import load_model
from minicache.quant import get_quantizer
from minicache.runtime.rope import RopeAngles

MAX_BITS = 8
STEP_GRID = torch.linspace(0.15, 1.6, 30)  # step = g · σ · 2^(2 − b), searched per coefficient and width


class Coder:
    """One layer's and component's transform coder (float64 fit, float32 use)."""

    def __init__(self, rows: torch.Tensor, weight: torch.Tensor | None, mean_bits: float, per_token: bool):
        # rows [N, H·D] float64; weight [H·D, H·D] (query second moment) or None
        self.mean = rows.mean(0)
        centred = rows - self.mean
        lam, vec = torch.linalg.eigh(centred.T @ centred / rows.shape[0])
        order = lam.argsort(descending=True)
        self.basis = vec[:, order]
        coeffs = centred @ self.basis
        self.per_token = per_token
        self.norm_ref = coeffs.norm(dim=1).pow(2).mean().sqrt()
        if per_token:
            coeffs = coeffs / self.token_scale(coeffs).unsqueeze(1)
        sigma = coeffs.std(0).clamp_min(1e-12)
        # distortion per coefficient and width (mean squared error on the calibration rows)
        width = coeffs.shape[1]
        self.steps = torch.zeros(width, MAX_BITS + 1, dtype=torch.float64)
        dist = torch.zeros(width, MAX_BITS + 1, dtype=torch.float64)
        dist[:, 0] = coeffs.pow(2).mean(0)
        sample = coeffs[torch.randperm(coeffs.shape[0], generator=torch.Generator().manual_seed(0))[:4096]]
        for b in range(1, MAX_BITS + 1):
            steps = sigma[:, None] * STEP_GRID[None, :].double() * 2.0 ** (2 - b)  # [W, G]
            err = (self._round(sample[:, :, None], steps[None], b) - sample[:, :, None]).pow(2).mean(0)  # [W, G]
            best = err.argmin(1)
            self.steps[:, b] = steps.gather(1, best[:, None]).squeeze(1)
            dist[:, b] = err.gather(1, best[:, None]).squeeze(1)
        importance = torch.ones(width, dtype=torch.float64) if weight is None else torch.einsum(
            "dj,de,ej->j", self.basis, weight, self.basis)
        self.bits = self._allocate(dist, importance, round(mean_bits * width))

    @staticmethod
    def _round(y: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        half = 2 ** (bits - 1)
        idx = torch.clamp(torch.floor(y / step), -half, half - 1)
        return (idx + 0.5) * step

    def token_scale(self, coeffs: torch.Tensor) -> torch.Tensor:
        return (coeffs.norm(dim=1) / self.norm_ref).clamp_min(1e-6)

    @staticmethod
    def _allocate(dist: torch.Tensor, importance: torch.Tensor, total: int) -> torch.Tensor:
        bits = torch.zeros(dist.shape[0], dtype=torch.long)
        for _ in range(total):
            room = bits < MAX_BITS
            now = dist.gather(1, bits[:, None]).squeeze(1)
            after = dist.gather(1, (bits + 1).clamp_max(MAX_BITS)[:, None]).squeeze(1)
            gain = torch.where(room, importance * (now - after), torch.tensor(-1.0, dtype=torch.float64))
            bits[gain.argmax()] += 1
        return bits

    def roundtrip(self, rows: torch.Tensor) -> torch.Tensor:
        coeffs = (rows.double() - self.mean) @ self.basis
        scale = self.token_scale(coeffs).unsqueeze(1) if self.per_token else torch.ones(1, 1, dtype=torch.float64)
        coeffs = coeffs / scale
        out = torch.zeros_like(coeffs)
        for b in range(1, MAX_BITS + 1):
            cols = (self.bits == b).nonzero().squeeze(1)
            if cols.numel():
                out[:, cols] = self._round(coeffs[:, cols], self.steps[cols, b], b)
        if self.per_token:
            out = out * scale.half().double()  # the scale is stored in float16
        return (out @ self.basis.T + self.mean).to(rows.dtype)

    def side_bytes(self) -> int:
        """Basis columns that get bits, the mean and the steps, float16."""
        used = int((self.bits > 0).sum())
        return 2 * (self.basis.shape[0] * used + self.basis.shape[0] + used)

    def token_bits(self) -> float:
        return float(self.bits.sum()) + (16 if self.per_token else 0)


def rows_heads(rows: torch.Tensor, b: int, h: int, t: int, d: int) -> torch.Tensor:
    return rows.reshape(b, t, h, d).permute(0, 2, 1, 3)


def capture_rows(model, calib: torch.Tensor) -> dict[str, object]:
    """Calibration rows per layer (``[N, H·D]`` float64: keys post- and pre-RoPE, values; sink dropped)
    and the query second moments ``[L, H, D, D]`` post- and pre-RoPE."""
    layers = model.config.num_hidden_layers
    h = model.config.num_key_value_heads
    rows = {name: [[] for _ in range(layers)] for name in ("k_post", "k_pre", "v")}
    moments = {}
    for batch in capture(model, calib):
        for name, per_layer in rows.items():
            for layer in range(layers):
                per_layer[layer].append(flat([batch[name][layer]]))  # sink token dropped
        for name in ("q_post", "q_pre"):
            mom = query_second_moment(batch[name], h)
            moments[name] = mom if name not in moments else moments[name] + mom
    out: dict[str, object] = {name: [torch.cat(r) for r in per] for name, per in rows.items()}
    out.update(moments)
    return out


def fit_coders(captured: dict[str, object], mean_bits: tuple[float, float], pre_rope: bool, query_weighted: bool,
               per_token: bool) -> list[tuple[Coder, Coder]]:
    kname, qname = ("k_pre", "q_pre") if pre_rope else ("k_post", "q_post")
    coders = []
    for layer, (keys, values) in enumerate(zip(captured[kname], captured["v"], strict=True)):
        weight = torch.block_diag(*captured[qname][layer]) if query_weighted else None
        coders.append((Coder(keys, weight, mean_bits[0], per_token), Coder(values, None, mean_bits[1], per_token)))
    return coders


def transformed_cache(cache, coders, span: slice, angles: RopeAngles, pre_rope: bool):
    out = copy.deepcopy(cache)
    for layer, (kc, vc) in enumerate(coders):
        lay = out.layers[layer]
        k, v = lay.keys[:, :, span].float(), lay.values[:, :, span].float()
        b, h, t, d = k.shape
        kin = angles.remove(k, span.start) if pre_rope else k
        kq = rows_heads(kc.roundtrip(flat([kin], sink=0)), b, h, t, d)
        kq = angles.apply(kq, span.start) if pre_rope else kq
        vq = rows_heads(vc.roundtrip(flat([v], sink=0)), b, h, t, d)
        lay.keys[:, :, span] = kq.to(lay.keys.dtype)
        lay.values[:, :, span] = vq.to(lay.values.dtype)
    return out


def quantized_cache(cache, scheme: str, bits: tuple[int, int], span: slice, retain: float, group: int = 128):
    """The registered quantizer's round trip on the span's whole chunks (the rest stays exact); with
    ``retain`` > 0, that fraction of each layer's (head, token) vectors with the largest squared rounding
    error are put back exact, per component (as a retention list would hold them: vector and index)."""
    quantizer = get_quantizer(scheme)
    out = copy.deepcopy(cache)
    inner = packed_span(span, group)
    for lay in out.layers:
        for role, width, target in (("keys", bits[0], lay.keys), ("values", bits[1], lay.values)):
            x = target[:, :, inner]
            restored = quantizer.dequantize(quantizer.quantize(x, role, width, group), x.dtype)
            if retain > 0:
                b, h, t, d = x.shape
                err = (restored - x).float().pow(2).sum(-1).reshape(b, h * t)
                worst = err.topk(retained_count(retain, h * t), dim=1).indices
                flat_r, flat_x = restored.reshape(b, h * t, d), x.reshape(b, h * t, d)
                where = worst[..., None].expand(-1, -1, d)
                flat_r.scatter_(1, where, flat_x.gather(1, where))
                restored = flat_r.reshape(b, h, t, d)
            target[:, :, inner] = restored
    return out


def packed_span(span: slice, group: int) -> slice:
    """The span's whole key groups (what a rotated store packs; the rest stays exact)."""
    return slice(span.start, span.start + (span.stop - span.start) // group * group)


def retained_count(retain: float, vectors: int) -> int:
    return max(1, round(retain * vectors))


def packed_bytes_per_token(cache, scheme: str, bits: tuple[int, int], span: slice, retain: float,
                           group: int = 128) -> float:
    """Bytes per packed token over all layers as a bfloat16 cache holds them (float16 scales, which a float32
    cache would keep in float32), retained vectors counted as bfloat16 vector + int32 index."""
    quantizer = get_quantizer(scheme)
    inner = packed_span(span, group)
    total = 0.0
    for lay in cache.layers:
        for x, role, width in ((lay.keys, "keys", bits[0]), (lay.values, "values", bits[1])):
            x = x[:, :, inner].bfloat16()
            total += quantizer.quantize(x, role, width, group).nbytes
            if retain > 0:
                b, h, t, d = x.shape
                total += b * retained_count(retain, h * t) * (2 * d + 4)
    return total / (inner.stop - inner.start) / cache.layers[0].keys.shape[0]


def score(model, cache, cont: torch.Tensor, reference: torch.Tensor | None):
    with torch.no_grad():
        logits = model(input_ids=cont[:, :-1], past_key_values=cache, use_cache=True).logits.float()
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, cont[:, 1:, None]).squeeze(-1)  # [B, C-1]
    if reference is None:
        return nll, logp, None, None
    return nll, logp, kl_divergence(reference, logp), top1_agreement(reference, logp).float()


def add_window_options(parser) -> None:
    """The scored windows' options the round-trip probes share (unseen texts, prefix, exact sinks and window)."""
    parser.add_argument("--unseen", default="/tmp/tc/licences.txt,/tmp/tc/code.txt,/tmp/tc/notes.txt")
    parser.add_argument("--windows-per-text", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)


def unseen_windows(args, tokenizer) -> torch.Tensor:
    """``[W, prefix + continuation]`` token windows, ``--windows-per-text`` spread over each ``--unseen`` text."""
    length = args.prefix + args.continuation
    return torch.cat([token_windows(split_text(Path(p).read_text()), tokenizer, length, args.windows_per_text,
                                    spread=True) for p in args.unseen.split(",")])


def reference_prefixes(model, evals: torch.Tensor, prefix: int) -> list[tuple]:
    """Per window of ``evals`` ``[W, prefix + C]``: ``(ids, full-cache prefix, reference nll, reference log-probs)``
    of its continuation, one window at a time (memory)."""
    prefixes = []
    for w in range(evals.shape[0]):
        ids = evals[w:w + 1]
        with torch.no_grad():
            cache = model(input_ids=ids[:, :prefix], use_cache=True).past_key_values
        nll, logp, _, _ = score(model, copy.deepcopy(cache), ids[:, prefix:], None)
        prefixes.append((ids, cache, nll, logp))
    return prefixes


def score_variant(model, prefixes: list[tuple], prefix: int, make) -> dict[str, float]:
    """The continuations scored on ``make(full-cache prefix)``: perplexity increase with its 95 % interval
    (bootstrap over windows), KL and top-1 agreement against the full cache."""
    nll_all, ref_all, kl_all, top_all = [], [], [], []
    for ids, cache, ref_nll, ref_logp in prefixes:
        nll, _, kl, top1 = score(model, make(cache), ids[:, prefix:], ref_logp)
        nll_all.append(nll)
        ref_all.append(ref_nll)
        kl_all.append(kl.mean())
        top_all.append(top1.mean())
    nll_t, ref_t = torch.cat(nll_all), torch.cat(ref_all)  # [windows, tokens]
    low, high = ppl_increase_interval(ref_t, nll_t)
    return {"ppl_increase": (nll_t.double().mean() - ref_t.double().mean()).exp().item() - 1, "low": low,
            "high": high, "kl": torch.stack(kl_all).mean().item(), "top1": torch.stack(top_all).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="minicache/calibrate/corpus/default.jsonl,"
                                                  "profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--unseen", default="/tmp/tc/licences.txt,/tmp/tc/code.txt,/tmp/tc/notes.txt",
                        help="text files (benchmarks/unseen_text.sh writes them); windows spread over each")
    parser.add_argument("--calib-windows", type=int, default=24)
    parser.add_argument("--calib-length", type=int, default=1024)
    parser.add_argument("--windows-per-text", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--report-length", type=int, default=4096)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variants", default="2.5/2.5,2/2,3/2,2.5/2/q,2.5/2/pre,2.5/2/tok,2/2/pre/q/tok")
    parser.add_argument("--anchors", default="4/4,4/3,3/3,2/2",
                        help="rotated key/value widths [/group size] to compare")
    parser.add_argument("--retain", default="0", help="fractions of worst-rounded vectors kept exact, per anchor")
    parser.add_argument("--out", default="benchmarks/results/transform-cpu/probe.md")
    args = parser.parse_args()
    if args.prefix - args.sinks - args.window < 128:
        parser.error(f"--prefix {args.prefix} leaves fewer than 128 tokens (one key group of the rotated rows) "
                     f"between the {args.sinks} sinks and the {args.window}-token exact window")

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    cfg = model.config
    layers, h, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    samples = [s for path in args.calibration.split(",") for s in read_samples(path)]
    calib = token_windows(samples, tok, args.calib_length, args.calib_windows, spread=True)
    length = args.prefix + args.continuation
    evals = torch.cat([token_windows(split_text(Path(p).read_text()), tok, length, args.windows_per_text, spread=True)
                       for p in args.unseen.split(",")])
    span = slice(args.sinks, args.prefix - args.window)
    captured = capture_rows(model, calib)

    prefixes = reference_prefixes(model, evals, args.prefix)
    angles = RopeAngles.of_model(model)

    full_bytes_token = layers * 2 * h * d * 2  # bfloat16, whatever the simulation's dtype
    exact_tokens = args.sinks + args.window

    def report_compression(packed_bytes_token: float, side: int) -> float:
        n = args.report_length
        full = n * full_bytes_token
        return full / (exact_tokens * full_bytes_token + (n - exact_tokens) * packed_bytes_token + side)

    rows = []

    def evaluate(label: str, make, compression: float, bits_note: str) -> None:
        row = {"variant": label, "bits": bits_note, "compression": compression,
               **score_variant(model, prefixes, args.prefix, make)}
        inc = row["ppl_increase"]
        rows.append(row)
        print(f"{label:28s} {bits_note:22s} {compression:6.3f}x  {100 * inc:+6.2f}% "
              f"[{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]  KL {row['kl']:.4f}"
              f"  top-1 {100 * row['top1']:.1f}%",
              flush=True)

    for anchor in args.anchors.split(","):
        kb, vb, *rest = (int(x) for x in anchor.split("/"))
        group = rest[0] if rest else 128
        for retain in (float(x) for x in args.retain.split(",")):
            # the packed bytes of one window (the same for all)
            per_token = packed_bytes_per_token(prefixes[0][1], "rotated", (kb, vb), span, retain, group)
            label = (f"rotated k{kb}v{vb}" + (f" g{group}" if group != 128 else "")
                     + (f", worst {100 * retain:g} % exact" if retain else ""))
            evaluate(label, lambda cache, bits=(kb, vb), retain=retain, group=group:
                     quantized_cache(cache, "rotated", bits, span, retain, group),
                     report_compression(per_token, 0), f"{8 * per_token / (layers * 2 * h * d):.2f} bits/value")

    for spec in filter(None, args.variants.split(",")):
        parts = spec.split("/")
        kb, vb = float(parts[0]), float(parts[1])
        flags = set(parts[2:])
        pre, qw, per_token = "pre" in flags, "q" in flags, "tok" in flags
        coders = fit_coders(captured, (kb, vb), pre, qw, per_token)
        token_bits = sum(kc.token_bits() + vc.token_bits() for kc, vc in coders)
        side = sum(kc.side_bytes() + vc.side_bytes() for kc, vc in coders)
        label = "transform " + "+".join(["pre-RoPE" if pre else "post-RoPE"] + (["q-weighted"] if qw else [])
                                        + (["token scale"] if per_token else []))
        evaluate(label, lambda cache, coders=coders, pre=pre: transformed_cache(cache, coders, span, angles, pre),
                 report_compression(token_bits / 8, side), f"keys {kb} / values {vb} bits")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scored = evals.shape[0] * args.continuation
    lines = [
        f"Simulation (round trip on the cached prefix, nothing stored less): SmolLM2-135M-Instruct, {args.dtype}, "
        f"{evals.shape[0]} windows of {args.prefix} prefix + {args.continuation} scored tokens "
        f"({scored} scored tokens) over {args.unseen}; sinks {args.sinks}, exact window {args.window}; "
        f"calibration {args.calib_windows} x {args.calib_length} tokens of {args.calibration}. "
        f"Compression counted for a {args.report_length}-token context.", "",
        "| variant | widths | compression | ppl increase | 95 % interval | KL mean | top-1 |",
        "| :--- | :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bits']} | {r['compression']:.3f}x | {100 * r['ppl_increase']:+.2f}% | "
                     f"{100 * r['low']:+.2f}%..{100 * r['high']:+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.2f}% |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
