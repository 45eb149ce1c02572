"""One batch of decode rows out of single-sequence views of the same layer (an engine's requests).

An engine that keeps each request's store apart (the vLLM plugin's pages) holds, per layer and step,
one :class:`~minicache.runtime.views.MergedKVView` per request, each of its own length. Attending them
one request at a time costs a Python loop of small tensor operations per request; stacking them into
one padded view and one mask lets :func:`~minicache.runtime.blockwise.blockwise_decode_attention` attend
every request in the same operations.

The padded view is ``[R, H, M_max + r_max, D]``: request ``i``'s merged tokens at ``0 .. M_i``, padding
to ``M_max``, its exact window at ``M_max .. M_max + r_i``, padding to the end. Merged padding is a copy
of the longest request's stored tokens there (a valid stored form, so every method decodes it to finite
numbers that the mask then drops); window padding is zeros.
"""

from __future__ import annotations

import dataclasses

import torch

from minicache.runtime.views import FieldSnapshot, MergedKVView

__all__ = ["stack_views", "stackable"]


def stackable(views: list[MergedKVView]) -> bool:
    """Whether :func:`stack_views` can stack ``views``: single sequences of one layer whose stored form is
    dense (a packed field splits packed and dense tokens at a different place in every request) and whose
    method restores tokens independently (not a closed-loop chain)."""
    if not views:
        return False
    first = views[0]
    for view in views:
        if view.residual.shape[0] != 1 or view.method is None or view.method is not first.method:
            return False
        if view.params is not first.params or view.member != first.member or view.method.closed_loop:
            return False
        if view.retained_q is not None or view.retained is not None or view.rope is not None:
            return False
        if any(f.packed is not None for f in view.stored.values()):
            return False
    return True


def stack_views(views: list[MergedKVView]) -> tuple[MergedKVView, torch.Tensor]:
    """Stack single-sequence views of one layer into one padded batch.

    Parameters
    ----------
    views : list of MergedKVView
        ``R`` views, each ``[1, H, M_i + r_i, D]``, of the same member, method and parameters, with dense
        stored fields (:func:`stackable`).

    Returns
    -------
    view : MergedKVView
        ``[R, H, M_max + r_max, D]`` (see the module docstring for where each request's tokens are).
    mask : torch.Tensor
        ``[R, M_max + r_max]`` bool, True where a request's own tokens are.
    """
    if not stackable(views):
        raise ValueError("these views cannot be stacked: one layer's single sequences with a dense stored form, "
                         "of a method that restores tokens independently")
    lengths = [v.merged_length for v in views]
    windows = [v.residual.shape[-2] for v in views]
    longest = views[max(range(len(views)), key=lengths.__getitem__)]
    m_max, r_max = max(lengths), max(windows)
    _, h, _, d = longest.residual.shape
    device = longest.residual.device

    stored = {}
    for name, template in longest.stored.items():
        rows = []
        for view, m in zip(views, lengths, strict=True):
            own = view.stored[name].dense if m else template.dense[..., :0, :]
            rows.append(torch.cat([own, template.dense[..., m:m_max, :]], dim=-2))
        stored[name] = FieldSnapshot(dense=torch.cat(rows))

    residual = longest.residual.new_zeros(len(views), h, r_max, d)
    for i, view in enumerate(views):
        residual[i, :, : windows[i]] = view.residual[0]

    retained_value = retained_index = None
    kept = [(i, v) for i, v in enumerate(views) if v.retained_index is not None and v.retained_index.shape[0]]
    if kept:
        retained_value = torch.cat([v.retained_value for _, v in kept])
        indexes = []
        for i, view in kept:
            index = view.retained_index.clone()
            index[:, 0] = i
            indexes.append(index)
        retained_index = torch.cat(indexes)

    positions = torch.arange(m_max + r_max, device=device)
    merged = torch.tensor(lengths, device=device).unsqueeze(1)
    window = torch.tensor(windows, device=device).unsqueeze(1)
    mask = (positions < merged) | ((positions >= m_max) & (positions < m_max + window))
    view = dataclasses.replace(longest, residual=residual, stored=stored, retained_value=retained_value,
                               retained_index=retained_index)
    return view, mask
