"""Exact: one layer's keys or values stored as they are, beside a compressed other component.

A group's keys and values each name a method. Where one component of a single layer compresses well
and the other does not (on SmolLM2 a low-rank basis keeps keys at an eighth of their width for a
fraction of what it costs values, ``benchmarks/results/lowrank-cpu/probe.md``), ``exact`` lets the
profile compress only the first: ``keys: {method: lowrank, rank: 8}``, ``values: {method: exact}``.
The stored form is the layer's own ``[B, H, N, D]`` vectors in the model dtype (packed by the
profile's quantizer like an unmerged layer's), so it saves nothing and loses nothing; attention
reads it directly (``factored``), and it never retains a token (every token already is exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from minicache.methods.base import Encoded, Field, MergeMethod, MethodParams
from minicache.validation import ProfileError

__all__ = ["ExactMethod", "ExactParams"]


@dataclass(frozen=True)
class ExactParams(MethodParams):
    """The exact method has no parameters."""

    def summary(self) -> str:
        return "exact"


class ExactMethod(MergeMethod):
    """A single layer's component kept as it is (see the module docstring)."""

    name = "exact"
    Params = ExactParams
    fields = (Field("vectors", "head_dim", dtype="model", quantize="component", part="exact"),)
    min_members = 1
    factored = True
    retains = False

    def check_members(self, params: ExactParams, members: int) -> None:
        if members != 1:
            raise ProfileError(
                f"exact stores one layer's vectors as they are, not a group of {members} layers; allowed: "
                "a group of one layer (its other component compressed)", "method")

    def encode(self, params: ExactParams, xs: Sequence[torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> Encoded:
        (x,) = xs
        return Encoded({"vectors": x}, torch.zeros(x.shape[:3], dtype=torch.float32, device=x.device))

    def decode(self, params, fields, member, tensors, dtype, *, in_frame=False):
        return fields["vectors"].to(dtype)

    def factored_scores(self, params, q, fields, member, tensors):
        return torch.einsum("bhgd,bhnd->bhgn", q, fields["vectors"].float())

    def factored_values(self, params, probs, fields, member, tensors):
        return torch.einsum("bhgn,bhnd->bhgd", probs, fields["vectors"].float())

    def restore_error(self, params, xs, tensors):
        (x,) = xs
        zeros = torch.zeros(x.shape[:3], device=x.device)
        return zeros, zeros.double()

    def saved_layers(self, params: ExactParams, members: int, head_dim: int) -> float:
        return 0.0

    def param_options(self, members: int, fitted: bool, defaults: Mapping[str, Any]) -> list[ExactParams]:
        """Offered for single layers only: the choice of leaving one component of a layer uncompressed."""
        return [ExactParams()] if members == 1 else []
