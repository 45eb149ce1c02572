"""Query energies per key channel: what ``quantization.key_rounding: queries`` rounds keys by.

A packed key's error ``e`` moves the logit of a query ``q`` by ``q · e``, so across queries it costs
``eᵀ E[q qᵀ] e``. A key is read by queries at every distance, and RoPE turns each channel pair of
``q`` relative to the key by the distance: averaged over distances, a pair's 2 × 2 block of
``E[q qᵀ]`` becomes its mean energy times the identity, and the blocks between pairs of different
frequencies cancel. What is left is a diagonal: one weight per channel, equal within a RoPE pair, the
same whether keys are packed before RoPE or after it. The rotated schemes pack keys in a rotated
frame, where that diagonal is a full form; rounding channel by channel with error feedback
(:func:`minicache.quant.packed.quantize`) then moves the error where the queries do not read.

Measured before this was built (``benchmarks/adaptive_rounding_probe.py``,
``benchmarks/results/keys-cpu/adaptive-rounding-probe.md``; SmolLM2, 9 windows of 1,024-token
prefixes, keys pre-RoPE in groups of 64, values 3-bit rotated, 8-bit scales; KL to the full cache):
3-bit keys 0.0054 → 0.0032, 2-bit keys (with 2-bit values) 0.054 → 0.022. The full form (cross terms
kept) did a little better at 2 bits (0.0185) but costs ``head_dim`` times more to ship.
"""

from __future__ import annotations

import torch

from minicache.calibrate.capture import hooked_queries, progress_bar
from minicache.model_spec import ModelSpec
from minicache.runtime.rope import RopeAngles

__all__ = ["query_energies"]


@torch.inference_mode()
def query_energies(model, windows: torch.Tensor, *, batch_size: int = 4, sink_tokens: int = 1,
                   progress: bool = True) -> torch.Tensor:
    """Per layer, KV head and channel, the mean squared query that reads it, RoPE pairs averaged.

    Parameters
    ----------
    windows : torch.Tensor
        ``[N, T]`` calibration token ids.
    sink_tokens : int
        Queries at the first positions left out (their attention is mostly on themselves).

    Returns
    -------
    torch.Tensor
        ``[L, H, D]`` float32, each head's weights scaled to mean 1: the profile's
        :data:`~minicache.profile.KEY_WEIGHTS_TENSOR`.
    """
    spec = ModelSpec.from_config(model)
    heads, dim = spec.kv_heads, spec.head_dim
    sums = torch.zeros(spec.num_layers, heads, dim, dtype=torch.float64)
    counts = torch.zeros(spec.num_layers, dtype=torch.float64)

    def listen(layer: int, queries: torch.Tensor) -> None:  # [B, Hq, T, D], post-RoPE
        q = queries[:, :, sink_tokens:].float()
        b, hq, t, d = q.shape
        per_head = q.reshape(b, heads, hq // heads, t, d).square().sum((0, 2, 3))  # [H, D]
        sums[layer] += per_head.double().cpu()
        counts[layer] += b * (hq // heads) * t

    device = next(model.parameters()).device
    bar = progress_bar(int(windows.numel()), progress, "query energies")
    try:
        with hooked_queries(model, listen) as seen:
            if not seen:
                raise ValueError("the model's attention cannot be wrapped to see its queries, which "
                                 "key_rounding 'queries' needs; calibrate with --kv-key-rounding nearest")
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                bar.update(batch.numel())
    finally:
        bar.close()
    if not bool((counts > 0).all()):
        raise ValueError(f"no queries were seen in layers {torch.nonzero(counts == 0).flatten().tolist()}")
    energy = sums / counts[:, None, None]
    try:
        half = RopeAngles.of_model(model).rotary_dim // 2
    except ValueError:  # no single static RoPE: the post-RoPE energies as they are
        half = 0
    if half:  # a pair turns together: its two channels share their mean
        pair = (energy[..., :half] + energy[..., half : 2 * half]) / 2
        energy[..., :half], energy[..., half : 2 * half] = pair, pair
    scale = energy.mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (energy / scale).float()
