"""The merge-method protocol: how a group of layers' keys (or values) is stored, restored and calibrated.

A merge method turns the vectors of ``k ≥ 2`` adjacent layers for a block of tokens into a *stored
form* (named tensors along the token axis, e.g. SLERP's shared ``direction`` and per-member
``magnitude``) and restores any member's vectors from it. Everything else is the cache's job and is
the same for every method: the exact residual window, the block schedule, retention of the most
distinct tokens (from the per-token ``distance`` a method reports), batch operations, quantization of
the fields a method marks quantizable, memory accounting, and the attention paths.

A method is one file: a ``Params`` dataclass (its per-component parameters, validated in
``__post_init__``), a :class:`MergeMethod` subclass, and ``@register_method``. Profiles store
``method: <name>`` plus the method's own parameters for each group's keys and values; tensors a
method needs (e.g. SLERP's alignment rotations) live in the profile's sidecar under names the
method gives and are validated by it.

Calibration asks a method for the parameter options worth trying on a candidate group
(:meth:`MergeMethod.param_options`), for the restore error of each option on captured KV
(:meth:`MergeMethod.restore_error`, the statistic that predicts damage: the search regresses
measured damage on it), and optionally for tensors fitted on the calibration data
(:meth:`MergeMethod.new_fit_statistic`, :meth:`MergeMethod.fit`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from minicache.methods.geometry import rotate, rotate_back, unit_and_norm
from minicache.validation import ProfileError, build, check_keys

__all__ = [
    "COMPONENTS",
    "Encoded",
    "Field",
    "FitStatistic",
    "Frame",
    "MergeMethod",
    "MethodParams",
    "all_reduce_sum",
    "energy",
    "magnitude_dtype",
    "process_group",
    "tensor_name",
]

COMPONENTS = ("keys", "values")


def magnitude_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of per-token scalars (norms) for a cache of ``dtype``."""
    # Norms need more range than precision: fp16 holds them to 0.05 % for half-precision models;
    # bf16's 3 significant digits would not. Full-precision models keep fp32.
    return torch.float32 if dtype.itemsize >= 4 else torch.float16


def tensor_name(local: str, label: str, component: str) -> str:
    """Sidecar name of one of a component's tensors, e.g. ``rotation.20-21.keys``."""
    return f"{local}.{label}.{component}"


