"""Which merged tokens stay exact: retention from a method's per-token distances (DESIGN.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["retention_mask"]


def retention_mask(
    distance: torch.Tensor,
    gamma: float,
    rule: str = "distinct",
    *,
    valid: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    window: int | None = None,
    count: int | None = None,
) -> torch.Tensor:
    """Decide which tokens keep their exact per-layer vectors instead of being merged.

    The threshold is relative to the range of distances ``[d_min, d_max]`` of one sequence, KV head
    and component, taken over a window of that sequence's own valid tokens:

    * ``distinct`` (our reading of the paper): retain ``d ≥ d_max − (d_max − d_min)·γ``;
    * ``similar`` (xKV's reading, kept for A/B): retain ``d ≤ d_min + (d_max − d_min)·γ``.

    ``γ = 0`` retains nothing (the most compression), rather than only the extreme token.
    Sink tokens are always retained and never enter the range; invalid (padding) tokens are
    never retained and never enter the range. A range needs at least two valid tokens.

    Parameters
    ----------
    distance : torch.Tensor
        ``[B, H, N]`` per-token distances (SLERP: the angular distance ``Ω/π``).
    gamma : float
        Retention fraction of the distance range, in ``[0, 1]``.
    rule : {"distinct", "similar"}
    valid : torch.Tensor, optional
        ``[B, N]`` (or broadcastable to ``[B, H, N]``) bool, False for padding. Default: all valid.
    sink : torch.Tensor, optional
        ``[B, N]`` bool, True for sink tokens. Default: none.
    window : int, optional
        Size of the forward window ``[i, i + window)`` whose range decides token ``i``. Because the
        window is made of the sequence's own tokens, the decision does not depend on other
        sequences in the batch, on left padding, or on how the tokens were chunked. ``None``: one
        range over all ``N`` tokens.
    count : int, optional
        Decide only the first ``count`` tokens (the rest only serve as look-ahead). Default: ``N``.

    Returns
    -------
    torch.Tensor
        ``[B, H, count]`` bool, True where the token is retained.
    """
    if rule not in ("distinct", "similar"):
        raise ValueError(f"retention rule {rule!r} is not one of 'distinct', 'similar'")
    b, h, n = distance.shape
    count = n if count is None else count
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=distance.device)
    if sink is None:
        sink = torch.zeros(b, n, dtype=torch.bool, device=distance.device)
    valid = valid.expand(b, n) if valid.dim() == 2 else valid
    sink = sink.expand(b, n) if sink.dim() == 2 else sink
    in_range = (valid & ~sink)
    in_range = in_range.unsqueeze(1).expand(b, h, n) if in_range.dim() == 2 else in_range
    sink_bh = sink.unsqueeze(1).expand(b, h, n) if sink.dim() == 2 else sink
    sink_bh = sink_bh[..., :count]
    if gamma <= 0.0:
        return sink_bh.clone()

    d = distance.float()
    hi = torch.where(in_range, d, torch.full_like(d, -torch.inf))
    lo = torch.where(in_range, d, torch.full_like(d, torch.inf))
    n_valid = in_range.float()
    if window is None:
        d_max = hi.amax(dim=-1, keepdim=True).expand(b, h, count)
        d_min = lo.amin(dim=-1, keepdim=True).expand(b, h, count)
        n_in = n_valid.sum(dim=-1, keepdim=True).expand(b, h, count)
    else:
        # Forward windows [i, i+window), truncated at the end (padding beyond N is out of range).
        pad = window - 1
        d_max = F.pad(hi, (0, pad), value=-torch.inf).unfold(-1, window, 1)[..., :count, :].amax(-1)
        d_min = F.pad(lo, (0, pad), value=torch.inf).unfold(-1, window, 1)[..., :count, :].amin(-1)
        n_in = F.pad(n_valid, (0, pad)).unfold(-1, window, 1)[..., :count, :].sum(-1)
    spread = d_max - d_min
    d_c = d[..., :count]
    if gamma >= 1.0:  # the whole range; avoids rounding at its ends
        keep = torch.ones_like(d_c, dtype=torch.bool)
    elif rule == "distinct":
        keep = d_c >= d_max - spread * gamma
    else:
        keep = d_c <= d_min + spread * gamma
    keep = keep & in_range[..., :count] & (n_in >= 2)
    return keep | sink_bh
