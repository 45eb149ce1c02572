"""The averaging baseline (``method: average``): merge math, profiles, and the cache that stores it."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, DynamicCache

from minicache import MergeProfile, MiniCache
from minicache.methods.average import average_group
from minicache.methods.slerp import restore, slerp_pair
from minicache.profile import Defaults, MergeGroup, MergeSettings, ProfileError
from minicache.runtime.store import GroupStore, PaddingInfo
from tests.tiny_configs import tiny_config


def reference_average(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted mean of the members' vectors in float64, the textbook formula."""
    return sum(w * x.double() for w, x in zip(weights, xs, strict=True))


def reference_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between the vectors of every token / π, in float64 via arccos (``[...]``)."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


# ---- merge math --------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.5, 0.6, 1.0])
def test_average_pair_matches_float64_reference(t):
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    merged = average_group([a, b], t)
    want = reference_average([a, b], [1 - t, t])
    for member in range(2):
        got = restore(merged.direction, merged.magnitudes[..., member], torch.float64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert merged.magnitudes.shape == (2, 3, 40, 2)
    torch.testing.assert_close(merged.magnitudes[..., 0].double(), want.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # Retention sees the same angular distance as SLERP: the comparison is fair.
    torch.testing.assert_close(merged.distance, slerp_pair(a, b, t).distance, rtol=0, atol=0)
    torch.testing.assert_close(merged.distance.double(), reference_distance(a, b), atol=1e-5, rtol=0)


def test_plain_average_is_the_mean_vector():
    a = torch.tensor([[3.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 0.0]])
    merged = average_group([a, b], 0.5)
    for member in range(2):
        restored = restore(merged.direction, merged.magnitudes[..., member])
        torch.testing.assert_close(restored, torch.tensor([[1.5, 2.0, 0.0]]))
    assert merged.distance.item() == pytest.approx(0.5)  # orthogonal: Ω = π/2


def test_average_of_opposite_vectors_is_zero_not_nan():
    a = torch.tensor([[1.0, 2.0]])
    merged = average_group([a, -a], 0.5)
    assert torch.equal(merged.magnitudes, torch.zeros(1, 2))
    assert torch.isfinite(merged.direction).all()
    assert torch.equal(restore(merged.direction, merged.magnitudes[..., 0]), torch.zeros(1, 2))
    zero = average_group([torch.zeros(1, 2), torch.zeros(1, 2)], 0.5)
    assert torch.isfinite(zero.direction).all() and torch.isfinite(zero.distance).all()


def test_average_of_three_layers_with_weights_and_rotations():
    torch.manual_seed(1)
    xs = [torch.randn(1, 2, 10, 8) for _ in range(3)]
    q, _ = torch.linalg.qr(torch.randn(3, 2, 8, 8))  # an orthogonal R per member and head
    weights = [0.2, 0.3, 0.5]
    merged = average_group(xs, weights=weights, rotations=q)
    aligned = [torch.einsum("bhnd,hde->bhne", x.double(), r.double()) for x, r in zip(xs, q, strict=True)]
    mean = reference_average(aligned, weights)
    for member in range(3):
        got = restore(merged.direction, merged.magnitudes[..., member], torch.float64, q[member])
        want = torch.einsum("bhne,hde->bhnd", mean, q[member].double())  # x̄ Rᵢᵀ
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    uniform = average_group(xs)
    torch.testing.assert_close(
        restore(uniform.direction, uniform.magnitudes[..., 0], torch.float64),
        reference_average(xs, [1 / 3] * 3),
        atol=1e-5,
        rtol=1e-5,
    )


# ---- profiles ----------------------------------------------------------------------------------
def test_method_field_validates_and_round_trips():
    from minicache.methods.average import AverageParams

    assert MergeSettings.create().method == "slerp"
    assert MergeSettings.create().to_dict()["method"] == "slerp", "every component names its method"
    assert MergeSettings.create(method="average").to_dict()["method"] == "average"
    assert isinstance(MergeSettings.create(method="average").params, AverageParams)
    assert MergeSettings(AverageParams(t=0.5)).method == "average", "the method follows from its Params class"
    allowed = (r"^method: 'mean' is not a registered merge method; allowed: one of 'average', 'exact', 'lowrank', "
               r"'predictive_residual', 'slerp'")
    with pytest.raises(ProfileError, match=allowed):
        MergeSettings.create(method="mean")
    data = {
        "format_version": 2,
        "groups": [{"layers": [2, 3], "keys": {"method": "average"}, "values": {"method": 1}}],
    }
    with pytest.raises(ProfileError, match=r"^groups\[0\]\.values\.method: 1 is not a registered merge method"):
        MergeProfile.from_dict(data)
    data["groups"][0]["values"]["method"] = "slerp"
    profile = MergeProfile.from_dict(data)
    assert (profile.groups[0].keys.method, profile.groups[0].values.method) == ("average", "slerp")
    again = MergeProfile.from_yaml(profile.to_yaml())
    assert again == profile
    written = yaml.safe_load(profile.to_yaml())["groups"][0]
    assert written["keys"]["method"] == "average" and written["values"]["method"] == "slerp"


def test_average_preset():
    config = tiny_config("llama", num_hidden_layers=30)
    slerp = MergeProfile.preset("paper", config)
    average = MergeProfile.preset("paper", config, t=0.5, method="average")
    assert [g.layers for g in average.groups] == [g.layers for g in slerp.groups]
    assert {(s.method, s.params.t) for g in average.groups for s in (g.keys, g.values)} == {("average", 0.5)}
    assert "method average" in average.describe()
    assert "method" not in slerp.describe()
    with pytest.raises(ProfileError, match=r"^method: 'lerp' is not a registered merge method"):
        MergeProfile.preset("paper", config, method="lerp")


# ---- the cache ---------------------------------------------------------------------------------
def average_settings(**overrides) -> MergeSettings:
    return MergeSettings.create(**{"t": 0.5, "gamma": 0.2, "sink_tokens": 1, "method": "average", **overrides})


def test_pair_store_restores_both_layers_as_the_average():
    torch.manual_seed(0)
    settings = average_settings()
    group = MergeGroup((0, 1), settings, settings)
    store = GroupStore(group, residual_length=5, block_size=4, padding=PaddingInfo())
    ka, kb, va, vb = (torch.randn(2, 3, 23, 16) for _ in range(4))
    store.update(0, ka, va)
    store.update(1, kb, vb)
    assert store.merged_length == 16
    slerp_store = GroupStore(
        MergeGroup((0, 1), average_settings(method="slerp"), average_settings(method="slerp")),
        residual_length=5, block_size=4, padding=PaddingInfo(),
    )
    slerp_store.update(0, ka, va)
    slerp_store.update(1, kb, vb)
    for c, (a, b) in enumerate(((ka, kb), (va, vb))):
        index = store.kernel_views(0)[c].retained_index.long()
        # Same retention as SLERP on the same data (same distances, same rule).
        assert torch.equal(index, slerp_store.kernel_views(0)[c].retained_index.long())
        retained = torch.zeros(2, 3, 16, dtype=torch.bool)
        retained[index[:, 0], index[:, 1], index[:, 2]] = True
        assert retained[:, :, 0].all(), "the sink token is always retained"
        mean = reference_average([a[..., :16, :], b[..., :16, :]], [0.5, 0.5]).float()
        for member, exact in enumerate((a, b)):
            restored = store.kernel_views(member)[c].materialize()
            torch.testing.assert_close(restored[..., :16, :][retained], exact[..., :16, :][retained], rtol=0, atol=0)
            torch.testing.assert_close(restored[..., :16, :][~retained], mean[~retained], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(restored[..., 16:, :], exact[..., 16:, :], rtol=0, atol=0)


def make_model(**overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **overrides)).eval()


def average_profile(groups=((0, 1), (2, 3)), **defaults) -> MergeProfile:
    d = Defaults(**{"residual_length": 8, "block_size": 4, "gamma": 0.1, **defaults})
    settings = d.settings("average", t=0.5)
    return MergeProfile(groups=tuple(MergeGroup(g, settings, settings) for g in groups), defaults=d)


def test_average_groups_generate_and_account_memory_honestly():
    model = make_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    cache = MiniCache(average_profile(), model)
    out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=9, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 49)
    report = cache.memory_report()
    held = sum(t.numel() * t.element_size() for t in cache.tensors())
    assert report["kv_bytes"] == held
    dynamic = DynamicCache(config=model.config)
    model.generate(input_ids=ids, attention_mask=mask, cache=dynamic, max_new_tokens=9, do_sample=False,
                   pad_token_id=0)
    assert report["kv_bytes_full"] == sum(
        t.numel() * t.element_size() for layer in dynamic.layers for t in (layer.keys, layer.values)
    )


def test_average_memory_layout_known_bytes():
    # No retention, no sink, no residual window: every token is one direction [D] + k magnitudes.
    model = make_model()
    profile = average_profile(groups=((0, 1),), gamma=0.0, sink_tokens=0, residual_length=0)
    cache = MiniCache(profile, model)
    b, n = 3, 16
    ids = torch.randint(3, model.config.vocab_size, (b, n), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache)
    h, d, layers = model.config.num_key_value_heads, model.config.head_dim, model.config.num_hidden_layers
    report = cache.memory_report()
    assert report["groups"][0]["merged_tokens"] == n
    per_layer = 2 * b * h * n * d * 4  # keys + values, float32
    merged = 2 * b * h * n * (d + 2) * 4  # one shared direction + 2 float32 magnitudes, keys + values
    assert report["kv_bytes_full"] == layers * per_layer
    assert report["kv_bytes"] == (layers - 2) * per_layer + merged + 2 * 0  # + no retained tokens
    assert report["compression_ratio"] == pytest.approx(layers * d / ((layers - 2) * d + (d + 2)))


def test_merge_kernel_falls_back_to_torch_for_average_groups(monkeypatch):
    # A stand-in kernel module that fails if called: averaged groups must never reach it, and the
    # result must be the torch path's, bit for bit (the real kernel only does SLERP).
    def fail(*args, **kwargs):
        raise AssertionError("the Triton merge kernel was called for an averaged group")

    fake = types.ModuleType("minicache.runtime.kernels.merge")
    fake.merge_block = fail
    monkeypatch.setitem(sys.modules, "minicache.runtime.kernels.merge", fake)
    model = make_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    outs = []
    for kernel in (False, True):
        cache = MiniCache(average_profile(), model)
        cache.use_kernels(merge=kernel)
        outs.append(
            model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
        )
        assert cache.memory_report()["groups"][0]["merged_tokens"] > 0
    assert torch.equal(outs[0], outs[1])
    # A SLERP pair does reach the (stand-in) kernel: the switch itself works.
    slerp = MergeSettings.create(t=0.5, gamma=0.1)
    profile = MergeProfile(groups=(MergeGroup((0, 1), slerp, slerp),), defaults=Defaults(residual_length=8,
                                                                                        block_size=4))
    cache = MiniCache(profile, model)
    cache.use_kernels(merge=True)
    with pytest.raises(AssertionError, match="Triton merge kernel was called"):
        model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