class MethodParams:
    """Base of a method's per-component parameters (subclasses are frozen dataclasses).

    Subclasses validate every field in ``__post_init__``, raising :class:`ProfileError` with the
    field's name as the path; :meth:`from_dict` places the error under the profile path.
    """

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "") -> MethodParams:
        """Strictly validated parameters from plain data (unknown keys are errors)."""
        names = tuple(f.name for f in dataclasses.fields(cls))
        data = dict(check_keys(data, path, names))
        for name, value in data.items():
            if isinstance(value, list):  # YAML has no tuples
                data[name] = tuple(value)
        return build(cls, path, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML (subclasses may leave out fields at their defaults)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def summary(self) -> str:
        """A few words for people (``"t 0.6"``)."""
        return ", ".join(f"{k} {v}" for k, v in self.to_dict().items())


@dataclass(frozen=True)
class Field:
    """One tensor of a method's stored form, ``[B, H, N, width]`` along the token axis ``N``.

    Attributes
    ----------
    name : str
        Key in the stored form (``"direction"``).
    width : str or int
        Last dimension: ``"head_dim"``, ``"members"`` (one per layer of the group),
        ``"members*head_dim"`` (a head vector per member, side by side), a number, or the name of one
        of the method's parameters (e.g. ``"rank"``).
    dtype : str
        ``"model"`` (the cache's dtype) or ``"scalar"`` (:func:`magnitude_dtype`).
    quantize : str or None
        Role it is packed as in a quantized cache: ``"component"`` (keys-like for keys,
        values-like for values), ``"vectors"`` (per token), or None (never quantized).
    part : str
        Name of its bytes in :meth:`MiniCache.memory_report`'s ``parts``.
    """

    name: str
    width: str | int
    dtype: str = "model"
    quantize: str | None = None
    part: str = ""

    def role(self, component: str) -> str | None:
        """Quantizer role of this field in ``component``'s store (None: kept in its dtype)."""
        if self.quantize == "component":
            return component
        return self.quantize

    def storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return magnitude_dtype(dtype) if self.dtype == "scalar" else dtype

    def size(self, members: int, head_dim: int, params: MethodParams | None = None) -> int:
        if self.width == "head_dim":
            return head_dim
        if self.width == "members":
            return members
        if self.width == "members*head_dim":
            return members * head_dim
        if isinstance(self.width, str):
            return int(getattr(params, self.width))
        return int(self.width)


@dataclass(frozen=True)
class Encoded:
    """A block of a group's member vectors in stored form.

    Attributes
    ----------
    fields : dict of str to torch.Tensor
        One ``[B, H, N, width]`` tensor per :class:`Field` of the method (any float dtype; the cache
        casts to the storage dtype).
    distance : torch.Tensor
        ``[B, H, N]`` float32 in ``[0, 1]``: how different the members are at each token. Retention
        keeps the tokens at the top of the range (``retention: distinct``) exact.
    """

    fields: dict[str, torch.Tensor]
    distance: torch.Tensor


@dataclass(frozen=True)
class Frame:
    """A per-KV-head orthogonal frame in which a member's stored prefix is cheaper to attend.

    A member's vectors are ``v Rᵀ`` of frame vectors ``v`` (``R`` ``[H, D, D]``). Attention then
    needs ``q · (v Rᵀ) = (q R) · v`` (rotate the query once per step) and
    ``Σ p (v Rᵀ) = (Σ p v) Rᵀ`` (rotate the output once), never each token.
    """

    rotation: torch.Tensor

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """``q R`` per KV head: ``q`` ``[B, H, G, D]`` (G query heads per KV head), float32."""
        return torch.einsum("bhgd,hde->bhge", q.float(), self.rotation.to(q.device, torch.float32))

    def output(self, acc: torch.Tensor) -> torch.Tensor:
        """``acc Rᵀ`` per KV head: ``[B, H, G, D]`` float32."""
        return torch.einsum("bhge,hde->bhgd", acc.float(), self.rotation.to(acc.device, torch.float32))

    def rows(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """``x R`` of rows ``x`` ``[n, D]`` whose KV heads are ``heads`` ``[n]``, float32."""
        # Every row through every head's R, then each row's own: H matmuls of [n, D] x [D, D] cost
        # less than gathering an [n, D, D] stack of rotations (a few retained rows per head and token).
        r = self.rotation.to(device=x.device, dtype=torch.float32)
        every = torch.einsum("nd,hde->nhe", x.float(), r)
        return every[torch.arange(x.shape[0], device=x.device), heads]

    def into(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` of ``[B, H, N, D]`` member vectors, float32."""
        return rotate(x, self.rotation)

    def out_of(self, v: torch.Tensor) -> torch.Tensor:
        """``v Rᵀ`` of ``[B, H, N, D]`` frame vectors, float32."""
        return rotate_back(v, self.rotation)


def process_group() -> tuple[int, int] | None:
    """``(rank, world size)`` when ``torch.distributed`` is initialised with more than one process, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor in place over the processes of ``torch.distributed`` (no-op when it is not initialised).

    Calibration sums live on the CPU; a backend that reduces only device tensors (NCCL) gets a copy on
    the current CUDA device.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    for tensor in tensors:
        if device is None or tensor.device == device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved)


class FitStatistic(Protocol):
    """Sums over calibration batches from which a method fits its tensors (they add up across processes)."""

    def add(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], sink_tokens: int) -> None:
        """Add one batch: every layer's ``(keys, values)``, each ``[B, H, T, D]``."""

    def all_reduce(self) -> None:
        """Sum over the processes of ``torch.distributed`` (no-op when it is not initialised)."""


class MergeMethod(ABC):
    """One way of merging a group's keys or values (stateless; one instance per method).

    Attributes
    ----------
    name : str
        The method's name in profiles (``method: slerp``).
    Params : type
        Its per-component parameters, a frozen :class:`MethodParams` dataclass.
    fields : tuple of Field
        The tensors of its stored form.
    kernel_layout : str or None
        Stored layout a fused attention kernel can read (``"direction_magnitude"``: a unit-norm
        ``direction`` ``[.., D]`` and per-member ``magnitude`` ``[.., k]``, restored as ``m · e/‖e‖``
        in the :meth:`frame`); None: attention restores a block at a time (blockwise torch path).
    fit_key : str or None
        Kind of :class:`FitStatistic` it fits tensors from; methods with the same key share one.
    tensor_part : str
        Name of its sidecar tensors' bytes in :meth:`MiniCache.memory_report`'s ``parts``.
    factored : bool
        Attention can read its stored form without restoring (:meth:`factored_scores`,
        :meth:`factored_values`); the blockwise torch path then never restores a token of it.
    min_members : int
        Smallest group it stores (2 for merges of layers into one; 1 for methods that also compress
        a single layer, e.g. a per-layer low-rank basis).
    closed_loop : bool
        :meth:`encode` takes a keyword ``roundtrip``: a function mapping a ``[B, H, N, D]`` slice of
        its one field, one member's columns, to what storage gives back (the storage dtype, and the
        quantizer's round trip in a quantized cache), so that it can encode later members against
        what earlier ones restore to (predictive coding). The cache passes it and checks that
        packing the field equals packing each member's columns alone. Such a method also implements
        :meth:`restore_chain`, through which the cache restores members in layer order without
        restoring the members below again.
    retains : bool
        Retention applies (γ and sink tokens keep the most distant tokens exact). False for a method
        whose stored form is already exact: it never retains a token.
    rope_sensitive : bool
        Its stored form for keys depends on how RoPE turned them: one fitted basis serves every token
        (a low-rank basis), and RoPE smears it across position. The calibration then offers its key
        options before RoPE too (``pre_rope``, with tensors fitted on keys with RoPE removed). False for
        methods that compare the members of one token (RoPE turns them alike: SLERP's angle is the same).
    tensors_in_cache_dtype : bool
        A cache of a 16-bit float dtype holds the method's sidecar tensors in that dtype (the sidecar
        keeps them in float32; every method computes in float32 either way). For tensors whose
        rounding costs no more than storing the tokens in that dtype does (a basis and a mean), and
        whose bytes a short context would otherwise notice (SmolLM2's low-rank bases are 5 % of a
        512-token float32 cache, 10 % of a bfloat16 one).
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    fields: ClassVar[tuple[Field, ...]]
    kernel_layout: ClassVar[str | None] = None
    fit_key: ClassVar[str | None] = None
    tensor_part: ClassVar[str] = "tensors"
    min_members: ClassVar[int] = 2
    factored: ClassVar[bool] = False
    closed_loop: ClassVar[bool] = False
    retains: ClassVar[bool] = True
    rope_sensitive: ClassVar[bool] = False
    tensors_in_cache_dtype: ClassVar[bool] = False

    # -- parameters and tensors (profile side) -------------------------------------------------
    def params(self, data: Mapping[str, Any] | MethodParams | None = None, path: str = "") -> MethodParams:
        """Validated parameters from plain data, an instance, or None (every field at its default)."""
        if data is None:
            return build(self.Params, path, {})
        if isinstance(data, self.Params):
            return data
        if isinstance(data, MethodParams):
            raise ProfileError(
                f"{type(data).__name__} given; allowed: {self.Params.__name__} (the parameters of {self.name!r})",
                path,
            )
        return self.Params.from_dict(data, path)

    def check_members(self, params: MethodParams, members: int) -> None:
        """Raise :class:`ProfileError` (path relative to the component) if ``params`` do not fit a
        group of ``members`` layers. Default: any group fits."""
        return

    def tensor_names(self, params: MethodParams) -> tuple[str, ...]:
        """Local names of the sidecar tensors this component needs (see :func:`tensor_name`)."""
        return ()

    def tensors_for(self, params: MethodParams, fitted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sidecar tensors of ``params`` from what :meth:`fit` returned for their component (e.g.
        a basis truncated to the rank). Default: the tensors :meth:`tensor_names` lists, as fitted."""
        return {local: fitted[local] for local in self.tensor_names(params)}

    def check_tensor(
        self, params: MethodParams, local: str, tensor: torch.Tensor, members: int, kv_shape: tuple[int, int] | None,
        path: str, name: str,
    ) -> None:
        """Validate one sidecar tensor (shape against the group and model, dtype, finiteness, ...),
        raising :class:`ProfileError` at ``path``. Default: accept it."""
        return

    def check_tensor_set(
        self, params: MethodParams, tensors: Mapping[str, torch.Tensor], members: int,
        kv_shape: tuple[int, int] | None, path: str,
    ) -> None:
        """Validate how one component's sidecar tensors fit together (each already passed
        :meth:`check_tensor`), raising :class:`ProfileError` at ``path``. Default: accept them."""
        return

    # -- runtime ------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, params: MethodParams, xs: Sequence[torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> Encoded:
        """Stored form of a block: ``xs`` are the ``k`` members' ``[B, H, N, D]`` vectors, shallowest first."""

    @abstractmethod
    def decode(
        self,
        params: MethodParams,
        fields: Mapping[str, torch.Tensor],
        member: int,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        *,
        in_frame: bool = False,
    ) -> torch.Tensor:
        """Restore member ``member``'s ``[B, H, n, D]`` vectors in ``dtype`` from a block of stored
        fields (``[B, H, n, width]``, quantized fields already dequantized to the model dtype).

        ``in_frame``: leave them in :meth:`frame` (skip the per-token map back), for attention
        paths that map the query and the output instead.
        """

    def restore_chain(
        self, params: MethodParams, fields: Mapping[str, torch.Tensor], member: int,
        tensors: Mapping[str, torch.Tensor], *, below: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Closed-loop methods: member ``member``'s ``[B, H, n, D]`` float32 restore of a block, given
        ``below`` (member ``member − 1``'s restore of the same block, as this returned it) or None
        (restore the members below too). :meth:`decode` is this, cast to the model dtype."""
        raise NotImplementedError(f"{self.name} restores each member on its own (closed_loop is False)")

    def factored_scores(
        self, params: MethodParams, q: torch.Tensor, fields: Mapping[str, torch.Tensor], member: int,
        tensors: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """Logits ``q · x̂`` ``[B, H, G, n]`` float32 of a block of stored fields without restoring it
        (``q`` ``[B, H, G, D]`` float32, already scaled; G query heads per KV head). Methods with
        ``factored = True`` implement it."""
        raise NotImplementedError(f"{self.name} does not attend without restoring")

    def factored_values(
        self, params: MethodParams, probs: torch.Tensor, fields: Mapping[str, torch.Tensor], member: int,
        tensors: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """``Σ_n probs · x̂_n`` ``[B, H, G, D]`` float32 of a block of stored fields without restoring it
        (``probs`` ``[B, H, G, n]`` float32). Methods with ``factored = True`` implement it."""
        raise NotImplementedError(f"{self.name} does not attend without restoring")

    def mark_retained(self, fields: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flag retained tokens (``keep`` ``[B, H, N]``) inside the stored fields, for kernels that
        stream the dense store without reading the retained list. Default: no flag."""
        return fields

    def frame(self, params: MethodParams, tensors: Mapping[str, torch.Tensor], member: int) -> Frame | None:
        """The frame member ``member``'s stored prefix lives in, or None (the member's own)."""
        return None

    def fused_encode(self, params: MethodParams, members: int):
        """A fused merge kernel for these parameters, or None (the torch :meth:`encode` runs).

        The callable takes ``(xs, tensors, gamma, retention, valid, sink, window, count, dtype)`` and
        returns ``(fields, keep)``: the first ``count`` tokens' stored fields in their storage dtypes,
        retained tokens already flagged, and the retention mask ``[B, H, count]``.
        """
        return None

    def stored_bytes_per_token(self, params: MethodParams, members: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes the stored form takes per (sequence, KV head, merged token), unquantized."""
        return sum(
            f.size(members, head_dim, params) * torch.empty((), dtype=f.storage_dtype(dtype)).element_size()
            for f in self.fields
        )

    def saved_layers(self, params: MethodParams, members: int, head_dim: int) -> float:
        """Layers' worth of KV a group of ``members`` layers no longer stores (what the search buys)."""
        return float(members - 1)

    # -- calibration --------------------------------------------------------------------------
    def param_options(
        self, members: int, fitted: bool, defaults: Mapping[str, Any]
    ) -> list[MethodParams]:
        """Parameters worth measuring on a candidate group of ``members`` layers (``fitted``: the
        method's fitted tensors are available for it; ``defaults`` holds the profile defaults, the
        model's ``head_dim``, the ``component`` (``"keys"``/``"values"``) the options are for, and
        the calibration's method settings, e.g. ``lowrank_basis``). Default: the default parameters."""
        return [self.params()]

    def restore_error(
        self, params: MethodParams, xs: Sequence[torch.Tensor], tensors: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distance [B, H, N], squared restore error [B, H, N] float64 summed over members)``.

        Default: encode, decode every member, compare (float32). Methods may compute it faster or
        more exactly from the quantities they already have.
        """
        encoded = self.encode(params, xs, tensors)
        err = None
        for member, x in enumerate(xs):
            restored = self.decode(params, encoded.fields, member, tensors, torch.float32)
            e = (restored - x.float()).square().sum(-1).double()
            err = e if err is None else err + e
        return encoded.distance, err

    def new_fit_statistic(self, num_layers: int, num_heads: int, head_dim: int, max_offset: int) -> FitStatistic | None:
        """A fresh :class:`FitStatistic` for :meth:`fit` (None: the method fits nothing)."""
        return None

    def fit(self, statistic: FitStatistic, layers: tuple[int, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """Fitted tensors of one group: ``{component: {local name: tensor}}``."""
        return {}

    def kept_variance(self, params: MethodParams, fitted: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """For the report: ``[n]`` share of the calibration variance kept at stored width 1..n per
        token and KV head, from what :meth:`fit` returned (None: the method has no such curve)."""
        return None

    def fitted_params(self, params: MethodParams) -> bool:
        """Whether ``params`` use fitted tensors (so the profile must carry them)."""
        return bool(self.tensor_names(params))


def energy(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, H, N, k]`` float64 squared norms of every member's vectors."""
    return torch.stack([unit_and_norm(x)[1] for x in xs], -1).square().double()
