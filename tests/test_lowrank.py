"""The low-rank method: a calibrated basis shared by a group's layers (``minicache.methods.lowrank``)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minicache import MergeProfile, MiniCache
from minicache.calibrate.api import calibrate
from minicache.calibrate.search import Budget
from minicache.evaluate.quality import evaluate_profile
from minicache.methods import get_method
from minicache.methods.lowrank import LowRankParams, SecondMoments, fit_bases
from minicache.profile import Defaults, MergeGroup, ProfileError, Quantization
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention
from tests.tiny_configs import tiny_config

LOWRANK = get_method("lowrank")


def _model(arch: str = "llama", layers: int = 6):
    torch.manual_seed(0)
    extra = {"sliding_window": None} if arch == "mistral" else {}  # full attention (see tests/test_cache.py)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_hidden_layers=layers, **extra)).eval()


def _windows(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _kv(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _fitted(model, layers, ids) -> dict:
    kv = _kv(model, ids)
    h, d = kv[0][0].shape[1], kv[0][0].shape[-1]
    stat = SecondMoments(len(kv), h, d, max_offset=len(layers) - 1)
    stat.add(kv, sink_tokens=1)
    return fit_bases(stat, tuple(layers))


def _profile(model, groups, rank=4, heads="joint", defaults=None, ids=None) -> MergeProfile:
    d = defaults or Defaults(residual_length=8, block_size=4, gamma=0.05)
    ids = _windows(4, 64, seed=11) if ids is None else ids
    out, tensors = [], {}
    for layers in groups:
        settings = d.settings("lowrank", rank=rank, heads=heads)
        group = MergeGroup(tuple(layers), settings, settings)
        for name, fitted in _fitted(model, layers, ids).items():
            for local, t in LOWRANK.tensors_for(settings.params, fitted).items():
                tensors[f"{local}.{group.label}.{name}"] = t
        out.append(group)
    return MergeProfile(groups=tuple(out), defaults=d, tensors=tensors)


def test_second_moments_match_a_direct_covariance():
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 10, 4, generator=g)) for _ in range(4)]
    stat = SecondMoments(4, 3, 4, max_offset=2)
    stat.add(kv[:], sink_tokens=1)
    mean, cov = stat.covariance((1, 2, 3), 1)
    x = torch.cat([kv[layer][1][..., 1:, :].permute(0, 2, 1, 3).reshape(-1, 12) for layer in (1, 2, 3)], -1).double()
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(cov, torch.cov(x.T, correction=0))
    with pytest.raises(ValueError, match="spans more"):
        stat.covariance((0, 1, 2, 3), 0)


@pytest.mark.parametrize("heads", ["joint", "each"])
def test_projection_restores_exactly_at_full_rank_and_error_matches_the_spectrum(heads):
    model = _model()
    ids = _windows(2, 48, seed=1)
    kv = _kv(model, ids)
    h, d = kv[0][0].shape[1], kv[0][0].shape[-1]
    fitted = _fitted(model, (2, 3), ids)["keys"]
    xs = [kv[2][0][..., 1:, :], kv[3][0][..., 1:, :]]
    full = LowRankParams(rank=2 * d, heads=heads)
    tensors = LOWRANK.tensors_for(full, fitted)
    encoded = LOWRANK.encode(full, xs, tensors)
    for member, x in enumerate(xs):
        torch.testing.assert_close(LOWRANK.decode(full, encoded.fields, member, tensors, torch.float32), x,
                                   rtol=1e-4, atol=1e-4)
    # In sample, the restore error at rank r is the variance beyond r (the spectrum's tail).
    rank = 3
    params = LowRankParams(rank=rank, heads=heads)
    tensors = LOWRANK.tensors_for(params, fitted)
    distance, err = LOWRANK.restore_error(params, xs, tensors)
    spectrum = fitted[f"spectrum_{heads}"].double()
    tail = spectrum[rank * h:].sum() if heads == "joint" else spectrum[:, rank:].sum()
    torch.testing.assert_close(err.sum() / (xs[0].shape[0] * xs[0].shape[2]), tail, rtol=1e-3, atol=1e-6)
    assert distance.shape == xs[0].shape[:3] and float(distance.min()) >= 0 and float(distance.max()) <= 1
    # the coefficients field: rank per token and KV head
    assert encoded.fields["coefficients"].shape[-1] == 2 * d
    assert LOWRANK.encode(params, xs, tensors).fields["coefficients"].shape == (*xs[0].shape[:3], rank)


def test_profile_validates_lowrank_tensors_and_allows_single_layers(tmp_path):
    model = _model()
    profile = _profile(model, [(1,), (3, 4)], rank=4)
    path = profile.save(tmp_path / "p")
    text = path.read_text()
    assert "method: lowrank" in text and "rank: 4" in text
    loaded = MergeProfile.load(path)
    assert loaded == profile
    data = profile.to_dict()
    # slerp still needs two layers
    bad = {"format_version": 2, "groups": [{"layers": [1], "keys": {"method": "slerp"}}]}
    with pytest.raises(ProfileError, match=r"groups\[0\]\.layers: \[1\] has fewer than 2 layers"):
        MergeProfile.from_dict(bad)
    # a basis that is not orthonormal, or of the wrong shape, is refused naming the tensor
    tensors = {n: profile.tensors[n] for n in profile.tensors.names()}
    tensors["basis.3-4.keys"] = tensors["basis.3-4.keys"] * 2
    with pytest.raises(ProfileError, match="orthonormal"):
        MergeProfile.from_dict(data, tensors=tensors).check_model(model.config)
    tensors["basis.3-4.keys"] = profile.tensors["basis.3-4.keys"][..., :3]
    with pytest.raises(ProfileError, match="shape"):
        MergeProfile.from_dict(data, tensors=tensors).check_model(model.config)


def test_cache_stores_coefficients_and_counts_them_byte_for_byte():
    model = _model()
    profile = _profile(model, [(1,), (3, 4)], rank=4)
    ids = _windows(2, 40, seed=3)
    cache = MiniCache(profile, model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    report = cache.memory_report()
    assert report["kv_bytes"] == sum(t.numel() * t.element_size() for t in cache.tensors())
    assert report["parts"]["coefficients"] > 0 and report["parts"]["bases"] > 0
    merged = report["groups"][0]["merged_tokens"]
    h = model.config.num_key_value_heads
    groups, components, batch, rank, fp32 = 2, 2, 2, 4, 4
    assert report["parts"]["coefficients"] == groups * components * batch * h * merged * rank * fp32


def test_a_half_precision_cache_holds_the_bases_in_its_dtype_once():
    """A bfloat16 cache holds a low-rank group's basis and mean in bfloat16 (half the bytes, counted so),
    one copy shared by every cache and padded-batch row of the profile; the profile keeps float32, and
    a restore moves by no more than bfloat16 rounding."""
    import copy

    from tests.test_cache import greedy, left_padded_batch

    model = _model()
    profile = _profile(model, [(1,), (3, 4)], rank=4)
    ids = _windows(2, 40, seed=3)
    full = MiniCache(profile, model)
    half_model = copy.deepcopy(model).to(torch.bfloat16)
    halves = [MiniCache(profile, half_model) for _ in range(2)]
    with torch.no_grad():
        for cache, m in ((full, model), *((c, half_model) for c in halves)):
            m(input_ids=ids, cache=cache)
    held = [[c.tensors for s in cache.stores for c in s.components.values()] for cache in (full, *halves)]
    assert all(t.dtype == torch.float32 for tensors in held[0] for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for tensors in held[1] for t in tensors.values())
    assert all(a[name] is b[name] for a, b in zip(held[1], held[2], strict=True) for name in a)
    assert all(profile.tensors[n].dtype == torch.float32 for n in profile.tensors.names())
    r32, r16 = full.memory_report(), halves[0].memory_report()
    assert r16["parts"]["bases"] * 2 == r32["parts"]["bases"] > 0
    assert r16["kv_bytes"] == sum(t.numel() * t.element_size() for t in halves[0].tensors())

    comp = halves[0].stores[1].components["values"]
    fields = {name: series.snapshot().dense for name, series in comp.fields.items()}
    float32 = profile.tensors_of(profile.groups[1], "values")
    for member in range(2):
        want = LOWRANK.decode(comp.params, fields, member, float32, torch.float32)
        got = LOWRANK.decode(comp.params, fields, member, comp.tensors, torch.float32)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))

    # a left-padded batch stores one cache per row, beam search copies rows: one held copy throughout
    batch_ids, mask = left_padded_batch(model.config.vocab_size, [30, 21], seed=2)
    beams = MiniCache(profile, half_model)
    greedy(half_model, batch_ids, mask, beams, new_tokens=4, num_beams=2)
    assert beams.rows is not None and len(beams.rows.rows) == 4
    bases = {id(row.stores[0].components["keys"].tensors["basis"]) for row in beams.rows.rows}
    assert bases == {id(held[1][0]["basis"])}


#: Storage the generation paths are compared under unless told otherwise: unquantized, and 4-bit.
PATH_QUANTIZATIONS = (None, Quantization(bits=4, group_size=8, residual_length=8))


def greedy_with_scores(model, ids: torch.Tensor, cache):
    """8 greedy tokens after ``ids`` with their scores (``cache`` None: the model's own cache)."""
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=8,
                          do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def assert_generation_paths_agree(model, profile: MergeProfile, ids: torch.Tensor,
                                  quantizations=PATH_QUANTIZATIONS) -> list:
    """Greedy generation through the restore path and the blockwise torch path gives the same tokens and
    scores, unquantized and with 4-bit storage (whose fields must then be packed), or with each of
    ``quantizations``. Returns the restore path's generations, one per quantization."""

    def generate(cache):
        return greedy_with_scores(model, ids, cache)

    restored = []
    for quantization in quantizations:
        p = profile.with_quantization(quantization)
        want = generate(MiniCache(p, model))
        assert enable_fused_attention(model, backend="torch")
        cache = MiniCache(p, model)
        got = generate(cache)
        disable_fused_attention(model)
        assert cache.memory_report()["groups"][0]["merged_tokens"] > 0
        if quantization is not None:
            assert cache.memory_report()["parts"]["packed"] > 0, "the stored fields are packed"
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        restored.append(want)
    return restored


def calibrate_tiny(model, tmp_path, methods: tuple[str, ...], **options):
    """:func:`calibrate` on random token windows of a tiny model with a generous budget (10x perplexity)."""
    data = tmp_path / "ids.jsonl"
    stream = _windows(1, 24 * 96, seed=1)[0].tolist()
    data.write_text("".join(json.dumps({"input_ids": stream[i : i + 96]}) + "\n" for i in range(0, len(stream), 96)))

    class Tok:
        eos_token_id = 1

        def __len__(self):
            return 128

    return calibrate(
        model, Tok(), data, methods=methods, budget=Budget("ppl_increase", 10.0),
        num_samples=8, max_length=96, eval_windows=4, defaults=Defaults(residual_length=16, block_size=16),
        probes=4, max_group_size=2, progress=False, log=lambda _: None, **options,
    )


def test_generate_plain_blockwise_and_quantized_paths_agree():
    model = _model()
    profile = _profile(model, [(1,), (3, 4, 5)], rank=4, heads="joint")
    assert_generation_paths_agree(model, profile, _windows(2, 30, seed=3))


def test_calibrate_chooses_lowrank_groups_including_single_layers(tmp_path):
    model = _model()
    result = calibrate_tiny(model, tmp_path, ("slerp", "lowrank"))
    candidates = result.search.candidates.values()
    assert any(c.size == 1 for c in candidates), "single layers are candidates for lowrank"
    assert any(c.variant for c in candidates), "cheaper variants at several ranks"
    profile = result.profile
    assert profile.groups
    lowrank = [g.label for g in profile.groups if g.keys.method == "lowrank" or g.values.method == "lowrank"]
    assert lowrank and set(result.spectra) == set(lowrank)
    curve, rank = next(iter(result.spectra[lowrank[0]].values()))
    assert 0 < rank <= curve.numel() and torch.all(curve[1:] >= curve[:-1] - 1e-6) and float(curve[-1]) > 0.99
    from minicache.calibrate.report import write_report

    written = write_report(tmp_path / "report", profile, result.statistics, result.search, "ppl_increase", 10.0,
                           result.summary, spectra=result.spectra)
    text = (tmp_path / "report" / "minicache_report.md").read_text()
    assert "variance kept" in text and any(p.name == "minicache_spectra.png" for p in written)
    path = profile.save(tmp_path / "profile")
    loaded = MergeProfile.load(path)
    quality = evaluate_profile(model, _windows(4, 96, seed=7), 64, loaded)
    assert quality.compression_ratio > 1.0


@pytest.mark.parametrize("heads", ["joint", "each"])
def test_attention_reads_the_coefficients_without_restoring_and_matches_the_restored_block(heads):
    model = _model()
    d = Defaults(residual_length=8, block_size=4, gamma=0.3)  # a generous γ: retained tokens in every block
    profile = _profile(model, [(2, 3)], rank=3, heads=heads, defaults=d)
    cache = MiniCache(profile, model)
    with torch.no_grad():
        model(input_ids=_windows(2, 40, seed=5), cache=cache)
    for layer in (2, 3):
        keys, values = cache.views(layer)
        assert keys.factored and keys.retained_count > 0
        b, h, _, dim = keys.residual.shape
        g = torch.Generator().manual_seed(layer)
        q = torch.randn(b, h, 2, dim, generator=g)
        start, end = 4, keys.merged_length
        k = keys.restored_block(start, end).float()
        v = values.restored_block(start, end).float()
        torch.testing.assert_close(keys.scores_block(q, start, end), torch.einsum("bhgd,bhnd->bhgn", q, k),
                                   rtol=1e-4, atol=1e-4)
        probs = torch.rand(b, h, 2, end - start, generator=g)
        torch.testing.assert_close(values.values_block(probs, start, end), torch.einsum("bhgn,bhnd->bhgd", probs, v),
                                   rtol=1e-4, atol=1e-4)


def test_lowrank_without_fitting_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match=r"'lowrank' stores only with tensors fitted.*drop --no-align"):
        calibrate(_model(), None, tmp_path / "unused.jsonl", methods=("lowrank",), align=False,
                  progress=False, log=lambda _: None)


