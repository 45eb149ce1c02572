"""Fused decode attention over a merged store (Triton), never materialising restored keys/values.

For one query token per sequence, the logical keys of a member layer are
``k̂_n = m_n · e_n / ‖e_n‖`` over the merged prefix (exact vectors for retained tokens) followed by
the exact residual window; values likewise. Since ``q · k̂_n = (m_n / ‖e_n‖) · (q · e_n)``, the
kernel streams the shared directions and applies the magnitude as a per-token scalar on the logits
(keys) and on the probabilities (values).

Stage 1 (``_decode_partial_kernel``), grid ``(B · H_kv, n_splits)``; one program holds the ``G``
query heads of one KV head (GQA: the directions are read once for all of them) and runs an online
softmax over one split, writing its running max ``m``, sum ``l`` and numerator ``acc``:

* **dense splits** ``[0, n_dense)``: contiguous chunks of the merged prefix, tile by tile. Tokens
  whose key is retained (magnitude flag ``< 0``) are skipped; tokens whose *value* alone is
  retained add their probability to ``l`` but nothing to ``acc`` (their exact value is added by
  the retained split).
* **retained splits** ``[n_dense, n_dense + n_ret)``: each takes a share of the (b, h) row's CSR
  lists. Retained keys: exact key; exact value if the value is retained too (found through the
  precomputed cross index), else the restored value gathered from the dense store; adds to ``l``
  and ``acc``. Retained values whose key is merged: logit from the dense key, exact value, adds to
  ``acc`` only (``l`` already has it).
* **residual splits**: the exact window, as plain flash decoding.

Stage 2 (``_decode_combine_kernel``), grid ``(B · H_kv,)``: log-sum-exp merge of the splits,
``out = Σ acc_s 2^(m_s − M) / Σ l_s 2^(m_s − M)``. A split may have ``l = 0`` and ``acc ≠ 0``
(value corrections), so partials are kept un-normalised.

Quantized stores (issue 6): the oldest ``Mq`` merged tokens of a component are packed
(:mod:`minicache.quant.kivi`: keys per channel in groups of tokens, values per token in groups of
channels, codes as a bit stream) and the newest ``M - Mq`` stay dense. Every load of a
direction, in a dense split or gathered by a retained split, reads the codes, scale and zero point and
dequantizes in registers (``code · scale + zero``, float32, then the model dtype, as
:meth:`QuantizedTensor.dequantize` does); retained vectors are packed per token and read the same
way. Nothing is dequantized in memory. An unmerged quantized layer is the same kernel without
magnitudes: its packed prefix holds the keys and values themselves.

Logits are kept in the log2 domain (scale folded with ``log2 e``) so the kernel uses ``exp2``.

Aligned groups (issue 7): the directions live in the group's aligned frame and a member's vectors
are ``m · e Rᵀ``. Since ``q · (m e Rᵀ) = m (q R) · e``, keys need the query rotated once per step
(``q R``, computed before the launch) wherever a logit reads a direction; values need the part of
the numerator built from directions rotated back by ``Rᵀ`` once per dense split (and per tile of
the few retained keys whose value is merged), never once per token.

Rotated packings (issue 18, :mod:`minicache.quant.rotated`) of an unmerged layer are the same frame
with one ``R`` for every head: the packed prefix holds ``x R``, so the query is rotated once and the
dense splits' numerators rotated back once, exactly as for an aligned group. In a merged group the
frame is the alignment times the packing's rotation, and the launcher rotates the group's short dense
tail into it first (:func:`~minicache.runtime.kernels.support.in_packing_frame`). An unmerged layer's
exact sinks are its retained tokens (key and value both exact); the first ``n_skip`` packed rows hold
stand-ins for them and the dense splits skip them. Keys and values may be packed to different widths.
Keys packed before RoPE (``quantization.pre_rope_keys``) are turned back per tile (:func:`_rope_keys`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from minicache.methods.geometry import NORM_EPS
from minicache.runtime.kernels import check_usable, interpreter_enabled
from minicache.runtime.kernels.support import in_packing_frame, packing_unsupported
from minicache.runtime.views import MergedKVView, decode_mask_row, retained_csr_pair, sink_index

_LOG2E = 1.4426950408889634
# Bytes of one [BLOCK_N, D] tile; 16 KiB keeps the pipelined K and V tiles in shared memory on
# every recent GPU (64 tokens of bf16 at D = 128, 32 tokens of fp32).
_TILE_BYTES = 16384
# Retained entries per tile (gathered rows, so tiles are small; 16 is tl.dot's minimum).
_BLOCK_R = 16
# A dense split covers at least this many tokens, so that writing its partial result (G·D floats)
# stays small next to reading its directions.
_MIN_SPLIT_TOKENS = 256
_RESIDUAL_CHUNK = 256
_RETAINED_PER_SPLIT = 256
_MAX_RETAINED_SPLITS = 16


# How ``_dot`` multiplies: the inputs' own precision (fp16/bf16 on GPUs), full fp32 products for
# fp32 models (the default would round inputs to tf32 on GPUs), or upcast to fp32 first (Triton's
# interpreter computes bf16 dots wrongly; products of bf16 values are exact in fp32, so the result is
# what a GPU computes).
_DOT_NATIVE, _DOT_IEEE, _DOT_UPCAST = 0, 1, 2


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    if DOT_MODE == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_norm(x, NORM_EPS: tl.constexpr):
    x = x.to(tl.float32)
    return tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), NORM_EPS)


@triton.jit
def _dequant(q_row, stride_qn, s_row, z_row, stride_sn, pos, ok, offs_d, d_ok, QBITS: tl.constexpr,
             GROUP: tl.constexpr, PER_TOKEN: tl.constexpr, lv_ptr, HAS_LEVELS: tl.constexpr):
    """Float32 ``[BLOCK, BLOCK_D]`` rows ``pos`` of a packed tensor: ``code · scale + zero``
    (``HAS_LEVELS``: ``levels[code] · scale + zero``, the table at ``lv_ptr``, float32).

    A row's codes are a little-endian bit stream (:func:`minicache.quant.packed.pack`): code ``d`` sits in
    bits ``[d · QBITS, (d + 1) · QBITS)``; widths dividing 8 never cross a byte, 3-bit codes may (two
    bytes are loaded and joined). ``PER_TOKEN``: scale/zero ``[N, D // GROUP]`` (values, retained
    vectors); else ``[N // GROUP, D]`` (keys, per channel).
    """
    ok2 = ok[:, None] & d_ok[None, :]
    row = q_row + pos[:, None] * stride_qn
    if 8 % QBITS == 0:
        PER: tl.constexpr = 8 // QBITS
        byte = tl.load(row + (offs_d // PER)[None, :], mask=ok2, other=0)
        code = (byte.to(tl.int32) >> ((offs_d % PER) * QBITS)[None, :]) & ((1 << QBITS) - 1)
    else:
        first = offs_d * QBITS
        lo = tl.load(row + (first // 8)[None, :], mask=ok2, other=0).to(tl.int32)
        hi = tl.load(row + ((first + QBITS - 1) // 8)[None, :], mask=ok2, other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> (first % 8)[None, :]) & ((1 << QBITS) - 1)
    if PER_TOKEN:
        s_off = pos[:, None] * stride_sn + (offs_d // GROUP)[None, :]
    else:
        s_off = (pos // GROUP)[:, None] * stride_sn + offs_d[None, :]
    scale = tl.load(s_row + s_off, mask=ok2, other=0.0).to(tl.float32)
    zero = tl.load(z_row + s_off, mask=ok2, other=0.0).to(tl.float32)
    if HAS_LEVELS:  # noqa: SIM108 (a constexpr branch: Triton compiles one side only)
        level = tl.load(lv_ptr + code, mask=ok2, other=0.0)
    else:
        level = code.to(tl.float32)
    return level * scale + zero


@triton.jit
def _round_to(x, dtype: tl.constexpr, RTNE: tl.constexpr):
    """``x`` (float32) in ``dtype``. ``RTNE`` rounds to nearest even by hand first: Triton's
    interpreter truncates float32 → bfloat16 where GPUs (and torch) round to nearest even."""
    if RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # exactly representable now: truncation is exact
    return x.to(dtype)


@triton.jit
def _load_prefix(dense_row, stride_dn, q_row, stride_qn, s_row, z_row, stride_sn, n_q, pos, ok, offs_d, d_ok,
                 QBITS: tl.constexpr, GROUP: tl.constexpr, PER_TOKEN: tl.constexpr, RTNE: tl.constexpr,
                 lv_ptr, HAS_LEVELS: tl.constexpr):
    """Rows ``pos`` ``[BLOCK, BLOCK_D]`` of a merged prefix in the model dtype: dequantized from the
    packed part below ``n_q``, loaded from the dense part (which starts at token ``n_q``) above."""
    if QBITS == 0:
        x = tl.load(dense_row + pos[:, None] * stride_dn + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    else:
        packed = ok & (pos < n_q)
        tail = ok & (pos >= n_q)
        x = tl.load(
            dense_row + tl.maximum(pos - n_q, 0)[:, None] * stride_dn + offs_d[None, :],
            mask=tail[:, None] & d_ok[None, :],
            other=0.0,
        )
        deq = _dequant(q_row, stride_qn, s_row, z_row, stride_sn, pos, packed, offs_d, d_ok, QBITS, GROUP, PER_TOKEN,
                       lv_ptr, HAS_LEVELS)
        x = tl.where(packed[:, None], _round_to(deq, x.dtype, RTNE), x)
    return x


@triton.jit
def _load_retained(val_ptr, stride_val, rq_ptr, stride_rq, rs_ptr, rz_ptr, stride_rs, rows, ok, offs_d, d_ok,
                   out_dtype: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr, RTNE: tl.constexpr):
    """Exact (or, packed per token, dequantized) retained vectors of list rows ``rows``."""
    if QBITS == 0:
        x = tl.load(val_ptr + rows[:, None] * stride_val + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    else:
        x = _dequant(rq_ptr, stride_rq, rs_ptr, rz_ptr, stride_rs, rows, ok, offs_d, d_ok, QBITS, GROUP, True,
                     rs_ptr, False)  # retained lists are even (packing_unsupported)
        x = _round_to(x, out_dtype, RTNE)
    return x


@triton.jit
def _mask_bias(mask_row, stride_mask_t, pos, ok, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr):
    """Additive log2-domain bias ``[BLOCK]`` of key positions ``pos`` (0 where no mask)."""
    if HAS_MASK:
        if MASK_BOOL:
            keep = tl.load(mask_row + pos * stride_mask_t, mask=ok, other=0)
            bias = tl.where(keep != 0, 0.0, float("-inf"))
        else:
            bias = tl.load(mask_row + pos * stride_mask_t, mask=ok, other=0.0).to(tl.float32)
            # finfo.min-style masks would overflow to -inf in log2 units; any value below the
            # running-max start (-1e30) already contributes exactly 0.
            bias = tl.maximum(bias, -1e30) * 1.4426950408889634
    else:
        bias = tl.zeros(pos.shape, tl.float32)
    return bias


@triton.jit
def _softmax_step(m_i, l_i, acc, s, v, col_scale, COUNT_L: tl.constexpr, DOT_MODE: tl.constexpr):
    """Online-softmax update with logits ``s`` ``[BG, BN]`` (log2 domain, −inf = skip) and values
    ``v`` ``[BN, BD]``; ``col_scale`` ``[BN]`` multiplies each token's probability in the numerator
    only. ``COUNT_L`` False adds to the numerator but not to the normaliser."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    if COUNT_L:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        l_i = l_i * alpha + tl.sum(p, axis=1)
    else:
        l_i = l_i * alpha
    pv = (p * col_scale[None, :]).to(v.dtype)
    acc = acc * alpha[:, None] + _dot(pv, v, DOT_MODE)
    return m_new, l_i, acc


@triton.jit
def _rope_keys(x, pos, rk_a, rk_b, freq, cscale, DOT_MODE: tl.constexpr, RTNE: tl.constexpr):
    """Keys packed before RoPE (rows ``pos`` of ``x``, ``[BLOCK, BLOCK_D]`` in the packing's frame) as the
    model attends them: ``pre = x A`` (``A = Rᵀ``, the packing's rotation undone; identity when none),
    then RoPE at the rows' cache indices, ``pre · cos + rotate_half(pre) · sin``, where
    ``rotate_half(pre) = x (A P)`` is a second product, not a permutation of registers. The maps are in
    the model dtype (float32 maps of a 128-wide head would not fit in shared memory), accumulated in
    float32."""
    pre = _dot(x, rk_a, DOT_MODE)
    half = _dot(x, rk_b, DOT_MODE)
    angle = pos.to(tl.float32)[:, None] * freq[None, :]
    out = pre * (tl.cos(angle) * cscale[None, :]) + half * (tl.sin(angle) * cscale[None, :])
    return _round_to(out, x.dtype, RTNE)


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    stride_q_b,
    stride_q_h,
    qr_ptr,
    stride_qr_b,
    stride_qr_h,
    rv_ptr,
    kd_ptr,
    stride_kd_b,
    stride_kd_h,
    stride_kd_n,
    km_ptr,
    stride_km_b,
    stride_km_h,
    stride_km_n,
    kr_ptr,
    stride_kr_b,
    stride_kr_h,
    stride_kr_n,
    vd_ptr,
    stride_vd_b,
    stride_vd_h,
    stride_vd_n,
    vm_ptr,
    stride_vm_b,
    stride_vm_h,
    stride_vm_n,
    vr_ptr,
    stride_vr_b,
    stride_vr_h,
    stride_vr_n,
    kq_ptr,
    stride_kq_b,
    stride_kq_h,
    stride_kq_n,
    ks_ptr,
    kz_ptr,
    stride_ks_b,
    stride_ks_h,
    stride_ks_n,
    vq_ptr,
    stride_vq_b,
    stride_vq_h,
    stride_vq_n,
    vs_ptr,
    vz_ptr,
    stride_vs_b,
    stride_vs_h,
    stride_vs_n,
    MQ_K,
    MQ_V,
    krq_ptr,
    stride_krq,
    krs_ptr,
    krz_ptr,
    stride_krs,
    vrq_ptr,
    stride_vrq,
    vrs_ptr,
    vrz_ptr,
    stride_vrs,
    k_off_ptr,
    k_pos_ptr,
    k_row_ptr,
    k_cross_ptr,
    k_val_ptr,
    stride_kval,
    v_off_ptr,
    v_pos_ptr,
    v_row_ptr,
    v_cross_ptr,
    v_val_ptr,
    stride_vval,
    mask_ptr,
    stride_mask_b,
    stride_mask_t,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    H_KV,
    M,
    R,
    qk_scale,
    n_dense,
    dense_chunk,
    n_ret,
    res_chunk,
    n_splits,
    n_skip,
    rk_ptr,
    freq_ptr,
    cscale_ptr,
    klv_ptr,
    vlv_ptr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MAG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    DOT_MODE: tl.constexpr,
    NORM_EPS: tl.constexpr,
    HAS_VROT: tl.constexpr,
    K_QBITS: tl.constexpr,
    V_QBITS: tl.constexpr,
    KR_QBITS: tl.constexpr,
    VR_QBITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_PER_TOKEN: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_PER_TOKEN: tl.constexpr,
    R_GROUP: tl.constexpr,
    RTNE: tl.constexpr,
    ROPE_K: tl.constexpr,
    K_LEVELS: tl.constexpr,
    V_LEVELS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    # 64-bit row offsets: B·H·M·D exceeds 2**31 elements at long contexts.
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + b64 * stride_q_b + (h * G + offs_g)[:, None] * stride_q_h + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # The query in the aligned frame (q R, rotated once per step before the launch), for logits that
    # read directions; the same tensor as q when the keys are not aligned.
    q_al = tl.load(
        qr_ptr + b64 * stride_qr_b + (h * G + offs_g)[:, None] * stride_qr_h + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if HAS_VROT:
        # Rᵀ of this KV head's value alignment as a [D, D] tile: element (i, j) is R[j, i].
        rv_t = tl.load(
            rv_ptr + h64 * D * D + offs_d[None, :] * D + offs_d[:, None],
            mask=d_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    if ROPE_K:
        # Keys packed before RoPE: the [D, D] maps A and A P of _rope_keys, the per-channel frequencies.
        rk_a = tl.load(rk_ptr + offs_d[:, None] * D + offs_d[None, :], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
        rk_b = tl.load(rk_ptr + D * D + offs_d[:, None] * D + offs_d[None, :], mask=d_ok[:, None] & d_ok[None, :],
                       other=0.0)
        freq = tl.load(freq_ptr + offs_d, mask=d_ok, other=0.0)
        cscale = tl.load(cscale_ptr + offs_d, mask=d_ok, other=0.0)
    # A finite start value: fully skipped tiles then give exp2(-inf - m) = 0 and alpha = 1, never NaN.
    m_i = tl.full([BLOCK_G], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    mask_row = mask_ptr + b64 * stride_mask_b
    kd_row = kd_ptr + b64 * stride_kd_b + h64 * stride_kd_h
    vd_row = vd_ptr + b64 * stride_vd_b + h64 * stride_vd_h
    km_row = km_ptr + b64 * stride_km_b + h64 * stride_km_h
    vm_row = vm_ptr + b64 * stride_vm_b + h64 * stride_vm_h
    # Packed parts (K_QBITS / V_QBITS > 0): codes, scales and zero points of the oldest MQ_K / MQ_V merged
    # tokens; keys and values may be packed to different widths.
    kq_row = kq_ptr + b64 * stride_kq_b + h64 * stride_kq_h
    ks_row = ks_ptr + b64 * stride_ks_b + h64 * stride_ks_h
    kz_row = kz_ptr + b64 * stride_ks_b + h64 * stride_ks_h
    vq_row = vq_ptr + b64 * stride_vq_b + h64 * stride_vq_h
    vs_row = vs_ptr + b64 * stride_vs_b + h64 * stride_vs_h
    vz_row = vz_ptr + b64 * stride_vs_b + h64 * stride_vs_h

    if pid_s < n_dense:
        # ---- dense split: stream directions, magnitudes as per-token scalars ----------------
        start = pid_s * dense_chunk
        end = tl.minimum(start + dense_chunk, M)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            ek = _load_prefix(kd_row, stride_kd_n, kq_row, stride_kq_n, ks_row, kz_row, stride_ks_n, MQ_K,
                              offs_n, n_ok, offs_d, d_ok, K_QBITS, K_GROUP, K_PER_TOKEN, RTNE,
                              klv_ptr, K_LEVELS)
            if ROPE_K:
                ek = _rope_keys(ek, offs_n, rk_a, rk_b, freq, cscale, DOT_MODE, RTNE)
            ev = _load_prefix(vd_row, stride_vd_n, vq_row, stride_vq_n, vs_row, vz_row, stride_vs_n, MQ_V,
                              offs_n, n_ok, offs_d, d_ok, V_QBITS, V_GROUP, V_PER_TOKEN, RTNE,
                              vlv_ptr, V_LEVELS)
            s = _dot(q_al, tl.trans(ek), DOT_MODE)
            if HAS_MAG:
                mk = tl.load(km_row + offs_n * stride_km_n, mask=n_ok, other=-1.0).to(tl.float32)
                mv = tl.load(vm_row + offs_n * stride_vm_n, mask=n_ok, other=-1.0).to(tl.float32)
                use = n_ok & (mk >= 0.0)
                k_scale = mk / _row_norm(ek, NORM_EPS)
                # A retained value counts in the normaliser here; its exact value is added later.
                v_scale = tl.where(mv >= 0.0, mv / _row_norm(ev, NORM_EPS), 0.0)
            else:
                # An unmerged layer's first n_skip rows hold stand-ins of its exact sinks (retained splits).
                use = n_ok & (offs_n >= n_skip)
                k_scale = tl.full([BLOCK_N], 1.0, tl.float32)
                v_scale = tl.full([BLOCK_N], 1.0, tl.float32)
            s = s * (k_scale * qk_scale)[None, :]
            s += _mask_bias(mask_row, stride_mask_t, offs_n, n_ok, HAS_MASK, MASK_BOOL)[None, :]
            s = tl.where(use[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, ev, v_scale, True, DOT_MODE)
        if HAS_VROT:
            # Everything this split added to the numerator came from directions: rotate it back once.
            acc = tl.dot(acc, rv_t, input_precision="ieee")
    elif pid_s < n_dense + n_ret:
        # ---- retained split: this program's share of the (b, h) row's CSR lists ---------------
        j = pid_s - n_dense
        ones_r = tl.full([BLOCK_R], 1.0, tl.float32)
        # Retained keys (values exact via the cross index, or restored from the dense store).
        lo = tl.load(k_off_ptr + pid_bh)
        hi = tl.load(k_off_ptr + pid_bh + 1)
        per = (hi - lo + n_ret - 1) // n_ret
        first = lo + j * per
        last = tl.minimum(first + per, hi)
        for i0 in range(first, last, BLOCK_R):
            offs_i = i0 + tl.arange(0, BLOCK_R)
            i_ok = offs_i < last
            pos = tl.load(k_pos_ptr + offs_i, mask=i_ok, other=0)
            row = tl.load(k_row_ptr + offs_i, mask=i_ok, other=0).to(tl.int64)
            cross = tl.load(k_cross_ptr + offs_i, mask=i_ok, other=-1)
            kx = _load_retained(k_val_ptr, stride_kval, krq_ptr, stride_krq, krs_ptr, krz_ptr, stride_krs, row,
                                i_ok, offs_d, d_ok, q.dtype, KR_QBITS, R_GROUP, RTNE)
            s = _dot(q, tl.trans(kx), DOT_MODE) * qk_scale
            s += _mask_bias(mask_row, stride_mask_t, pos, i_ok, HAS_MASK, MASK_BOOL)[None, :]
            s = tl.where(i_ok[None, :], s, float("-inf"))
            exact_v = i_ok & (cross >= 0)
            dense_v = i_ok & (cross < 0)
            vx = _load_retained(v_val_ptr, stride_vval, vrq_ptr, stride_vrq, vrs_ptr, vrz_ptr, stride_vrs,
                                cross.to(tl.int64), exact_v, offs_d, d_ok, q.dtype, VR_QBITS, R_GROUP, RTNE)
            ev = _load_prefix(vd_row, stride_vd_n, vq_row, stride_vq_n, vs_row, vz_row, stride_vs_n, MQ_V,
                              pos, dense_v, offs_d, d_ok, V_QBITS, V_GROUP, V_PER_TOKEN, RTNE,
                              vlv_ptr, V_LEVELS)
            if HAS_MAG:
                mv = tl.load(vm_row + pos * stride_vm_n, mask=dense_v, other=0.0).to(tl.float32)
                vr = ev.to(tl.float32) * (mv / _row_norm(ev, NORM_EPS))[:, None]
            else:
                vr = ev.to(tl.float32)
            if HAS_VROT:
                vr = tl.dot(vr, rv_t, input_precision="ieee")
            v = tl.where(dense_v[:, None], vr.to(vx.dtype), vx)
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, v, ones_r, True, DOT_MODE)
        # Retained values whose key is merged: numerator corrections only.
        lo = tl.load(v_off_ptr + pid_bh)
        hi = tl.load(v_off_ptr + pid_bh + 1)
        per = (hi - lo + n_ret - 1) // n_ret
        first = lo + j * per
        last = tl.minimum(first + per, hi)
        for i0 in range(first, last, BLOCK_R):
            offs_i = i0 + tl.arange(0, BLOCK_R)
            i_ok = offs_i < last
            pos = tl.load(v_pos_ptr + offs_i, mask=i_ok, other=0)
            row = tl.load(v_row_ptr + offs_i, mask=i_ok, other=0).to(tl.int64)
            cross = tl.load(v_cross_ptr + offs_i, mask=i_ok, other=0)
            active = i_ok & (cross < 0)
            ek = _load_prefix(kd_row, stride_kd_n, kq_row, stride_kq_n, ks_row, kz_row, stride_ks_n, MQ_K,
                              pos, active, offs_d, d_ok, K_QBITS, K_GROUP, K_PER_TOKEN, RTNE,
                              klv_ptr, K_LEVELS)
            if ROPE_K:
                ek = _rope_keys(ek, pos, rk_a, rk_b, freq, cscale, DOT_MODE, RTNE)
            s = _dot(q_al, tl.trans(ek), DOT_MODE)
            if HAS_MAG:
                mk = tl.load(km_row + pos * stride_km_n, mask=active, other=0.0).to(tl.float32)
                s = s * (mk / _row_norm(ek, NORM_EPS) * qk_scale)[None, :]
            else:
                s = s * qk_scale
            s += _mask_bias(mask_row, stride_mask_t, pos, active, HAS_MASK, MASK_BOOL)[None, :]
            s = tl.where(active[None, :], s, float("-inf"))
            vx = _load_retained(v_val_ptr, stride_vval, vrq_ptr, stride_vrq, vrs_ptr, vrz_ptr, stride_vrs, row,
                                active, offs_d, d_ok, q.dtype, VR_QBITS, R_GROUP, RTNE)
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, vx, ones_r, False, DOT_MODE)
    else:
        # ---- residual split: the exact window, plain flash decoding ----------------------------
        j = pid_s - n_dense - n_ret
        start = j * res_chunk
        end = tl.minimum(start + res_chunk, R)
        kr_row = kr_ptr + b64 * stride_kr_b + h64 * stride_kr_h
        vr_row = vr_ptr + b64 * stride_vr_b + h64 * stride_vr_h
        ones_n = tl.full([BLOCK_N], 1.0, tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            tile_ok = n_ok[:, None] & d_ok[None, :]
            kk = tl.load(kr_row + offs_n[:, None] * stride_kr_n + offs_d[None, :], mask=tile_ok, other=0.0)
            vv = tl.load(vr_row + offs_n[:, None] * stride_vr_n + offs_d[None, :], mask=tile_ok, other=0.0)
            s = _dot(q, tl.trans(kk), DOT_MODE) * qk_scale
            s += _mask_bias(mask_row, stride_mask_t, M + offs_n, n_ok, HAS_MASK, MASK_BOOL)[None, :]
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, vv, ones_n, True, DOT_MODE)

    part = (pid_bh * n_splits + pid_s).to(tl.int64) * G
    tl.store(part_m_ptr + part + offs_g, m_i, mask=g_ok)
    tl.store(part_l_ptr + part + offs_g, l_i, mask=g_ok)
    tl.store(
        part_acc_ptr + (part + offs_g)[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :]
    )


@triton.jit
def _decode_combine_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    stride_o_b,
    stride_o_h,
    H_KV,
    n_splits,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    tile_ok = g_ok[:, None] & (offs_d < D)[None, :]
    m = tl.full([BLOCK_G], -1e30, tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        part = (pid_bh * n_splits + s).to(tl.int64) * G
        m_s = tl.load(part_m_ptr + part + offs_g, mask=g_ok, other=-1e30)
        l_s = tl.load(part_l_ptr + part + offs_g, mask=g_ok, other=0.0)
        acc_s = tl.load(part_acc_ptr + (part + offs_g)[:, None] * D + offs_d[None, :], mask=tile_ok, other=0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        total = total * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(
        out_ptr + b.to(tl.int64) * stride_o_b + (h * G + offs_g)[:, None] * stride_o_h + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=tile_ok,
    )


@functools.lru_cache(maxsize=64)
def _int32_zeros(n: int, device: torch.device) -> torch.Tensor:
    # Read-only stand-ins, cached so that a decode step launches no fill kernels for them.
    return torch.zeros(n, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _stand_in(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A pointer of the right element type for an absent packed part (the kernel never reads it).
    return torch.zeros(1, dtype=dtype, device=device)


def _quant_layout(keys: MergedKVView, values: MergedKVView) -> tuple[int, int, int, int, int, bool, int, bool, int]:
    """``(key bits, value bits, retained key bits, retained value bits, key group, keys per token,
    value group, values per token, retained group)``; bits 0 where nothing is packed (retained bits 0:
    exact retained vectors). The packed parts of one side (keys, or values) share a width."""
    sides = {
        "keys": (keys.qdirection, keys.retained_q),
        "values": (values.qdirection, values.retained_q),
    }
    bits = {}
    for side, parts in sides.items():
        widths = {q.bits for q in parts if q is not None}
        if len(widths) > 1:
            raise ValueError(f"packed {side} of one layer use different bit widths: {sorted(widths)}")
        bits[side] = widths.pop() if widths else 0
    for view in (keys, values):
        if view.retained_q is not None and view.retained_q.axis != "channels":
            raise ValueError("retained vectors must be packed per token (axis 'channels'), "
                             f"got {view.retained_q.axis!r}")
    groups = {q.group_size for q in (keys.retained_q, values.retained_q) if q is not None}
    if len(groups) > 1:
        raise ValueError(f"retained keys and values are packed in different groups: {sorted(groups)}")
    kq, vq = keys.qdirection, values.qdirection
    return (
        bits["keys"] if kq is not None else 0,
        bits["values"] if vq is not None else 0,
        0 if keys.retained_q is None else keys.retained_q.bits,
        0 if values.retained_q is None else values.retained_q.bits,
        1 if kq is None else kq.group_size,
        kq is not None and kq.axis == "channels",
        1 if vq is None else vq.group_size,
        vq is None or vq.axis == "channels",
        groups.pop() if groups else 1,
    )


def decode_block_tokens(block_d: int, dtype: torch.dtype, *, rope: bool = False) -> int:
    """Tokens per tile: ``_TILE_BYTES`` of keys, half that with pre-RoPE keys (their two ``[D, D]`` maps
    take the shared memory: 241 KB for a 128-wide bf16 head with full tiles, 160 KB with halves)."""
    return max(16, min(64, (_TILE_BYTES // (2 if rope else 1)) // (block_d * dtype.itemsize)))


# (id(rope), id(rotation), D, dtype, device) -> (rope, rotation, maps): every layer and step of a cache
# reads the same maps. The entry holds the RoPE and rotation objects, so their ids cannot be reused.
_ROPE_MAPS: dict[tuple, tuple] = {}


def _rope_maps(keys: MergedKVView, d: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (id(keys.rope), id(keys.qdirection.rotation), d, keys.dtype, str(device))
    if key not in _ROPE_MAPS:
        if len(_ROPE_MAPS) >= 16:
            _ROPE_MAPS.clear()
        _ROPE_MAPS[key] = (keys.rope, keys.qdirection.rotation, _build_rope_maps(keys, d, device))
    return _ROPE_MAPS[key][2]


def _build_rope_maps(keys: MergedKVView, d: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(maps, freq, cscale)`` for :func:`_rope_keys`: ``[2, D, D]`` (model dtype) ``A`` (the packing's ``Rᵀ``, or
    the identity) and ``A P`` (``P``: rotate-half, ``x P = rotate_half(x)`` on the rotary channels), the
    ``[D]`` angular frequency of each channel (0 past the rotary ones) and its scale (the RoPE's
    attention scaling on rotary channels, 1 on the rest)."""
    rope = keys.rope
    rotation = keys.qdirection.rotation
    a = torch.eye(d, device=device) if rotation is None else rotation.to(device=device, dtype=torch.float32).T
    half = len(rope.inv_freq)
    perm = torch.zeros(d, d, device=device)
    idx = torch.arange(half, device=device)
    perm[idx + half, idx] = -1.0  # rotate_half: out[j] = -x[j + half], out[j + half] = x[j]
    perm[idx, idx + half] = 1.0
    maps = torch.stack([a, a @ perm]).to(keys.dtype).contiguous()
    freq = torch.zeros(d, device=device)
    freq[: 2 * half] = rope.inv_freq.to(device).repeat(2)
    cscale = torch.ones(d, device=device)
    cscale[: 2 * half] = rope.scaling
    return maps, freq, cscale


def _unmerged_sinks(keys: MergedKVView, values: MergedKVView, b: int, h: int):
    """``(keys, values, n_skip)``: an unmerged layer's exact sinks as CSR retained lists (the kernel's
    retained splits read them, key and value both exact), and how many packed rows stand in for them."""
    if keys.method is not None or not (keys.retained_count or values.retained_count):
        return keys, values, 0
    sinks = keys.sink_count
    if not sinks or values.sink_count != sinks:
        raise ValueError("an unmerged layer's retained entries must be its exact sinks: the same first tokens "
                         "of every row and head, for keys and values")
    csr_k, csr_v = _sink_csr(b, h, sinks, keys.retained_index.device)
    return dataclasses.replace(keys, retained=csr_k), dataclasses.replace(values, retained=csr_v), sinks


def _grouped_retained(keys: MergedKVView, values: MergedKVView, b: int, h: int):
    """``(keys, values)`` with a merged group's retained lists grouped by (b, h) (CSR, which the kernel's
    splits read), built here when the views hold them only in store order (``retained_index``: views not
    made by :meth:`GroupStore.kernel_views`, such as the vLLM plugin's batch gathered from its pages)."""
    if keys.method is None or (keys.retained is not None and values.retained is not None):
        return keys, values
    if not (keys.retained_count or values.retained_count):
        return keys, values
    csr_k, csr_v = retained_csr_pair(keys.retained_index, values.retained_index, b, h)
    return dataclasses.replace(keys, retained=csr_k), dataclasses.replace(values, retained=csr_v)


@functools.lru_cache(maxsize=64)
def _sink_csr(b: int, h: int, s: int, device: torch.device):
    index = sink_index(b, h, s, device)
    return retained_csr_pair(index, index, b, h)


def num_stages(dtype: torch.dtype) -> int:
    """Software-pipelining depth: 2 for fp32 tiles (3 would need ~140 KB of shared memory), else 3."""
    return 2 if dtype == torch.float32 else 3


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: fewer, longer splits are faster


def plan_splits(
    batch_heads: int,
    merged: int,
    residual: int,
    max_retained: int,
    device: torch.device,
    split_tokens: int | None = None,
    block_n: int = 64,
) -> tuple[int, int, int, int, int]:
    """Choose the split-K layout: ``(n_dense, dense_chunk, n_ret, n_res, res_chunk)``.

    Enough programs to fill the GPU (about four waves of ``B · H_kv · splits`` over the SMs), but
    dense splits no shorter than ``_MIN_SPLIT_TOKENS`` tokens. ``split_tokens`` fixes the tokens
    per split of every kind instead (tests use it to get many splits out of small shapes).
    """
    n_dense = dense_chunk = 0
    res_chunk, ret_per_split = _RESIDUAL_CHUNK, _RETAINED_PER_SPLIT
    if split_tokens is not None:
        res_chunk = ret_per_split = split_tokens
    if merged > 0:
        if split_tokens is None:
            target = max(1, math.ceil(4 * _multiprocessors(device) / max(batch_heads, 1)))
            n_dense = max(1, min(target, math.ceil(merged / _MIN_SPLIT_TOKENS)))
            dense_chunk = triton.cdiv(merged, n_dense)
        else:
            dense_chunk = split_tokens
        dense_chunk = triton.cdiv(dense_chunk, block_n) * block_n
        n_dense = triton.cdiv(merged, dense_chunk)
    n_ret = 0
    if merged > 0 and max_retained > 0:
        n_ret = min(_MAX_RETAINED_SPLITS, triton.cdiv(max_retained, ret_per_split))
    return n_dense, dense_chunk, n_ret, triton.cdiv(residual, res_chunk), res_chunk


def fused_decode_attention(
    query: torch.Tensor,
    keys: MergedKVView,
    values: MergedKVView,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    *,
    use_magnitude: bool = True,
    split_tokens: int | None = None,
) -> torch.Tensor:
    """Decode attention (one query token) read straight from a merged store.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, Hq, 1, D]`` (head dim contiguous); ``Hq = G · H`` with ``G`` query heads per KV head.
    keys, values : MergedKVView
        One member layer's keys and values (``[B, H, M + r, D]`` logically), packed or not; views
        without magnitudes (an unmerged quantized layer) are attended as they are stored.
    attention_mask : torch.Tensor, optional
        ``[B or 1, 1, 1, M + r]`` bool (True = attend) or additive float decode mask, or ``[B, M + r]``;
        handles left padding and any other per-sequence key mask.
    scaling : float, optional
        Logit scale; default ``D ** -0.5``.
    use_magnitude : bool
        False runs the same kernel as plain split-K flash decoding over the stored directions and
        the residual window: no magnitudes, no retained flags, no retained splits. It is the
        benchmark's baseline for what merging costs the kernel; not a correct attention.
    split_tokens : int, optional
        Tokens per split (dense splits round it up to a whole number of tiles); default: chosen from the
        shape and the GPU's number of SMs.

    Returns
    -------
    torch.Tensor
        ``[B, 1, Hq, D]`` in ``query.dtype``.
    """
    check_usable(query.device)
    b, hq, q_len, d = query.shape
    if q_len != 1:
        raise ValueError(f"fused decode attention takes one query token, got {q_len}")
    kb, h, r, kd = keys.residual.shape
    if (kb, kd) != (b, d) or hq % h:
        raise ValueError(f"query {tuple(query.shape)} does not fit keys {tuple(keys.shape)}")
    if values.residual.shape != keys.residual.shape or values.merged_length != keys.merged_length:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
    group = hq // h
    m_len = keys.merged_length
    scaling = d**-0.5 if scaling is None else scaling
    device, dtype = query.device, keys.dtype
    q = query[:, :, 0, :]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if q.dtype != dtype:
        q = q.to(dtype)
    # Alignment (only meaningful with magnitudes: the no-magnitude variant is the benchmark baseline), times a
    # merged group's rotated packing (in_packing_frame), or the rotated packing of an unmerged layer (its frame).
    has_mag = use_magnitude and m_len > 0 and keys.magnitude is not None and values.magnitude is not None
    keys, values = in_packing_frame(keys), in_packing_frame(values)
    for view, role in ((keys, "keys"), (values, "values")):
        reason = packing_unsupported(view, role)
        if reason:
            raise ValueError(reason)
    rope_maps = None if keys.rope is None or keys.qdirection is None else _rope_maps(keys, d, device)
    k_rot = keys.rotation if has_mag or keys.method is None else None
    v_rot = values.rotation if has_mag or values.method is None else None
    keys, values, n_skip = _unmerged_sinks(keys, values, b, h)
    keys, values = _grouped_retained(keys, values, b, h)
    if k_rot is not None:
        # q · (m e Rᵀ) = m (q R) · e: one [G, D] × [D, D] product per KV head and step.
        q_al = torch.einsum("bhgd,hde->bhge", q.float().reshape(b, h, group, d), k_rot.float())
        q_al = q_al.reshape(b, hq, d).to(dtype).contiguous()
    else:
        q_al = q
    if v_rot is not None:
        v_rot = v_rot.to(device=device, dtype=torch.float32).contiguous()
        if tuple(v_rot.shape) != (h, d, d):
            raise ValueError(f"value rotation {tuple(v_rot.shape)} does not fit {h} heads of dim {d}")

    # Absent parts get a stand-in pointer; the split plan never reads them.
    dummy = keys.residual
    idx_dummy = _int32_zeros(2, device)
    k_bits, v_bits, kr_bits, vr_bits, k_group, k_per_token, v_group, v_per_token, r_group = _quant_layout(keys, values)
    code_dummy = _stand_in(torch.uint8, device)
    scale_dummy = _stand_in(torch.float16, device)
    # uneven levels (a scheme's table, float32): the packed prefix only (a merged group's retained lists with
    # uneven levels were restored by in_packing_frame)
    k_levels, v_levels = (None if v.qdirection is None or v.qdirection.levels is None
                          else v.qdirection.levels.to(device=device, dtype=torch.float32).contiguous()
                          for v in (keys, values))

    def dense_parts(view: MergedKVView):
        """The dense tail of directions (the whole prefix when nothing is packed) and magnitudes."""
        tail = (view.direction, view.direction.stride()[:3]) if view.direction is not None else (dummy, (0, 0, 0))
        if not has_mag:
            return (*tail, dummy, (0, 0, 0))
        mag = view.magnitude[..., view.member]
        return (*tail, mag, mag.stride()[:3])

    def packed_parts(view: MergedKVView):
        """Codes, their strides, scales, zero points, their strides, and ``Mq``."""
        qt = view.qdirection
        if qt is None:
            return code_dummy, (0, 0, 0), scale_dummy, scale_dummy, (0, 0, 0), 0
        scale, zero = qt.scales()  # 8-bit ones decoded (a group's two numbers: small beside its codes)
        if qt.data.stride(-1) != 1 or scale.stride(-1) != 1 or zero.stride() != scale.stride():
            raise ValueError("packed directions need unit-stride last dims and zero points laid out like scales")
        return qt.data, qt.data.stride()[:3], scale, zero, scale.stride()[:3], qt.length

    def csr_parts(view: MergedKVView):
        """CSR lists, exact retained vectors (+ row stride) and packed ones (codes, stride, scale, zero, stride)."""
        csr = view.retained
        no_packed = (code_dummy, 0, scale_dummy, scale_dummy, 0)
        if csr is None or (view.retained_value is None and view.retained_q is None) or csr.pos.numel() == 0:
            offsets = _int32_zeros(b * h + 1, device) if csr is None else csr.offsets
            return offsets, idx_dummy, idx_dummy, idx_dummy, dummy, 0, *no_packed
        if view.retained_q is not None:
            rq = view.retained_q
            data, scale, zero = (t[:, view.member] for t in (rq.data, *rq.scales()))
            packed = (data, data.stride(0), scale, zero, scale.stride(0))
            return csr.offsets, csr.pos, csr.row, csr.cross, dummy, 0, *packed
        val = view.retained_value[:, view.member]
        if val.stride(-1) != 1:
            val = val.contiguous()
        return csr.offsets, csr.pos, csr.row, csr.cross, val, val.stride(0), *no_packed

    kd_t, kd_s, km_t, km_s = dense_parts(keys)
    vd_t, vd_s, vm_t, vm_s = dense_parts(values)
    # The cross index of keys points into the *values'* list and vice versa.
    kq_t, kq_s, ks_t, kz_t, ks_s, mq_k = packed_parts(keys)
    vq_t, vq_s, vs_t, vz_t, vs_s, mq_v = packed_parts(values)
    k_off, k_pos, k_row, k_cross, k_val, k_val_stride, *k_packed = csr_parts(keys)
    v_off, v_pos, v_row, v_cross, v_val, v_val_stride, *v_packed = csr_parts(values)
    for t in (keys.residual, values.residual, kd_t, vd_t, k_val, v_val, k_packed[0], v_packed[0]):
        if t.stride(-1) != 1:
            raise ValueError("the kernel reads the head dimension with unit stride")

    row = decode_mask_row(attention_mask, b, m_len + r)
    if row is None:
        mask_t, mask_s, has_mask, mask_bool = idx_dummy, (0, 0), False, False
    elif row.dtype == torch.bool:
        mask_t = row.view(torch.uint8)
        mask_s, has_mask, mask_bool = mask_t.stride(), True, True
    else:
        mask_t, mask_s, has_mask, mask_bool = row, row.stride(), True, False

    max_ret = 0
    for view in (keys, values):
        if view.retained is not None and (has_mag or n_skip):
            max_ret = max(max_ret, view.retained.max_count)
    block_d = max(16, triton.next_power_of_2(d))
    block_n = decode_block_tokens(block_d, dtype, rope=rope_maps is not None)
    plan = plan_splits(b * h, m_len, r, max_ret, device, split_tokens, block_n)
    n_dense, dense_chunk, n_ret, n_res, res_chunk = plan
    n_splits = n_dense + n_ret + n_res
    out = torch.empty(b, 1, hq, d, dtype=query.dtype, device=device)
    if n_splits == 0:
        return out.zero_()
    part_m = torch.empty(b * h * n_splits * group, dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(b * h * n_splits * group, d, dtype=torch.float32, device=device)
    block_g = max(16, triton.next_power_of_2(group))
    if dtype == torch.float32:
        dot_mode = _DOT_IEEE
    elif dtype == torch.bfloat16 and interpreter_enabled():
        dot_mode = _DOT_UPCAST
    else:
        dot_mode = _DOT_NATIVE

    _decode_partial_kernel[(b * h, n_splits)](
        q,
        q.stride(0),
        q.stride(1),
        q_al,
        q_al.stride(0),
        q_al.stride(1),
        part_m if v_rot is None else v_rot,
        kd_t,
        *kd_s,
        km_t,
        *km_s,
        keys.residual,
        *keys.residual.stride()[:3],
        vd_t,
        *vd_s,
        vm_t,
        *vm_s,
        values.residual,
        *values.residual.stride()[:3],
        kq_t,
        *kq_s,
        ks_t,
        kz_t,
        *ks_s,
        vq_t,
        *vq_s,
        vs_t,
        vz_t,
        *vs_s,
        mq_k,
        mq_v,
        *k_packed,
        *v_packed,
        k_off,
        k_pos,
        k_row,
        k_cross,
        k_val,
        k_val_stride,
        v_off,
        v_pos,
        v_row,
        v_cross,
        v_val,
        v_val_stride,
        mask_t,
        *mask_s,
        part_m,
        part_l,
        part_acc,
        h,
        m_len,
        r,
        float(scaling) * _LOG2E,
        n_dense,
        dense_chunk,
        n_ret,
        res_chunk,
        n_splits,
        n_skip,
        *(rope_maps if rope_maps is not None else (part_m, part_m, part_m)),
        *(part_m if t is None else t for t in (k_levels, v_levels)),
        G=group,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_R=_BLOCK_R,
        D=d,
        BLOCK_D=block_d,
        HAS_MAG=has_mag,
        HAS_MASK=has_mask,
        MASK_BOOL=mask_bool,
        DOT_MODE=dot_mode,
        NORM_EPS=NORM_EPS,
        HAS_VROT=v_rot is not None,
        K_QBITS=k_bits,
        V_QBITS=v_bits,
        KR_QBITS=kr_bits,
        VR_QBITS=vr_bits,
        K_GROUP=k_group,
        K_PER_TOKEN=k_per_token,
        V_GROUP=v_group,
        V_PER_TOKEN=v_per_token,
        R_GROUP=r_group,
        RTNE=dtype == torch.bfloat16 and interpreter_enabled(),
        ROPE_K=rope_maps is not None,
        K_LEVELS=k_levels is not None,
        V_LEVELS=v_levels is not None,
        num_stages=num_stages(dtype),
    )
    _decode_combine_kernel[(b * h,)](
        part_m,
        part_l,
        part_acc,
        out,
        out.stride(0),
        out.stride(2),
        h,
        n_splits,
        G=group,
        BLOCK_G=block_g,
        D=d,
        BLOCK_D=block_d,
    )
    return out
