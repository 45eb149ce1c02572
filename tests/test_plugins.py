"""A merge method registered from this file alone runs through calibrate → profile → MiniCache → eval.

``keep_first`` is a toy method: a group stores its first member's vectors and every member's norm;
member ``i`` is restored as ``m_i · x_0 / ‖x_0‖`` (the first member's direction, its own magnitude),
or as ``x_0`` itself with ``keep_magnitudes: false``. Nothing outside this file knows it: the
profile validates its parameters through its ``Params`` class, the cache stores and packs its fields,
attention restores them (the default path and the blockwise one), and the calibrator measures and
chooses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from minicache import MergeProfile, MiniCache
from minicache.calibrate.api import calibrate
from minicache.calibrate.search import Budget
from minicache.evaluate.quality import evaluate_profile
from minicache.methods import Encoded, Field, MergeMethod, MethodParams, register_method, unregister_method
from minicache.methods.geometry import angle_between, unit_and_norm
from minicache.profile import Defaults, MergeGroup, MergeSettings, ProfileError, Quantization
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention
from minicache.validation import check_bool
from tests.tiny_configs import tiny_config


@dataclass(frozen=True)
class KeepFirstParams(MethodParams):
    keep_magnitudes: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_magnitudes", check_bool(self.keep_magnitudes, "keep_magnitudes"))


class KeepFirst(MergeMethod):
    name = "keep_first"
    Params = KeepFirstParams
    fields = (
        Field("vector", "head_dim", dtype="model", quantize="component", part="kept_vectors"),
        Field("norm", "members", dtype="scalar", part="kept_norms"),
    )

    def encode(self, params, xs, tensors):
        units, norms = zip(*(unit_and_norm(x) for x in xs), strict=True)
        distance = torch.stack([angle_between(units[0], u) for u in units[1:]]).amax(0) / torch.pi
        return Encoded({"vector": xs[0].float(), "norm": torch.stack(norms, -1)}, distance)

    def decode(self, params, fields, member, tensors, dtype, *, in_frame=False):
        x0 = fields["vector"].float()
        if not params.keep_magnitudes or member == 0:
            return x0.to(dtype)
        unit, _ = unit_and_norm(x0)
        return (unit * fields["norm"][..., member].float().unsqueeze(-1)).to(dtype)


@pytest.fixture
def keep_first():
    register_method(KeepFirst)
    yield KeepFirst
    unregister_method("keep_first")


class TinyTokenizer:
    eos_token_id = 1

    def __len__(self) -> int:
        return 128


def _model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=6)).eval()


def _windows(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_a_method_from_a_test_file_runs_through_calibrate_profile_cache_and_eval(keep_first, tmp_path):
    model = _model()
    # 1. Profiles name it and its parameters; the method validates them.
    settings = MergeSettings.create("keep_first", keep_magnitudes=False, gamma=0.1)
    assert settings.params == KeepFirstParams(keep_magnitudes=False)
    with pytest.raises(ProfileError, match=r"^groups\[0\]\.keys\.keep_magnitudes: 'no' is a str"):
        MergeProfile.from_dict({"format_version": 2, "groups": [
            {"layers": [1, 2], "keys": {"method": "keep_first", "keep_magnitudes": "no"}}]})

    # 2. Calibrate with it (the search measures its restore error and chooses it per component).
    data = tmp_path / "ids.jsonl"
    stream = _windows(1, 24 * 96, seed=1)[0].tolist()
    data.write_text("".join(json.dumps({"input_ids": stream[i : i + 96]}) + "\n" for i in range(0, len(stream), 96)))
    defaults = Defaults(residual_length=16, block_size=16)
    result = calibrate(
        model, TinyTokenizer(), data, methods=("keep_first",), budget=Budget("ppl_increase", 10.0),
        num_samples=8, max_length=96, eval_windows=4, defaults=defaults, probes=3, max_group_size=3,
        progress=False, log=lambda _: None,
    )
    profile = result.profile
    assert profile.groups, "a random model has a generous budget: something is merged"
    assert {s.method for g in profile.groups for _, s in g.components()} == {"keep_first"}
    assert profile.calibration["methods"] == ["keep_first"]
    assert result.search.steps and result.search.candidates

    # 3. The profile file says so, and loads back.
    path = profile.save(tmp_path / "profile")
    assert "method: keep_first" in path.read_text()
    loaded = MergeProfile.load(path)
    assert loaded == profile

    # 4. The cache stores its fields (really less) and restores them; eval measures it.
    windows = _windows(4, 96, seed=7)
    quality = evaluate_profile(model, windows, 64, loaded)
    assert quality.compression_ratio > 1.0 and quality.kl_mean > 0
    cache = MiniCache(loaded, model)
    with torch.no_grad():
        model(input_ids=windows[:2, :64], cache=cache)
    report = cache.memory_report()
    assert report["parts"]["kept_vectors"] > 0 and report["parts"]["kept_norms"] > 0
    assert report["kv_bytes"] == sum(t.numel() * t.element_size() for t in cache.tensors())
    layer = loaded.groups[0].layers[1]
    keys, _ = cache.views(layer)
    assert keys.layout is None, "no kernel reads this layout: attention restores it a block at a time"


def test_the_toy_method_through_generate_quantized_and_blockwise(keep_first):
    model = _model()
    d = Defaults(residual_length=8, block_size=4, gamma=0.1)
    s = d.settings("keep_first")
    profile = MergeProfile(groups=(MergeGroup((1, 2), s, s), MergeGroup((3, 4, 5), s, s)), defaults=d)
    ids = _windows(2, 30, seed=3)

    def generate(cache):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=8,
                              do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)

    for quantization in (None, Quantization(bits=4, group_size=8, residual_length=8)):
        p = profile.with_quantization(quantization)
        want = generate(MiniCache(p, model))
        assert enable_fused_attention(model, backend="torch")
        cache = MiniCache(p, model)
        got = generate(cache)
        disable_fused_attention(model)
        assert cache.memory_report()["groups"][0]["merged_tokens"] > 0
        if quantization is not None:
            assert cache.memory_report()["parts"]["packed"] > 0, "its quantizable field is packed"
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_restore_error_default_is_the_round_trip(keep_first):
    method = KeepFirst()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 2, 5, 8, generator=g) for _ in range(2)]
    distance, err = method.restore_error(KeepFirstParams(), xs, {})
    want = (unit_and_norm(xs[0])[0] * xs[1].norm(dim=-1, keepdim=True) - xs[1]).square().sum(-1)
    torch.testing.assert_close(err.float(), want, rtol=1e-5, atol=1e-5)
    assert distance.shape == (1, 2, 5)