def test_saved_layers_and_field_width_follow_the_rank():
    params = LowRankParams(rank=16)
    assert LOWRANK.saved_layers(params, 2, 64) == pytest.approx(2 - 16 / 64)
    assert LOWRANK.stored_bytes_per_token(params, 2, 64, torch.bfloat16) == 16 * 2
    with pytest.raises(ProfileError, match="rank"):
        LowRankParams(rank=0)
    with pytest.raises(ProfileError, match="heads"):
        LowRankParams(rank=4, heads="both")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_left_padded_batch_beam_search_and_continued_cache(arch):
    """Everything the runtime supports for SLERP groups works for low-rank groups: a left-padded row
    stores and generates what it does alone, beam search reorders the store, a cache continues."""
    from tests.test_cache import greedy, left_padded_batch

    model = _model(arch)
    profile = _profile(model, [(1,), (2, 3)], rank=4, ids=_windows(4, 64, seed=11) % model.config.vocab_size)
    lengths = [46, 31]
    ids, mask = left_padded_batch(model.config.vocab_size, lengths, seed=2)
    batch_cache = MiniCache(profile, model)
    batch_out = greedy(model, ids, mask, batch_cache, new_tokens=6)
    for row, n in enumerate(lengths):
        alone = MiniCache(profile, model)
        alone_out = greedy(model, ids[row : row + 1, -n:], mask[row : row + 1, -n:], alone, new_tokens=6)
        assert torch.equal(batch_out[row, -6:], alone_out[0, -6:])
        report = alone.memory_report()
        assert report["kv_bytes"] == sum(t.numel() * t.element_size() for t in alone.tensors())
    beams = MiniCache(profile, model)
    out = greedy(model, ids, mask, beams, new_tokens=5, num_beams=2)
    assert out.shape[0] == 2
    # a continued cache: a second forward merges on (the schedule continues) and stays counted exactly
    seq = _windows(1, 48, seed=9) % model.config.vocab_size
    cache = MiniCache(profile, model)
    with torch.no_grad():
        model(input_ids=seq[:, :20], cache=cache)
        first = cache.memory_report()["groups"][1]["merged_tokens"]
        logits = model(input_ids=seq[:, 20:], cache=cache).logits
    report = cache.memory_report()
    assert report["groups"][1]["merged_tokens"] > first and torch.isfinite(logits).all()
    assert report["kv_bytes"] == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_the_shipped_lowrank_profile_loads_and_fits_smollm2(smollm2):
    from pathlib import Path

    profile = MergeProfile.load(Path(__file__).parent.parent / "profiles" / "smollm2-135m-instruct-lowrank")
    profile.check_model(smollm2[0].config)
    # the search with exact offered: layers 13 and 26 store their keys low rank beside exact values
    assert {s.method for g in profile.groups for _, s in g.components()} == {"lowrank", "exact"}
    assert profile.calibration["methods"] == ["slerp", "lowrank", "exact"]
