"""Calibrated code widths (``minicache-calibrate --kv-bits auto``): bits per layer and per K/V.

Three steps, data flowing one way:

1. **Sensitivity** (:func:`fisher_damage`): one forward and backward pass over calibration windows
   gives ``g``, the gradient of the next-token loss with respect to every layer's stored keys and
   values. Quantizing a tensor ``x`` to ``w`` bits moves it by ``e = Q_w(x) - x``; to second order the
   loss rises by ``½ Σ g² e²`` (the diagonal Fisher approximation, as in KVQuant, arXiv 2401.18079).
   That predicts the damage of every (layer, K/V, width) at once, for the scheme's own packing.
2. **Order** (:func:`bit_steps`): per unit (a merged group, whose members share one store, or one
   unmerged layer) and K/V, the steps down from the widest width on the lower convex hull of
   (bits saved, predicted damage), all units' steps sorted by predicted damage per byte saved.
3. **Choice** (:func:`allocate_bits`): the longest prefix of that order whose profile, measured by the
   real runtime on the held-out windows, fits the budget at the upper end of its interval. The
   measured damage grows with the prefix, so a bisection finds it in about ``log2(steps)`` passes;
   every measured point is kept for the report's frontier plot.

The prediction only orders the steps; every accepted profile is measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from minicache.profile import MergeProfile, Quantization

__all__ = ["BitPoint", "BitStep", "allocate_bits", "bit_steps", "fisher_damage"]

ROLES = ("keys", "values")


def fisher_damage(model, windows: torch.Tensor, quant: Quantization, widths: Sequence[int], *,
                  batch_size: int = 4, max_tokens: int = 8192,
                  progress: Callable[[int], None] | None = None,
                  key_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted loss increase of packing each layer's keys or values at each width.

    Parameters
    ----------
    windows : torch.Tensor
        ``[N, T]`` calibration token ids.
    quant : Quantization
        Scheme, group size and exact window (the newest ``residual_length`` tokens stay exact, and
        keys are packed a whole chunk of tokens at a time, as the runtime does).
    widths : sequence of int
        Widths to predict.
    batch_size : int
        Windows per forward and backward pass, at most.
    max_tokens : int
        Tokens per pass, at most (fewer windows per pass for long windows): the backward pass keeps
        every layer's activations, and its memory grows with the tokens in flight (SmolLM2: 7.8 GB
        peak for 4,096 tokens; four 4,096-token windows at once ran out of 24 GB).
    key_weights : torch.Tensor, optional
        ``[L, H, D]``: keys rounded by these query energies, as the runtime rounds them with
        ``quant.key_rounding`` ``"queries"`` (required then).

    Returns
    -------
    torch.Tensor
        ``[L, 2, len(widths)]`` float64: ``½ Σ g² e²`` per token, averaged over the windows,
        for keys (index 0) and values (1).
    """
    from transformers import DynamicCache

    from minicache.runtime.layers import packing_input
    from minicache.runtime.rope import RopeAngles

    rope = RopeAngles.of_model(model) if quant.pre_rope_keys else None
    if (quant.key_rounding == "queries") != (key_weights is not None):
        raise ValueError("key_weights go with quantization.key_rounding 'queries', and only with it")

    quantizer, group = quant.quantizer, quant.group_size
    device = next(model.parameters()).device
    out: torch.Tensor | None = None
    tokens = 0
    batch_size = max(1, min(batch_size, max_tokens // max(windows.shape[-1], 1)))
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        cache = DynamicCache(config=model.config)
        with torch.enable_grad():
            # Gradients reach the cache through the embeddings (the weights may be frozen); only the
            # cache tensors' gradients are computed, nothing accumulates in the weights' .grad.
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(batch), cache=cache).logits
            stored = [(layer.keys, layer.values) for layer in cache.layers]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            )
            flat = [t for pair in stored for t in pair]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
        if out is None:
            out = torch.zeros(len(stored), 2, len(widths), dtype=torch.float64)
        for layer, pair in enumerate(stored):
            for r, (role, x) in enumerate(zip(ROLES, pair, strict=True)):
                grad = grads[2 * layer + r]
                if grad is None:
                    raise RuntimeError(f"layer {layer} {role}: no gradient reached the cache (a model that "
                                       "copies its cache tensors cannot be calibrated for bits)")
                n = x.shape[-2] - quant.residual_length
                n -= n % quantizer.chunk_tokens(role, group)
                if n <= 0:
                    continue
                old = x.detach()[..., :n, :].float()
                g2 = grad[..., :n, :].float().square()
                g2[..., : quant.sink_tokens, :] = 0  # exact sinks (the runtime packs stand-ins there)
                packed = packing_input(old, role, 0, quant.sink_tokens, rope, dtype=x.dtype)
                for i, w in enumerate(widths):
                    weights = key_weights[layer] if role == "keys" and key_weights is not None else None
                    restored = quant.pack(packed, role, w, weights).dequantize(torch.float32)
                    if rope is not None and role == "keys":
                        restored = rope.apply(restored, 0)
                    err = restored - old
                    out[layer, r, i] += 0.5 * float((g2 * err.square()).sum())
        tokens += batch.numel()
        del cache, stored, logits, loss, flat, grads, embeds
        if progress is not None:
            progress(batch.numel())
    if out is None:
        raise ValueError("no calibration windows to measure sensitivity on")
    return out / max(tokens, 1)


