"""Merge math against an independent float64 reference, including the edge cases."""

import math

import pytest
import torch

from minicache.methods.geometry import angle_between
from minicache.methods.slerp import restore, slerp_pair
from minicache.runtime.retention import retention_mask


def reference_slerp(a: torch.Tensor, b: torch.Tensor, t: float):
    """Textbook SLERP in float64 via arccos, one vector pair at a time."""
    a, b = a.double(), b.double()
    ma, mb = a.norm(), b.norm()
    ua = a / ma if ma > 0 else torch.zeros_like(a)
    ub = b / mb if mb > 0 else torch.zeros_like(b)
    cos = torch.clamp(ua @ ub, -1.0, 1.0)
    omega = torch.arccos(cos)
    if torch.sin(omega) < 1e-6:
        e = (1 - t) * ua + t * ub
    else:
        e = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    e = e / e.norm() if e.norm() > 0 else e
    return e, torch.stack([ma, mb]), omega / math.pi


@pytest.mark.parametrize("t", [0.0, 0.3, 0.6, 1.0])
def test_slerp_matches_float64_reference(t):
    torch.manual_seed(0)
    a, b = torch.randn(50, 64), torch.randn(50, 64)
    got = slerp_pair(a, b, t)
    for i in range(50):
        e, m, d = reference_slerp(a[i], b[i], t)
        torch.testing.assert_close(got.direction[i].double(), e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.magnitudes[i].double(), m, atol=1e-5, rtol=1e-5)
        assert abs(got.distance[i].item() - d.item()) < 1e-6


def test_slerp_endpoints_restore_exactly():
    torch.manual_seed(1)
    a, b = torch.randn(8, 3, 16, 64), torch.randn(8, 3, 16, 64)
    at_a = slerp_pair(a, b, 0.0)  # t=0: the shallower layer's direction
    torch.testing.assert_close(restore(at_a.direction, at_a.magnitudes[..., 0]), a, atol=1e-5, rtol=1e-5)
    at_b = slerp_pair(a, b, 1.0)
    torch.testing.assert_close(restore(at_b.direction, at_b.magnitudes[..., 1]), b, atol=1e-5, rtol=1e-5)


def test_identical_vectors_merge_losslessly():
    x = torch.randn(10, 64)
    out = slerp_pair(x, 2.5 * x, 0.6)
    assert torch.all(out.distance < 1e-6)
    torch.testing.assert_close(restore(out.direction, out.magnitudes[..., 0]), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(restore(out.direction, out.magnitudes[..., 1]), 2.5 * x, atol=1e-4, rtol=1e-5)


def test_opposite_vectors_no_nan_and_distance_one():
    x = torch.randn(10, 64)
    for t in (0.5, 0.6):
        out = slerp_pair(x, -x, t)
        assert torch.isfinite(out.direction).all()
        torch.testing.assert_close(out.distance, torch.ones(10))
    # t = 0.6 leans to the deeper layer: its direction is -x.
    out = slerp_pair(x, -x, 0.6)
    torch.testing.assert_close(restore(out.direction, out.magnitudes[..., 1]), -x, atol=1e-4, rtol=1e-4)


def test_zero_vectors_no_nan_and_restore_to_zero():
    x = torch.randn(4, 64)
    zero = torch.zeros(4, 64)
    for a, b in ((zero, x), (x, zero), (zero, zero)):
        out = slerp_pair(a, b, 0.6)
        assert torch.isfinite(out.direction).all() and torch.isfinite(out.distance).all()
        torch.testing.assert_close(restore(out.direction, out.magnitudes[..., 0]).abs().sum() > 0, a.abs().sum() > 0)
    out = slerp_pair(zero, x, 0.6)
    torch.testing.assert_close(restore(out.direction, out.magnitudes[..., 0]), zero)
    # One zero side: the shared direction is the other side's, so that side restores exactly.
    torch.testing.assert_close(restore(out.direction, out.magnitudes[..., 1]), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs_computed_in_float32(dtype, tol):
    torch.manual_seed(2)
    a, b = torch.randn(32, 128), torch.randn(32, 128)
    half = slerp_pair(a.to(dtype), b.to(dtype), 0.6)
    assert half.direction.dtype == torch.float32
    ref = slerp_pair(a.to(dtype).double(), b.to(dtype).double(), 0.6)
    torch.testing.assert_close(half.direction.double(), ref.direction.double(), atol=1e-5, rtol=1e-5)
    rebuilt = restore(half.direction.to(dtype), half.magnitudes[..., 0], dtype)
    assert rebuilt.dtype == dtype
    torch.testing.assert_close(
        rebuilt.double(), restore(ref.direction, ref.magnitudes[..., 0]).double(), atol=tol * 10, rtol=tol
    )


def test_angle_is_accurate_near_zero_and_pi():
    u = torch.nn.functional.normalize(torch.randn(64, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(u + 1e-5 * torch.randn(64, dtype=torch.float64), dim=0)
    exact = torch.arccos(torch.clamp(u @ v, -1, 1))
    got = angle_between(u.float(), v.float()).double()
    assert abs(got - exact) < 1e-6
    assert abs(angle_between(u.float(), -u.float()).item() - math.pi) < 1e-6


def test_retention_distinct_and_similar_rules():
    d = torch.tensor([[[0.1, 0.2, 0.3, 0.5, 0.9, 0.88]]])
    # range [0.1, 0.9]; gamma 0.05 -> distinct keeps d >= 0.86, similar keeps d <= 0.14
    assert retention_mask(d, 0.05, "distinct").tolist() == [[[False, False, False, False, True, True]]]
    assert retention_mask(d, 0.05, "similar").tolist() == [[[True, False, False, False, False, False]]]
    assert not retention_mask(d, 0.0).any(), "gamma = 0 retains nothing"
    assert retention_mask(d, 1.0).all()


def test_retention_sink_padding_and_window():
    d = torch.tensor([[[0.99, 0.1, 0.2, 0.3, 0.5, 0.9]]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    sink = torch.tensor([[False, True, False, False, False, False]])
    keep = retention_mask(d, 0.05, valid=valid, sink=sink)
    # padding (first) never retained nor in range; sink always retained; range of the rest [0.2, 0.9]
    assert keep.tolist() == [[[False, True, False, False, False, True]]]
    # forward window of 2: token i compares with i+1 only (needs 2 valid tokens in the window)
    d2 = torch.tensor([[[0.1, 0.5, 0.4, 0.8, 0.2]]])
    keep = retention_mask(d2, 0.05, window=2, count=4)
    assert keep.tolist() == [[[False, True, False, True]]]


def test_retention_is_per_sequence_and_head():
    torch.manual_seed(3)
    d = torch.rand(3, 2, 40)
    keep = retention_mask(d, 0.1)
    for b in range(3):
        for h in range(2):
            assert torch.equal(keep[b, h], retention_mask(d[b : b + 1, h : h + 1], 0.1)[0, 0])
