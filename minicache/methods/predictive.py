"""Predictive residual: each layer predicted from the one below, only the (quantized) residual stored.

Adjacent layers' raw keys and values are unrelated on SmolLM2 (cosine ≈ 0), but a *linear map*
fitted on calibration data predicts most of layer ``l`` from layer ``l − 1`` (the residual stream
feeding them is nearly the same). For a group of ``k ≥ 2`` adjacent layers and one component, a
token's member vectors are stored as residuals

    ``r_0 = x_0 − μ_0``,   ``r_j = x_j − p_j``,   ``p_j = μ_j + (x̂_{j−1} − μ_{j−1}) W_j``,

and restored in layer order, ``x̂_0 = μ_0 + r̂_0``, ``x̂_j = p_j + r̂_j`` (``r̂``: the residual as stored,
i.e. after quantization). The prediction reads the *restored* previous member (closed loop, as in
predictive coding and AQUA-KV, arXiv 2501.19392), so a member's error is only its own residual's
quantization error: errors do not add up along the group.

Unquantized, this stores as much as the layers themselves (``k·D`` values per token and KV head):
its point is a quantized cache, where a residual with a fraction ``f`` of a vector's energy costs
about ``½·log2(1/f)`` fewer bits for the same error. Measured on SmolLM2 (16 × 512 calibration
tokens, licences held out, ``benchmarks/predictive_probe.py``): the joint map leaves 12 % of the
keys' energy (post-RoPE) and 36 % of the values' (31 % and 42 % of the energy left after
subtracting the per-channel mean, which KIVI's per-channel key groups already remove); per-KV-head
maps leave 20 % and 58 %.

Two layouts of the map (``heads`` parameter):

* ``joint``: one ``W_j`` ``[H·D, H·D]`` over all KV heads (heads predict each other);
* ``each``: one ``[D, D]`` map per KV head (block-diagonal; ``H`` times fewer weights).

Sidecar tensors per component: ``mean`` ``[k, H, D]`` and ``weight`` ``[k−1, H·D, H·D]`` (joint) or
``[k−1, H, D, D]`` (each), float32 or float16 (the weights only: a fit's float32 maps rounded to
float16 predict as well), counted once per cache by the memory report. For SmolLM2 a joint map in
float16 is 74 KB per member and component, the bf16 KV of 192 tokens of that layer: the maps are
shared by every sequence of a cache and pay over long or many sequences.

Closed loop needs the store's own rounding: :attr:`closed_loop` asks the cache to pass ``roundtrip``,
which maps a member's residual to what storage gives back (the model dtype, and the quantizer's
round trip in a quantized cache). That is exact only for per-token packing that does not mix
members: the stored field is ``[B, H, N, k·D]`` with ``quantize="vectors"``, and the cache checks
that packing the whole field equals packing each member's ``D`` columns (KIVI with ``group_size ≤
head_dim``; a rotated scheme rotates across members and is refused).

Restoring member ``j`` on its own costs ``j`` matmuls of ``[n, H·D] × [H·D, H·D]`` (the chain below
it). The default path restores a layer's whole prefix per step and keeps member ``j``'s restore
until member ``j + 1`` asks (layers run in order), so a step costs one matmul per member; the
blockwise torch path restores block by block and walks the chain each time (``k(k+1)/2`` per
block); no fused kernel reads this layout. The
retention distance is the relative restore error over the members, ``‖X̂ − X‖ / ‖X‖`` per token
and head.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from minicache.methods.base import Encoded, Field, MergeMethod, MethodParams
from minicache.methods.lowrank import SecondMoments
from minicache.quant.rotated import rotation_matrix
from minicache.validation import ProfileError, check_bool, check_choice

__all__ = ["HEAD_LAYOUTS", "RIDGE", "PredictiveMethod", "PredictiveParams", "fit_predictors"]

#: Layouts of the prediction map.
HEAD_LAYOUTS = ("joint", "each")
#: Ridge of the least-squares fit, relative to the mean variance of the input.
RIDGE = 1e-3


@dataclass(frozen=True)
class PredictiveParams(MethodParams):
    """Parameters of one component of a predictive-residual group.

    Attributes
    ----------
    heads : str
        ``"joint"`` (one map over all KV heads) or ``"each"`` (one map per KV head).
    rotate : bool
        Store each member's residual rotated by the ``rotated`` quantizer's fixed randomized
        Hadamard matrix (undone on restore): per-token groups then see no outlier channels, which
        is what makes keys expensive per token. Nothing is stored for it.

    rope : bool
        Keys: a map that commutes with RoPE (per rotary frequency, one complex ``H × H`` matrix) and
        no mean, so the prediction is the same at every position. A free map fitted on post-RoPE keys
        learns the positions of its calibration windows and fails beyond them (on SmolLM2 the key
        residual's share of the energy grows from 13 % at positions 1-1,024, inside the calibration
        windows, to 99 % at 3,072-4,096). Needs ``heads: joint``.
    """

    heads: str = "joint"
    rotate: bool = True
    rope: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", check_choice(self.heads, "heads", HEAD_LAYOUTS, "a head layout"))
        object.__setattr__(self, "rotate", check_bool(self.rotate, "rotate"))
        object.__setattr__(self, "rope", check_bool(self.rope, "rope"))
        if self.rope and self.heads != "joint":
            raise ProfileError(f"rope: true needs heads: joint, got heads: {self.heads}", "rope")


def fit_predictors(stat: SecondMoments, layers: tuple[int, ...], ridge: float = RIDGE
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """Ridge fits of each member on the one below, per component, from streamed second moments.

    Returns ``{component: {"mean": [k, H, D], "weight_joint": [k−1, H·D, H·D], "weight_each":
    [k−1, H, D, D], "weight_rope": [k−1, H·D, H·D]}}``, float32. The fit uses exact inputs; at the
    widths this method is used with, the restored inputs differ from them by a few percent of their
    energy.
    """
    k, h, d = len(layers), stat.num_heads, stat.head_dim
    out = {}
    for c, name in enumerate(("keys", "values")):
        mean = torch.cat([stat.covariance((layer,), c)[0] for layer in layers]).reshape(k, h, d)
        joint, each = [], []
        for below, layer in itertools.pairwise(layers):
            _, cov = stat.covariance((below, layer), c)
            inputs, cross = cov[: h * d, : h * d], cov[: h * d, h * d :]
            joint.append(_ridge_solve(inputs, cross, ridge))
            each.append(torch.stack([
                _ridge_solve(inputs[i * d:(i + 1) * d, i * d:(i + 1) * d], cross[i * d:(i + 1) * d, i * d:(i + 1) * d],
                             ridge) for i in range(h)]))
        out[name] = {
            "mean": mean.float(),
            "weight_joint": torch.stack(joint).float().contiguous(),
            "weight_each": torch.stack(each).float().contiguous(),
            "weight_rope": torch.stack([_rope_equivariant(stat, below, layer, c, ridge)
                                        for below, layer in itertools.pairwise(layers)]).float().contiguous(),
        }
    return out


def _rope_equivariant(stat: SecondMoments, below: int, layer: int, component: int, ridge: float) -> torch.Tensor:
    """``[H·D, H·D]`` float64 map that commutes with RoPE, fitted without means (least squares).

    transformers' RoPE turns channel pair ``(i, i + D/2)`` of every head, as the complex number
    ``a + ib``, by ``e^{i p θ_i}`` at position ``p``. A map of the form ``z_out[:, i] = z_in[:, i] C_i``
    (``C_i`` a complex ``H × H`` matrix per frequency) commutes with it, so it predicts as well at
    any position; ``C_i`` is the complex ridge solution from the uncentred second moments.
    """
    h, d = stat.num_heads, stat.head_dim
    half = d // 2
    n = stat.tokens.clamp_min(1)
    inputs, cross, outputs = (stat.products[0, below, component], stat.products[1, below, component],
                              stat.products[0, layer, component])
    second = torch.cat([torch.cat([inputs, cross], 1), torch.cat([cross.T, outputs], 1)], 0) / n
    index = torch.arange(h * d).reshape(h, d)
    weight = torch.zeros(h * d, h * d, dtype=torch.float64)
    for i in range(half):
        re, im = index[:, i], index[:, i + half]  # the real and imaginary channels of frequency i, per head
        out_re, out_im = re + h * d, im + h * d

        def block(rows, cols):
            return second[rows.unsqueeze(-1), cols.unsqueeze(0)]

        # Z^H Z and Z^H Y from the real blocks (z = a + ib, y = c + id)
        zz = torch.complex(block(re, re) + block(im, im), block(re, im) - block(im, re))
        zy = torch.complex(block(re, out_re) + block(im, out_im), block(re, out_im) - block(im, out_re))
        eye = torch.eye(h, dtype=zz.dtype)
        c = torch.linalg.solve(zz + ridge * zz.diagonal().real.mean().clamp_min(1e-12) * eye, zy)  # [H_in, H_out]
        # y = x W with a_out = α a − β b, b_out = α b + β a for c = α + iβ
        weight[re.unsqueeze(-1), re.unsqueeze(0)] = c.real
        weight[im.unsqueeze(-1), re.unsqueeze(0)] = -c.imag
        weight[re.unsqueeze(-1), im.unsqueeze(0)] = c.imag
        weight[im.unsqueeze(-1), im.unsqueeze(0)] = c.real
    return weight


def _ridge_solve(inputs: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_W E‖y − x W‖² + λ‖W‖²`` from ``Cov(x)`` and ``Cov(x, y)`` (float64)."""
    eye = torch.eye(inputs.shape[0], dtype=inputs.dtype)
    return torch.linalg.solve(inputs + ridge * inputs.diagonal().mean().clamp_min(1e-12) * eye, cross)