@dataclass(frozen=True)
class BitStep:
    """Lowering one unit's keys or values from ``before`` to ``after`` bits.

    Attributes
    ----------
    layers : tuple of int
        The unit: a merged group's layers (one store) or one unmerged layer.
    role : str
        ``"keys"`` or ``"values"``.
    before, after : int
        Widths.
    damage : float
        Predicted loss increase of the step (:func:`fisher_damage`, summed over the unit's layers).
    saved : float
        Stored bits saved per token and KV head channel (``before - after`` times the unit's stores).
    """

    layers: tuple[int, ...]
    role: str
    before: int
    after: int
    damage: float
    saved: float

    @property
    def rate(self) -> float:
        return self.damage / self.saved


def bit_steps(damage: torch.Tensor, widths: Sequence[int], units: Sequence[tuple[int, ...]]) -> list[BitStep]:
    """Every unit's steps down from ``max(widths)``, cheapest predicted damage per saved bit first.

    Per unit and role, only the lower convex hull of (bits saved, damage) is stepped along: a width
    whose damage is worse than its neighbours' interpolation is skipped (e.g. 4 → 2 directly when
    3 bits save little damage). Steps of one unit stay in order, since the hull's rates increase.
    """
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    steps: list[BitStep] = []
    for unit in units:
        for r, role in enumerate(ROLES):
            points = [(widths[i], float(sum(damage[layer, r, i] for layer in unit))) for i in order]
            hull = [points[0]]
            for point in points[1:]:
                hull.append(point)
                while len(hull) >= 3:  # drop the middle point if it lies above the chord
                    (w0, d0), (w1, d1), (w2, d2) = hull[-3:]
                    if (d1 - d0) * (w0 - w2) <= (d2 - d0) * (w0 - w1):
                        break
                    del hull[-2]
            stores = 1  # a merged group's members share their stored fields; a layer stores its own
            for (w0, d0), (w1, d1) in itertools.pairwise(hull):
                steps.append(BitStep(tuple(unit), role, w0, w1, max(d1 - d0, 0.0), float((w0 - w1) * stores)))
    # Stable sort by rate: a unit's own steps keep their order (their rates increase on the hull).
    return sorted(steps, key=lambda s: s.rate)


def widths_after(steps: Sequence[BitStep], count: int, num_layers: int, top: int) -> tuple[tuple[int, ...], ...]:
    """``(key widths, value widths)`` per layer after the first ``count`` steps."""
    bits = {role: [top] * num_layers for role in ROLES}
    for step in steps[:count]:
        for layer in step.layers:
            bits[step.role][layer] = step.after
    return tuple(bits["keys"]), tuple(bits["values"])


@dataclass(frozen=True)
class BitPoint:
    """One measured profile of the allocation: the first ``steps`` steps taken."""

    steps: int
    mean_bits: float
    compression_ratio: float
    value: float
    upper: float
    fits: bool

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


def allocate_bits(
    steps: Sequence[BitStep],
    quant: Quantization,
    num_layers: int,
    measure: Callable[[Quantization], tuple[float, float, float]],
    fits: Callable[[float], bool],
    log: Callable[[str], None] = print,
) -> tuple[Quantization, list[BitPoint]]:
    """The widths of the longest prefix of ``steps`` whose measured profile fits.

    Parameters
    ----------
    quant : Quantization
        Scheme, group size and window; its widths are replaced.
    measure : callable
        ``quantization -> (value, upper bound, compression)`` of the profile stored that way, measured
        on held-out windows (the budget's metric and its upper 95 % bound).
    fits : callable
        ``upper bound -> bool``: within the budget.

    Returns
    -------
    (Quantization, list of BitPoint)
        The chosen widths (all at the widest when even that does not fit: the caller says so) and
        every measured point, in the order measured.
    """
    top = max(quant.quantizer.bits)
    points: dict[int, BitPoint] = {}

    def quantization(count: int) -> Quantization:
        keys, values = widths_after(steps, count, num_layers, top)
        return replace(quant, bits=_compact(keys), value_bits=_compact(values))

    def point(count: int) -> BitPoint:
        if count not in points:
            q = quantization(count)
            value, upper, compression = measure(q)
            points[count] = BitPoint(count, q.mean_bits(num_layers), compression, value, upper, fits(upper))
            p = points[count]
            log(f"  {count:3d}/{len(steps)} steps: mean {p.mean_bits:.2f} bits, compression {compression:.2f}x, "
                f"{value:+.4f} (upper {upper:+.4f}) {'fits' if p.fits else 'over the budget'}")
        return points[count]

    lo, hi = 0, len(steps)
    if not point(lo).fits:
        return quantization(lo), list(points.values())
    if point(hi).fits:
        return quantization(hi), list(points.values())
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if point(mid).fits:
            lo = mid
        else:
            hi = mid
    return quantization(lo), list(points.values())


def _compact(widths: tuple[int, ...]) -> int | tuple[int, ...]:
    """One number when every layer has the same width (profiles stay short)."""
    return widths[0] if len(set(widths)) == 1 else widths


def units_of(profile: MergeProfile, num_layers: int) -> list[tuple[int, ...]]:
    """A merged group's layers together (one store, one width), every other layer alone."""
    merged = {layer for g in profile.groups for layer in g.layers}
    return [tuple(g.layers) for g in profile.groups] + [(i,) for i in range(num_layers) if i not in merged]
