"""Triton merge kernel: norms, angle, SLERP, magnitudes, distances and retention in one launch.

One program handles one (sequence, KV head) row of the block being merged:

1. stream the row's ``N`` tokens tile by tile (both layers' vectors), compute in float32 the norms,
   the angle ``Ω = 2·atan2(‖u_a − u_b‖, ‖u_a + u_b‖)``, the SLERP direction (linear fallback and
   renormalisation when ``sin Ω`` is tiny, zero vectors give a zero direction), and write the
   direction (model dtype) and the two magnitudes of the first ``count`` tokens straight into their
   storage dtype, plus the angular distance ``Ω/π`` of all ``N`` tokens;
2. after a barrier, decide retention for the first ``count`` tokens from the forward window
   ``[i, i + window)`` of the row's own distances (the range ``[d_min, d_max]`` and the number of
   in-range tokens), exactly as :func:`minicache.runtime.retention.retention_mask` does, and overwrite
   the magnitudes of retained tokens with a flag (``retained_flag``, SLERP's ``RETAINED_MAGNITUDE``).

The window min/max is fused: the row's distances stay in L1/L2 between the two phases, and the
window is short (one block), so phase 2 costs ``count · window`` cached loads per row. Building the
sparse (COO) list of retained tokens needs a global count (``nonzero``) and stays in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minicache.methods.geometry import NORM_EPS, SIN_EPS
from minicache.runtime.kernels import check_usable

_GAMMA_NONE, _GAMMA_RANGE, _GAMMA_ALL = 0, 1, 2


@triton.jit
def _atan2_nonneg(y, x):
    """``atan2(y, x)`` for ``y, x ≥ 0`` (so the result is in ``[0, π/2]``); float32.

    Triton has no atan2 that also runs under the interpreter, so this is Cephes' ``atanf``
    (range reduction at tan(π/8), degree-9 odd polynomial): max abs error ~1.5e-7 rad, about one
    float32 ulp of π/2. ``atan2(0, 0) = 0`` like torch.
    """
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    r = lo / tl.maximum(hi, 1e-30)
    big = r > 0.41421356237309503
    z = tl.where(big, (r - 1.0) / (r + 1.0), r)
    z2 = z * z
    poly = ((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2 - 3.33329491539e-1
    a = poly * z2 * z + z
    a = tl.where(big, 0.7853981633974483 + a, a)
    return tl.where(y > x, 1.5707963267948966 - a, a)


@triton.jit
def _merge_kernel(
    xa_ptr,
    xb_ptr,
    stride_xa_b,
    stride_xa_h,
    stride_xa_n,
    stride_xb_b,
    stride_xb_h,
    stride_xb_n,
    dir_ptr,
    stride_dir_b,
    stride_dir_h,
    stride_dir_n,
    mag_ptr,
    stride_mag_b,
    stride_mag_h,
    stride_mag_n,
    dist_ptr,
    keep_ptr,
    real_ptr,
    sink_ptr,
    H,
    N,
    count,
    window,
    t,
    gamma,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GAMMA_MODE: tl.constexpr,
    DISTINCT: tl.constexpr,
    GLOBAL_RANGE: tl.constexpr,
    SIN_EPS: tl.constexpr,
    NORM_EPS: tl.constexpr,
    FLAG: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    xa_row = xa_ptr + b.to(tl.int64) * stride_xa_b + h64 * stride_xa_h
    xb_row = xb_ptr + b.to(tl.int64) * stride_xb_b + h64 * stride_xb_h
    dir_row = dir_ptr + b.to(tl.int64) * stride_dir_b + h64 * stride_dir_h
    mag_row = mag_ptr + b.to(tl.int64) * stride_mag_b + h64 * stride_mag_h
    dist_row = dist_ptr + pid.to(tl.int64) * N
    keep_row = keep_ptr + pid.to(tl.int64) * count

    # ---- phase 1: SLERP and distances, tile by tile ------------------------------------------
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        tile_ok = n_ok[:, None] & d_ok[None, :]
        xa = tl.load(xa_row + offs_n[:, None] * stride_xa_n + offs_d[None, :], mask=tile_ok, other=0.0)
        xb = tl.load(xb_row + offs_n[:, None] * stride_xb_n + offs_d[None, :], mask=tile_ok, other=0.0)
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
        norm_a = tl.sqrt(tl.sum(xa * xa, axis=1))
        norm_b = tl.sqrt(tl.sum(xb * xb, axis=1))
        ua = xa / tl.maximum(norm_a, NORM_EPS)[:, None]
        ub = xb / tl.maximum(norm_b, NORM_EPS)[:, None]
        dif = ua - ub
        sm = ua + ub
        omega = 2.0 * _atan2_nonneg(tl.sqrt(tl.sum(dif * dif, axis=1)), tl.sqrt(tl.sum(sm * sm, axis=1)))
        sin_omega = tl.sin(omega)
        small = sin_omega < SIN_EPS
        safe_sin = tl.where(small, 1.0, sin_omega)
        w_a = tl.where(small, 1.0 - t, tl.sin((1.0 - t) * omega) / safe_sin)
        w_b = tl.where(small, t, tl.sin(t * omega) / safe_sin)
        e = w_a[:, None] * ua + w_b[:, None] * ub
        e = e / tl.maximum(tl.sqrt(tl.sum(e * e, axis=1)), NORM_EPS)[:, None]
        tl.store(dist_row + offs_n, omega / 3.141592653589793, mask=n_ok)
        c_ok = offs_n < count
        tl.store(
            dir_row + offs_n[:, None] * stride_dir_n + offs_d[None, :],
            e.to(dir_ptr.dtype.element_ty),
            mask=c_ok[:, None] & d_ok[None, :],
        )
        tl.store(mag_row + offs_n * stride_mag_n, norm_a.to(mag_ptr.dtype.element_ty), mask=c_ok)
        tl.store(mag_row + offs_n * stride_mag_n + 1, norm_b.to(mag_ptr.dtype.element_ty), mask=c_ok)

    # Phase 2 reads distances other threads of this program wrote.
    tl.debug_barrier()

    # ---- phase 2: retention over forward windows of this row's own distances -----------------
    real_row = real_ptr + b.to(tl.int64) * N
    sink_row = sink_ptr + b.to(tl.int64) * N
    if GLOBAL_RANGE:
        # One range over all N tokens (``window=None`` in retention_mask).
        g_hi = tl.full([BLOCK_N], float("-inf"), tl.float32)
        g_lo = tl.full([BLOCK_N], float("inf"), tl.float32)
        g_cnt = tl.zeros([BLOCK_N], tl.int32)
        for j0 in range(0, N, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            j_ok = offs_j < N
            in_j = j_ok & (tl.load(real_row + offs_j, mask=j_ok, other=0) != 0)
            in_j = in_j & (tl.load(sink_row + offs_j, mask=j_ok, other=0) == 0)
            d_j = tl.load(dist_row + offs_j, mask=j_ok, other=0.0)
            g_hi = tl.maximum(g_hi, tl.where(in_j, d_j, float("-inf")))
            g_lo = tl.minimum(g_lo, tl.where(in_j, d_j, float("inf")))
            g_cnt += in_j.to(tl.int32)
        all_hi = tl.max(g_hi, axis=0)
        all_lo = tl.min(g_lo, axis=0)
        all_cnt = tl.sum(g_cnt, axis=0)
    for i0 in range(0, count, BLOCK_N):
        offs_i = i0 + tl.arange(0, BLOCK_N)
        i_ok = offs_i < count
        sink_i = i_ok & (tl.load(sink_row + offs_i, mask=i_ok, other=0) != 0)
        in_i = i_ok & (tl.load(real_row + offs_i, mask=i_ok, other=0) != 0) & ~sink_i
        keep = sink_i
        if GAMMA_MODE != 0:
            if GLOBAL_RANGE:
                hi = tl.zeros([BLOCK_N], tl.float32) + all_hi
                lo = tl.zeros([BLOCK_N], tl.float32) + all_lo
                cnt = tl.zeros([BLOCK_N], tl.int32) + all_cnt
            else:
                hi = tl.full([BLOCK_N], float("-inf"), tl.float32)
                lo = tl.full([BLOCK_N], float("inf"), tl.float32)
                cnt = tl.zeros([BLOCK_N], tl.int32)
                for k in range(0, window):
                    offs_j = offs_i + k
                    j_ok = i_ok & (offs_j < N)
                    in_j = j_ok & (tl.load(real_row + offs_j, mask=j_ok, other=0) != 0)
                    in_j = in_j & (tl.load(sink_row + offs_j, mask=j_ok, other=0) == 0)
                    d_j = tl.load(dist_row + offs_j, mask=j_ok, other=0.0)
                    hi = tl.maximum(hi, tl.where(in_j, d_j, float("-inf")))
                    lo = tl.minimum(lo, tl.where(in_j, d_j, float("inf")))
                    cnt += in_j.to(tl.int32)
            d_i = tl.load(dist_row + offs_i, mask=i_ok, other=0.0)
            # Empty windows (cnt 0) keep nothing below; avoid inf - inf there.
            hi = tl.where(cnt > 0, hi, 0.0)
            lo = tl.where(cnt > 0, lo, 0.0)
            spread = hi - lo
            if GAMMA_MODE == 2:
                decide = in_i
            elif DISTINCT:
                decide = d_i >= hi - spread * gamma
            else:
                decide = d_i <= lo + spread * gamma
            keep = keep | (decide & in_i & (cnt >= 2))
        tl.store(keep_row + offs_i, keep.to(tl.int8), mask=i_ok)
        flag = tl.full([BLOCK_N], FLAG, tl.float32).to(mag_ptr.dtype.element_ty)
        tl.store(mag_row + offs_i * stride_mag_n, flag, mask=keep)
        tl.store(mag_row + offs_i * stride_mag_n + 1, flag, mask=keep)


@dataclass(frozen=True)
class BlockMerge:
    """Output of :func:`merge_block`.

    Attributes
    ----------
    direction : torch.Tensor
        ``[B, H, count, D]`` merged directions in the inputs' dtype.
    magnitude : torch.Tensor
        ``[B, H, count, 2]`` per-layer norms in ``magnitude_dtype``; ``retained_flag`` in both slots
        for retained tokens.
    keep : torch.Tensor
        ``[B, H, count]`` bool, True for retained tokens.
    distance : torch.Tensor
        ``[B, H, N]`` float32 angular distances ``Ω/π`` of all ``N`` input tokens.
    """

    direction: torch.Tensor
    magnitude: torch.Tensor
    keep: torch.Tensor
    distance: torch.Tensor


def merge_block(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    t: float,
    gamma: float,
    rule: str = "distinct",
    *,
    valid: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    window: int | None = None,
    count: int | None = None,
    magnitude_dtype: torch.dtype | None = None,
    retained_flag: float = -1.0,
) -> BlockMerge:
    """Merge a block of tokens of two layers with one Triton launch.

    Same math as :func:`~minicache.methods.slerp.slerp_pair` followed by
    :func:`~minicache.runtime.retention.retention_mask` (see there for the meaning of the arguments).

    Parameters
    ----------
    x_a, x_b : torch.Tensor
        ``[B, H, N, D]`` keys or values of the shallower and the deeper layer (same dtype).
    t : float
        SLERP weight of the deeper layer.
    gamma : float
        Retention fraction of the distance range.
    rule : {"distinct", "similar"}
    valid, sink : torch.Tensor, optional
        ``[B, N]`` bool: real (non-padding) tokens, and sink tokens (always retained).
    window : int, optional
        Forward window of the retention range; None: one range over all ``N`` tokens.
    count : int, optional
        Number of leading tokens to merge (the rest is look-ahead for retention); default ``N``.
    magnitude_dtype : torch.dtype, optional
        Storage dtype of magnitudes; default float32.
    retained_flag : float
        Written into both magnitudes of retained tokens (a norm is never negative).

    Returns
    -------
    BlockMerge
    """
    if rule not in ("distinct", "similar"):
        raise ValueError(f"retention rule {rule!r} is not one of 'distinct', 'similar'")
    if x_a.shape != x_b.shape or x_a.dim() != 4:
        shapes = f"{tuple(x_a.shape)}, {tuple(x_b.shape)}"
        raise ValueError(f"expected two [B, H, N, D] tensors of one shape, got {shapes}")
    if x_a.dtype != x_b.dtype:
        raise ValueError(f"x_a and x_b differ in dtype ({x_a.dtype}, {x_b.dtype})")
    check_usable(x_a.device)
    b, h, n, d = x_a.shape
    count = n if count is None else int(count)
    if not 0 <= count <= n:
        raise ValueError(f"count {count} is outside [0, {n}]")
    # The kernel indexes the head dimension with unit stride.
    x_a = x_a if x_a.stride(-1) == 1 else x_a.contiguous()
    x_b = x_b if x_b.stride(-1) == 1 else x_b.contiguous()
    device = x_a.device
    valid = torch.ones(b, n, dtype=torch.bool, device=device) if valid is None else valid
    sink = torch.zeros(b, n, dtype=torch.bool, device=device) if sink is None else sink
    valid = valid.expand(b, n).to(device=device, dtype=torch.uint8).contiguous()
    sink = sink.expand(b, n).to(device=device, dtype=torch.uint8).contiguous()

    direction = torch.empty(b, h, count, d, dtype=x_a.dtype, device=device)
    magnitude = torch.empty(b, h, count, 2, dtype=magnitude_dtype or torch.float32, device=device)
    distance = torch.empty(b, h, n, dtype=torch.float32, device=device)
    keep = torch.empty(b, h, count, dtype=torch.int8, device=device)
    if b * h == 0 or n == 0:
        return BlockMerge(direction, magnitude, keep.bool(), distance)
    gamma_mode = _GAMMA_NONE if gamma <= 0.0 else (_GAMMA_ALL if gamma >= 1.0 else _GAMMA_RANGE)
    block_d = triton.next_power_of_2(d)
    block_n = max(16, min(64, triton.next_power_of_2(n), 8192 // block_d))
    _merge_kernel[(b * h,)](
        x_a,
        x_b,
        *x_a.stride()[:3],
        *x_b.stride()[:3],
        direction,
        *direction.stride()[:3],
        magnitude,
        *magnitude.stride()[:3],
        distance,
        keep,
        valid,
        sink,
        h,
        n,
        count,
        n if window is None else int(window),
        float(t),
        float(gamma),
        D=d,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        GAMMA_MODE=gamma_mode,
        DISTINCT=rule == "distinct",
        GLOBAL_RANGE=window is None,
        SIN_EPS=SIN_EPS,
        NORM_EPS=NORM_EPS,
        FLAG=float(retained_flag),
    )
    return BlockMerge(direction, magnitude, keep.bool(), distance)