class PredictiveMethod(MergeMethod):
    """Layer-to-layer linear prediction with a stored residual (see the module docstring)."""

    name = "predictive_residual"
    Params = PredictiveParams
    fields = (Field("residuals", "members*head_dim", dtype="model", quantize="vectors", part="residuals"),)
    fit_key = "second_moments"
    tensor_part = "predictors"
    closed_loop = True

    # -- profile side -------------------------------------------------------------------------------
    def tensor_names(self, params: PredictiveParams) -> tuple[str, ...]:
        return ("mean", "weight")

    def tensors_for(self, params: PredictiveParams, fitted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "weight" in fitted:  # already a profile's tensors
            return {"mean": fitted["mean"], "weight": fitted["weight"]}
        if params.rope:  # no mean: a fixed offset does not commute with RoPE
            return {"mean": torch.zeros_like(fitted["mean"]), "weight": fitted["weight_rope"]}
        return {"mean": fitted["mean"], "weight": fitted[f"weight_{params.heads}"]}

    def check_tensor(self, params, local, tensor, members, kv_shape, path, name) -> None:
        problem = _check_tensor(params, local, tensor, members, kv_shape, name)
        if problem is not None:
            raise ProfileError(problem, path)

    def saved_layers(self, params: PredictiveParams, members: int, head_dim: int) -> float:
        return 0.0  # k·D values per token, as many as the layers: the saving is the quantizer's

    # -- runtime ------------------------------------------------------------------------------------
    def encode(self, params: PredictiveParams, xs: Sequence[torch.Tensor], tensors: Mapping[str, torch.Tensor],
               *, roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Encoded:
        residuals, distance, _ = self._closed_loop(params, xs, tensors, roundtrip)
        return Encoded({"residuals": residuals}, distance)

    def _closed_loop(self, params, xs, tensors, roundtrip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residuals ``[B, H, N, k·D]`` float32, the retention distance ``[B, H, N]`` and the squared
        restore error ``[B, H, N]`` float64 summed over members, each member restored from what
        ``roundtrip`` gives back of its residual (None: the residual as it is)."""
        residuals, error, total = [], None, None
        restored = None
        for member, x in enumerate(xs):
            x = x.float()
            prediction = self._prediction(params, restored, member, tensors, x)
            residual = x - prediction
            if params.rotate:
                residual = residual @ rotation_matrix(residual.shape[-1], residual.device)
            stored = residual if roundtrip is None else roundtrip(residual).float()
            if params.rotate:
                stored = stored @ rotation_matrix(stored.shape[-1], stored.device).T
            restored = prediction + stored
            residuals.append(residual)
            e = (restored - x).square().sum(-1).double()
            t = x.square().sum(-1).double()
            error = e if error is None else error + e
            total = t if total is None else total + t
        distance = (error / total.clamp_min(1e-30)).sqrt().clamp(0.0, 1.0).float()
        return torch.cat(residuals, dim=-1), distance, error

    def decode(self, params, fields, member, tensors, dtype, *, in_frame=False):
        return self.restore_chain(params, fields, member, tensors).to(dtype)

    def restore_chain(self, params, fields, member, tensors, *, below=None):
        r = fields["residuals"].float()
        d = r.shape[-1] // tensors["mean"].shape[0]
        first = member if below is not None and member > 0 else 0
        restored = below.float() if first else None
        for j in range(first, member + 1):
            residual = r[..., j * d:(j + 1) * d]
            if params.rotate:
                residual = residual @ rotation_matrix(d, residual.device).T
            restored = self._prediction(params, restored, j, tensors, r) + residual
        return restored

    def restore_error(self, params, xs, tensors):
        # Unquantized the residual is stored in the model dtype: the error is that rounding alone,
        # as the closed loop restores each member (not the base's decode of unrounded residuals).
        _, distance, error = self._closed_loop(params, xs, tensors, lambda r: r.to(xs[0].dtype))
        return distance, error

    @staticmethod
    def _prediction(params: PredictiveParams, below: torch.Tensor | None, member: int,
                    tensors: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """``p_member`` ``[B, H, N, D]`` float32 from the restored member below (``μ_0`` for member 0)."""
        mean = tensors["mean"].to(like.device, torch.float32)  # [k, H, D]
        if member == 0:
            return mean[0][None, :, None, :].expand(like.shape[0], -1, like.shape[2], -1)
        weight = tensors["weight"][member - 1].to(like.device, torch.float32)
        centred = below - mean[member - 1][None, :, None, :]
        if params.heads == "joint":
            b, h, n, d = centred.shape
            flat = centred.permute(0, 2, 1, 3).reshape(b, n, h * d) @ weight
            predicted = flat.reshape(b, n, h, d).permute(0, 2, 1, 3)
        else:
            predicted = torch.einsum("bhnd,hde->bhne", centred, weight)
        return predicted + mean[member][None, :, None, :]

    # -- calibration --------------------------------------------------------------------------------
    def param_options(self, members: int, fitted: bool, defaults: Mapping[str, object]) -> list[PredictiveParams]:
        """None: unquantized it saves nothing, and the search does not yet weigh quantized widths per
        method (a profile using it is built from :func:`fit_predictors`, see
        ``benchmarks/predictive_profile.py``)."""
        return []

    def new_fit_statistic(self, num_layers, num_heads, head_dim, max_offset) -> SecondMoments:
        return SecondMoments(num_layers, num_heads, head_dim, max_offset=max(1, max_offset))

    def fit(self, statistic: SecondMoments, layers: tuple[int, ...]) -> dict[str, dict[str, torch.Tensor]]:
        return fit_predictors(statistic, tuple(layers))


def _check_tensor(params: PredictiveParams, local: str, tensor: torch.Tensor, members: int,
                  kv_shape: tuple[int, int] | None, name: str) -> str | None:
    allowed = (torch.float32, torch.float16) if local == "weight" else (torch.float32,)
    if tensor.dtype not in allowed:
        return (f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; allowed: "
                f"{' or '.join(str(a).replace('torch.', '') for a in allowed)}")
    h, d = ("H", "D") if kv_shape is None else kv_shape
    if local == "mean":
        want = (members, h, d)
    elif params.heads == "joint":
        want = (members - 1, "H*D" if kv_shape is None else h * d, "H*D" if kv_shape is None else h * d)
    else:
        want = (members - 1, h, d, d)
    if tensor.dim() != len(want) or any(isinstance(w, int) and s != w for s, w in zip(tensor.shape, want,
                                                                                          strict=True)):
        return f"{name} has shape {list(tensor.shape)}; allowed: [{', '.join(str(w) for w in want)}]"
    if not torch.isfinite(tensor).all():
        return f"{name} has non-finite entries; allowed: finite numbers"
    return None
