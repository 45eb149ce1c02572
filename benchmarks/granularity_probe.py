"""Would finer choices in ``--kv-bits auto`` buy much? Widths per KV head instead of per layer, and key
groups of 64 or 128 tokens chosen per layer, screened by the calibrator's own damage prediction (issue 18).

The widths search (:mod:`minicache.calibrate.bits`) orders steps down from 4 bits by the diagonal Fisher
prediction ``½ Σ g² e²`` and measures the longest prefix that fits the budget. A finer unit can only
help as much as it lowers that prediction at the same bytes, so this probe computes the prediction
per layer, K/V, KV head, width and (keys) group size, exactly as :func:`~minicache.calibrate.bits.fisher_damage`
does for the profile's settings (pre-RoPE keys rounded for its queries, 4 exact sinks, 128 exact recent
tokens), and compares greedy frontiers (the search's convex-hull order) at equal bytes:

* **per layer** (today): one width per layer and K/V;
* **per head**: one width per layer, K/V and KV head;
* **key groups per layer**: each layer's keys choose width and group size (64 or 128 tokens, i.e. 8-bit
  scale and zero point per channel every 64 or 128 tokens: 0.25 or 0.125 bits a value), against key
  groups of 64 everywhere and of 128 everywhere.

Costs are code bits plus scale bits per stored value; damage is the predicted loss increase (nats per
token). A prediction, not a measurement: a finer unit that predicts little gain is not worth building.

    .venv/bin/python benchmarks/granularity_probe.py --markdown-out benchmarks/results/keys-cpu/granularity-probe.md
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from transformers import DynamicCache

from minicache import MergeProfile
from minicache.data import read_samples, token_windows
from minicache.models import load_model
from minicache.runtime.layers import packing_input
from minicache.runtime.rope import RopeAngles

WIDTHS = (2, 3, 4)
GROUPS = (64, 128)
SCALE_BITS = 16  # an 8-bit scale and an 8-bit zero point per group


def predicted_damage(model, windows: torch.Tensor, profile: MergeProfile) -> dict[str, torch.Tensor]:
    """``{"keys/64", "keys/128", "values"}``: ``[L, H, widths]`` float64, ``½ Σ g² e²`` per token."""
    quant = profile.quantization
    rope = RopeAngles.of_model(model)
    spec = model.config
    heads = spec.num_key_value_heads
    out = {name: torch.zeros(spec.num_hidden_layers, heads, len(WIDTHS), dtype=torch.float64)
           for name in ("keys/64", "keys/128", "values")}
    for row in range(windows.shape[0]):
        batch = windows[row : row + 1]
        cache = DynamicCache(config=model.config)
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(batch), cache=cache).logits
            stored = [(layer.keys, layer.values) for layer in cache.layers]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                                     reduction="sum")
            grads = torch.autograd.grad(loss, [t for pair in stored for t in pair])
        for layer, pair in enumerate(stored):
            for r, role in enumerate(("keys", "values")):
                x = pair[r]
                for group in GROUPS if role == "keys" else (quant.group_size,):
                    name = f"keys/{group}" if role == "keys" else "values"
                    settings = quant.__class__(**{**quant.__dict__, "group_size": group})
                    n = x.shape[-2] - quant.residual_length
                    n -= n % settings.quantizer.chunk_tokens(role, group)
                    old = x.detach()[..., :n, :].float()
                    g2 = grads[2 * layer + r][..., :n, :].float().square()
                    g2[..., : quant.sink_tokens, :] = 0  # exact sinks
                    packed = packing_input(old, role, 0, quant.sink_tokens, rope if role == "keys" else None,
                                           dtype=x.dtype)
                    weights = profile.key_weights(layer) if role == "keys" else None
                    for i, w in enumerate(WIDTHS):
                        restored = settings.pack(packed, role, w, weights).dequantize(torch.float32)
                        if role == "keys":
                            restored = rope.apply(restored, 0)
                        out[name][layer, :, i] += 0.5 * ((restored - old).square() * g2).sum((0, 2, 3)).double()
        print(f"window {row + 1}/{windows.shape[0]}", flush=True)
    return {name: t / windows.numel() for name, t in out.items()}


def frontier(units: list[list[tuple[float, float]]], share: list[float]) -> list[tuple[float, float]]:
    """Greedy frontier ``[(mean cost in bits a value, damage)]``: each unit's options ``(cost, damage)`` on their
    lower convex hull from the dearest down, all units' steps by damage per bit saved (the search's order).
    ``share``: each unit's part of all stored values."""
    steps, cost, damage = [], 0.0, 0.0
    for options, part in zip(units, share, strict=True):
        points = sorted(options, key=lambda p: -p[0])
        hull = [points[0]]
        for point in points[1:]:
            hull.append(point)
            while len(hull) >= 3:
                (c0, d0), (c1, d1), (c2, d2) = hull[-3:]
                if (d1 - d0) * (c0 - c2) <= (d2 - d0) * (c0 - c1):
                    break
                del hull[-2]
        cost += hull[0][0] * part
        damage += hull[0][1]
        for (c0, d0), (c1, d1) in itertools.pairwise(hull):
            if c1 < c0:
                steps.append((max(d1 - d0, 0.0) / ((c0 - c1) * part), (c0 - c1) * part, d1 - d0))
    steps.sort()
    points = [(cost, damage)]
    for _, saved, extra in steps:
        cost, damage = cost - saved, damage + extra
        points.append((cost, damage))
    return points


def damage_at(points: list[tuple[float, float]], cost: float) -> float | None:
    for (c0, d0), (c1, d1) in itertools.pairwise(points):
        if c1 <= cost <= c0:
            return d0 + (d1 - d0) * (c0 - cost) / (c0 - c1) if c0 > c1 else d1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="benchmarks/results/keys-cpu/auto-rotated-queries",
                        help="settings to predict for (its scheme, sinks, window, scales, key weights)")
    parser.add_argument("--data", nargs="+",
                        default=["minicache/calibrate/corpus/default.jsonl",
                                 "profiles/smollm2-135m-instruct/calibration-data.jsonl"])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--markdown-out")
    args = parser.parse_args()

    profile = MergeProfile.load(args.profile)
    model, tokenizer = load_model("smollm2-135m", dtype="bfloat16")
    samples = [s for path in args.data for s in read_samples(path)]
    windows = token_windows(samples, tokenizer, args.length, args.windows)
    damage = predicted_damage(model, windows, profile)
    layers, heads, _ = damage["values"].shape
    scale = SCALE_BITS / profile.quantization.group_size  # values: per token, a group of channels

    def options(t: torch.Tensor, group_scale: float) -> list[tuple[float, float]]:
        return [(w + group_scale, float(t[i])) for i, w in enumerate(WIDTHS)]

    half = 0.5 / layers  # keys or values of one layer: this share of every stored value
    per_layer = [options(damage["keys/64"][i].sum(0), SCALE_BITS / 64) for i in range(layers)] + [
        options(damage["values"][i].sum(0), scale) for i in range(layers)]
    per_head = [options(damage["keys/64"][i, h], SCALE_BITS / 64) for i in range(layers) for h in range(heads)] + [
        options(damage["values"][i, h], scale) for i in range(layers) for h in range(heads)]
    keys128 = [options(damage["keys/128"][i].sum(0), SCALE_BITS / 128) for i in range(layers)] + per_layer[layers:]
    either = [options(damage["keys/64"][i].sum(0), SCALE_BITS / 64)
              + options(damage["keys/128"][i].sum(0), SCALE_BITS / 128) for i in range(layers)] + per_layer[layers:]
    rows = {
        "per layer, key groups of 64 (today)": frontier(per_layer, [half] * len(per_layer)),
        "per KV head, key groups of 64": frontier(per_head, [half / heads] * len(per_head)),
        "per layer, key groups of 128": frontier(keys128, [half] * len(keys128)),
        "per layer, key groups of 64 or 128 chosen per layer": frontier(either, [half] * len(either)),
    }
    costs = (3.6, 3.4, 3.25, 3.1, 3.0, 2.9, 2.75)
    base = rows["per layer, key groups of 64 (today)"]
    lines = [
        f"Predicted loss increase (nats per token, diagonal Fisher, the search's order) of greedy width choices at "
        f"equal cost; settings of `{args.profile}`; {args.windows} windows x {args.length} tokens of "
        f"{', '.join(args.data)}. Cost = code bits + scale bits per stored value (exact sinks, window and "
        "constants not counted: the same in every row). In brackets: the damage over today's at the same cost.",
        "",
        "| unit | " + " | ".join(f"{c} bits" for c in costs) + " |",
        "|---|" + "---:|" * len(costs),
    ]
    for name, points in rows.items():
        cells = []
        for c in costs:
            d, b = damage_at(points, c), damage_at(base, c)
            cells.append("–" if d is None or b is None else f"{d:.4f} ({d / b:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    spread = damage["values"][..., 0] - damage["values"][..., 1]
    lines += ["", f"3 → 2-bit values: the dearest KV head's predicted damage over the cheapest's, median over "
              f"layers: {float((spread.amax(-1) / spread.amin(-1).clamp_min(1e-12)).median()):.2f}x", "",
              "Command: `.venv/bin/python benchmarks/granularity_probe.py"
              + (f" --markdown-out {args.markdown_out}`" if args.markdown_out else "`")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text)


if __name__ == "__main__":
    main()
