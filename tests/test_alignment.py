"""Issue 7: calibrated orthogonal alignment between layers, groups of k > 2 layers, the tensors sidecar."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from minicache import MergeProfile, MiniCache
from minicache.methods.alignment import CrossCovariance, fit_rotations
from minicache.methods.base import tensor_name
from minicache.methods.geometry import rotate
from minicache.methods.slerp import merge_group, restore, slerp_pair
from minicache.profile import Defaults, MergeGroup, MergeSettings, ProfileError
from minicache.sidecar import ProfileTensors
from tests.alignment_helpers import aligned_profile, random_rotations
from tests.test_cache import greedy, left_padded_batch, sum_of_storages
from tests.tiny_configs import tiny_config


def _tiny(arch="llama", layers=6):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_hidden_layers=layers)).eval()


# ---- merge math ------------------------------------------------------------------------------------
def test_identity_rotation_reproduces_the_unaligned_merge_exactly():
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2, 3, 20, 16, generator=g), torch.randn(2, 3, 20, 16, generator=g)
    eye = torch.eye(16).expand(2, 3, 16, 16).contiguous()
    for t in (0.0, 0.6, 1.0):
        plain = slerp_pair(x_a, x_b, t)
        grouped = merge_group([x_a, x_b], t)
        aligned = merge_group([x_a, x_b], t, rotations=eye)
        for got in (grouped, aligned):
            assert torch.equal(got.direction, plain.direction)
            assert torch.equal(got.magnitudes, plain.magnitudes)
            assert torch.equal(got.distance, plain.distance)
        for m in range(2):
            assert torch.equal(
                restore(plain.direction, plain.magnitudes[..., m], rotation=eye[m]),
                restore(plain.direction, plain.magnitudes[..., m]),
            )


def test_rotation_round_trip_and_aligned_restore():
    rot = random_rotations(2, 3, 16, seed=1, identity_last=False)
    x = torch.randn(2, 3, 5, 16)
    from minicache.methods.geometry import rotate_back

    torch.testing.assert_close(rotate_back(rotate(x, rot[0]), rot[0]), x, atol=1e-5, rtol=1e-5)
    # A layer that is an exact rotation of another (times a scale) merges losslessly once aligned.
    x_b = rotate(x, rot[0]) * 1.7
    merged = merge_group([x, x_b], 0.6, rotations=torch.stack([rot[0], torch.eye(16).expand(3, 16, 16)]))
    assert merged.distance.max() < 1e-3
    torch.testing.assert_close(
        restore(merged.direction, merged.magnitudes[..., 0], rotation=rot[0]), x, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        restore(merged.direction, merged.magnitudes[..., 1]), x_b, atol=1e-4, rtol=1e-4
    )


def test_three_layer_merge_weights_distance_and_lossless_case():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 2, 30, 8, generator=g) for _ in range(3)]
    out = merge_group(xs)
    assert out.magnitudes.shape == (1, 2, 30, 3)
    assert torch.allclose(out.direction.norm(dim=-1), torch.ones(1, 2, 30), atol=1e-5)
    # distance: the largest pairwise angle
    from minicache.methods.geometry import angle_between, unit_and_norm

    us = [unit_and_norm(x)[0] for x in xs]
    widest = torch.stack([angle_between(us[i], us[j]) for i, j in ((0, 1), (0, 2), (1, 2))]).amax(0)
    torch.testing.assert_close(out.distance, widest / torch.pi)
    # weights (1, 0, 0) give the first layer's direction, (0, 0, 1) the last
    for w, i in (((1.0, 0.0, 0.0), 0), ((0.0, 0.0, 1.0), 2)):
        got = merge_group(xs, weights=w)
        torch.testing.assert_close(got.direction, us[i], atol=1e-5, rtol=1e-5)
    # the same direction in every layer: lossless whatever the scales
    same = [xs[0], 2 * xs[0], 0.5 * xs[0]]
    m = merge_group(same)
    for i in range(3):
        torch.testing.assert_close(restore(m.direction, m.magnitudes[..., i]), same[i], atol=1e-5, rtol=1e-5)
    # uniform weights sit between the members: no member is closer than the mean direction to all
    assert (out.direction * us[1]).sum(-1).mean() > 0


def test_a_known_rotation_between_layers_is_recovered():
    g = torch.Generator().manual_seed(3)
    heads, dim = 2, 16
    q = random_rotations(3, heads, dim, seed=7, identity_last=False)
    base_k = torch.randn(4, heads, 200, dim, generator=g)
    base_v = torch.randn(4, heads, 200, dim, generator=g)
    # layer 1 = layer 0 rotated by q[0] (+ noise); layer 2 = layer 1 rotated by q[1]
    noise = lambda x: x + 0.05 * torch.randn(x.shape, generator=g)  # noqa: E731
    k1, v1 = noise(rotate(base_k, q[0])), noise(rotate(base_v, q[0]))
    k2, v2 = noise(rotate(k1, q[1])), noise(rotate(v1, q[1]))
    cov = CrossCovariance(3, heads, dim, max_offset=2)
    cov.add([(base_k, base_v), (k1, v1), (k2, v2)], sink_tokens=1)
    r = fit_rotations(cov, (0, 1), 0)
    assert torch.allclose(r[1], torch.eye(dim).expand(heads, dim, dim)), "the deeper layer is the reference"
    assert (r[0] - q[0]).abs().max() < 0.05, "Procrustes recovers the rotation"
    assert cov.aligned_cosine((0, 1), 0, r).min() > 0.98
    assert cov.aligned_cosine((0, 1), 0, torch.eye(dim).expand(2, heads, dim, dim)).abs().max() < 0.2
    # merging in the aligned frame is nearly lossless; without alignment it is not
    aligned = merge_group([base_k, k1], 0.5, rotations=r)
    plain = merge_group([base_k, k1], 0.5)

    def err(m, rot):
        return (restore(m.direction, m.magnitudes[..., 0], rotation=rot) - base_k).norm() / base_k.norm()

    assert err(aligned, r[0]) < 0.05 < 0.5 < err(plain, None)
    # a three-layer group: every member aligned to the last
    r3 = fit_rotations(cov, (0, 1, 2), 1)
    assert cov.aligned_cosine((0, 1, 2), 1, r3).min() > 0.97
    three = merge_group([base_v, v1, v2], rotations=r3)
    for i, x in enumerate((base_v, v1, v2)):
        rel = (restore(three.direction, three.magnitudes[..., i], rotation=r3[i]) - x).norm() / x.norm()
        assert rel < 0.06


def test_capture_fits_on_every_window_and_measures_on_the_second_half():
    from minicache.calibrate.capture import CalibrationCapture, prefill_batches
    from minicache.methods import get_method
    from minicache.methods.slerp import T_GRID

    model = _tiny(layers=4)
    windows = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    slerp = get_method("slerp")
    runs = [(0, 1), (1, 2, 3)]
    cap = CalibrationCapture([slerp], runs, fit=True, num_layers=4, num_heads=2, head_dim=16, max_offset=2,
                             gamma=0.0, window=8)
    kvs = []
    for batch, num_batches, kv in prefill_batches(model, windows, batch_size=2, progress=False):
        cap.add(kv, batch, num_batches)
        kvs.append(kv)
    cross = cap.fit_statistics["alignment"]
    assert float(cross.tokens) == 4 * 47
    errors = cap.errors
    assert errors is not None and errors.sums[(0, 1), "keys"]["tokens"].sum() == 2 * 47 * 2  # second batch only
    options = errors.options[(0, 1), "keys"]
    assert [o.params.t for o in options] == list(T_GRID) * 2, "every t, unaligned then aligned"
    assert [o.params.align for o in options] == [False] * len(T_GRID) + [True] * len(T_GRID)
    assert len(errors.options[(1, 2, 3), "values"]) == 2, "larger groups: uniform weights, aligned or not"
    for key in errors.options:
        err = errors.relative_error(*key)
        assert err.shape == (len(errors.options[key]),) and torch.isfinite(err).all()
    # Shipped tensors are refitted on every window; the measured ones saw the first batch only.
    shipped = cap.fitted(slerp, (0, 1))["keys"]["rotation"]
    assert not torch.equal(shipped, options[-1].tensors["rotation"])
    # In-sample, alignment never restores worse than no alignment (gamma 0, t 0.5).
    from minicache.calibrate.capture import Option, RestoreErrors

    t5 = T_GRID.index(0.5)
    in_sample = RestoreErrors(
        {((0, 1), "keys"): [Option(slerp, options[t5].params),
                            Option(slerp, options[len(T_GRID) + t5].params, {"rotation": shipped})]},
        2, gamma=0.0, window=8,
    )
    for kv in kvs:
        in_sample.add(kv)
    err = in_sample.relative_error((0, 1), "keys")
    assert err[1] <= err[0]


# ---- runtime: aligned and k-layer groups through generate ---------------------------------------------
@pytest.mark.parametrize("groups", [((1, 2),), ((0, 1, 2), (3, 4))])
def test_aligned_groups_generate_and_memory_report_is_a_walk(groups):
    model = _tiny()
    heads, dim = (
        model.config.num_key_value_heads,
        model.config.hidden_size // model.config.num_attention_heads,
    )
    profile = aligned_profile(groups, heads, dim, seed=4)
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 31])
    cache = MiniCache(profile, model)
    want = greedy(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    out = greedy(model, ids, mask, cache, new_tokens=10)
    assert torch.equal(out[:, : want.shape[1]], want)
    report = cache.memory_report()
    assert report["kv_bytes"] == sum_of_storages(cache)
    assert report["parts"]["alignment"] == sum(2 * len(g) * heads * dim * dim * 4 for g in groups)
    # The rotations are a fixed cost per group (counted); at this tiny length they outweigh the saving.
    assert report["kv_bytes"] - report["parts"]["alignment"] < report["kv_bytes_full"]


def test_aligned_store_restores_through_the_transpose():
    """The cache's restored layers equal merge_group + restore with the profile's rotations."""
    model = _tiny(layers=4)
    heads, dim = 2, 16
    profile = aligned_profile(((0, 1, 2),), heads, dim, seed=9)
    cache = MiniCache(profile, model)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, heads, 21, dim, generator=g) for _ in range(3)]
    for layer, x in enumerate(xs):
        cache.update(x, x.flip(-1), layer)
    keys, _ = cache.views(0)
    n = keys.merged_length
    assert n == 12
    rot = profile.tensors_of(profile.groups[0], "keys")["rotation"]
    merged = merge_group([x[..., :n, :] for x in xs], rotations=rot)
    index = keys.retained_index.long()
    for member in range(3):
        view, _ = cache.views(member)
        got = view.materialize()[..., :n, :]
        want = restore(merged.direction, merged.magnitudes[..., member], rotation=rot[member])
        want[index[:, 0], index[:, 1], index[:, 2]] = xs[member][index[:, 0], index[:, 1], index[:, 2]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- profile + sidecar ------------------------------------------------------------------------------
def _saved_profile(tmp_path, groups=((1, 2),)):
    model = _tiny()
    profile = aligned_profile(groups, 2, 16, seed=1)
    profile = MergeProfile(
        groups=profile.groups,
        defaults=profile.defaults,
        tensors=profile.tensors,
        model=__import__("minicache.profile").profile.ModelFingerprint.from_config(model.config),
    )
    path = profile.save(tmp_path)
    return model, profile, path


def _sidecar(directory, stem="minicache_config"):
    (found,) = directory.glob(f"{stem}.*.tensors")
    return found


def test_profile_and_sidecar_round_trip(tmp_path):
    model, profile, path = _saved_profile(tmp_path, ((0, 1, 2), (3, 4)))
    sidecar = _sidecar(tmp_path)
    digest = __import__("hashlib").sha256(sidecar.read_bytes()).hexdigest()
    assert sidecar.name == f"minicache_config.{digest[:16]}.tensors", "named after its own content"
    assert not list(tmp_path.glob("*.safetensors")), "weight loaders pick up *.safetensors: never written"
    text = path.read_text()
    assert "align: true" in text and sidecar.name in text
    loaded = MergeProfile.load(tmp_path)
    assert loaded == profile and loaded.tensors == profile.tensors
    loaded.check_model(model.config)
    # saving the same profile again writes the same bytes (hash recorded in the YAML stays valid)
    again = tmp_path / "again"
    profile.save(again)
    assert _sidecar(again).read_bytes() == sidecar.read_bytes() and _sidecar(again).name == sidecar.name
    with pytest.raises(FileExistsError):
        profile.save(tmp_path)
    # another profile name in the same directory gets its own sidecar
    other = profile.save(tmp_path / "other.yaml")
    assert _sidecar(tmp_path, "other").read_bytes() == sidecar.read_bytes()
    assert MergeProfile.load(other) == profile


def test_overwriting_replaces_the_sidecar_with_the_profile(tmp_path, monkeypatch):
    _, profile, _ = _saved_profile(tmp_path)
    old = _sidecar(tmp_path)
    newer = aligned_profile(((1, 2),), 2, 16, seed=3)
    newer = MergeProfile(groups=newer.groups, defaults=newer.defaults, tensors=newer.tensors, model=profile.model)
    # Interrupted after the new sidecar, before the YAML: the old profile still loads with its own sidecar.
    from minicache import profile as profile_mod

    real = profile_mod.atomic_write

    def crash_on_yaml(target, data, overwrite):
        if str(target).endswith(".yaml"):
            raise KeyboardInterrupt
        real(target, data, overwrite)

    monkeypatch.setattr(profile_mod, "atomic_write", crash_on_yaml)
    with pytest.raises(KeyboardInterrupt):
        newer.save(tmp_path, overwrite=True)
    monkeypatch.undo()
    assert MergeProfile.load(tmp_path) == profile and old.is_file()
    # Completed: the new pair, and the old sidecar is gone.
    newer.save(tmp_path, overwrite=True)
    assert MergeProfile.load(tmp_path) == newer
    assert not old.exists() and len(list(tmp_path.glob("*.tensors"))) == 1


def test_format_1_sidecar_name_still_loads(tmp_path):
    _, profile, path = _saved_profile(tmp_path)
    sidecar = _sidecar(tmp_path)
    legacy = tmp_path / "minicache_tensors.safetensors"
    sidecar.rename(legacy)
    path.write_text(path.read_text().replace(sidecar.name, legacy.name))
    assert MergeProfile.load(tmp_path) == profile


def test_missing_sidecar_is_a_clear_error(tmp_path):
    _, _, path = _saved_profile(tmp_path)
    _sidecar(tmp_path).unlink()
    with pytest.raises(ProfileError, match="does not exist") as err:
        MergeProfile.load(tmp_path)
    assert "tensors.file" in str(err.value)
    # align: true with no sidecar named at all
    text = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("tensors:"))
    with pytest.raises(
        ProfileError, match=r"groups\[0\]\.keys: slerp needs the tensor 'rotation\.1-2\.keys', but no tensors sidecar"
    ):
        MergeProfile.from_yaml(text)


def test_sidecar_from_another_profile_is_refused(tmp_path):
    _saved_profile(tmp_path)
    other = aligned_profile(((1, 2),), 2, 16, seed=2)
    _sidecar(tmp_path).write_bytes(other.tensors.to_bytes())
    with pytest.raises(ProfileError, match="does not belong to this profile"):
        MergeProfile.load(tmp_path)


def _with_tensor(profile: MergeProfile, name: str, tensor: torch.Tensor, model=None) -> MergeProfile:
    tensors = {n: profile.tensors[n] for n in profile.tensors.names()}
    tensors[name] = tensor
    return MergeProfile(
        groups=profile.groups, defaults=profile.defaults, model=profile.model, tensors=ProfileTensors(tensors)
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("dtype", "dtype float16; allowed: float32"),
        ("members", r"shape \[3, 2, 16, 16\]; allowed: \[2, 2, 16, 16\]"),
        ("heads", r"shape \[2, 3, 16, 16\]; allowed: \[2, 2, 16, 16\]"),
        ("not_orthogonal", "not orthogonal"),
        ("nan", "non-finite"),
        ("extra", "which no group uses"),
    ],
)
def test_sidecar_validation(tmp_path, case, match):
    _, profile, _ = _saved_profile(tmp_path)
    name = tensor_name("rotation", "1-2", "keys")
    good = profile.tensors[name]
    bad = {
        "dtype": good.half(),
        "members": random_rotations(3, 2, 16),
        "heads": random_rotations(2, 3, 16),
        "not_orthogonal": good * 1.01,
        "nan": good.clone().fill_(float("nan")),
        "extra": None,
    }[case]
    with pytest.raises(ProfileError, match=match):
        if case == "extra":
            _with_tensor(profile, tensor_name("rotation", "3-4", "keys"), good)
        else:
            _with_tensor(profile, name, bad)
    # the same checks run on load: write a bad sidecar whose hash the YAML records
    if case not in ("extra",):
        tensors = ProfileTensors(
            {n: (bad if n == name else profile.tensors[n]) for n in profile.tensors.names()}
        )
        blob = tensors.to_bytes()
        _sidecar(tmp_path).write_bytes(blob)
        text = (tmp_path / "minicache_config.yaml").read_text()
        import hashlib
        import re

        text = re.sub(r"sha256: [0-9a-f]{64}}", f"sha256: {hashlib.sha256(blob).hexdigest()}}}", text)
        (tmp_path / "minicache_config.yaml").write_text(text)
        with pytest.raises(ProfileError, match=match):
            MergeProfile.load(tmp_path)


def test_sidecar_is_never_unpickled(tmp_path):
    _, _, _ = _saved_profile(tmp_path)
    import pickle

    payload = pickle.dumps({"x": 1})
    _sidecar(tmp_path).write_bytes(payload)
    text = (tmp_path / "minicache_config.yaml").read_text()
    import hashlib
    import re

    text = re.sub(r"sha256: [0-9a-f]{64}}", f"sha256: {hashlib.sha256(payload).hexdigest()}}}", text)
    (tmp_path / "minicache_config.yaml").write_text(text)
    with pytest.raises(ProfileError, match="not a valid safetensors file"):
        MergeProfile.load(tmp_path)


def test_rotation_shape_is_checked_against_the_model():
    model = _tiny()
    profile = aligned_profile(((1, 2),), 2, 16)  # no fingerprint: shapes checked by check_model / MiniCache
    MiniCache(profile, model)
    wrong = aligned_profile(((1, 2),), 2, 8)
    with pytest.raises(ProfileError, match=r"allowed: \[2, 2, 16, 16\]"):
        MiniCache(wrong, model)


def test_weights_settings_validation():
    s = MergeSettings.create(weights=(0.2, 0.3, 0.5))
    MergeGroup((0, 1, 2), s, s)
    with pytest.raises(ProfileError, match="one weight per layer"):
        MergeGroup((0, 1, 2, 3), s, s)
    with pytest.raises(ProfileError, match="t for pairs"):
        MergeGroup((0, 1), MergeSettings.create(weights=(0.5, 0.5)), MergeSettings.create())
    with pytest.raises(ProfileError, match="sums to"):
        MergeSettings.create(weights=(0.5, 0.6, 0.1))
    with pytest.raises(ProfileError, match="true or false"):
        MergeSettings.create(align="yes")
    text = MergeProfile(groups=(MergeGroup((0, 1, 2), s, MergeSettings.create()),), defaults=Defaults()).to_yaml()
    assert "weights: [0.2, 0.3, 0.5]" in text
    assert MergeProfile.from_yaml(text).groups[0].keys.params.weights == (0.2, 0.3, 0.5)
    assert dataclasses.asdict(MergeSettings.create().params)["align"] is False


# -- group search on synthetic measurements ------------------------------------------------------
def _fake_result(damage: float, saved_layers: int):
    from minicache.evaluate.quality import QualityResult

    return QualityResult(
        ppl_full=10.0, ppl=10.0 * (1 + damage), ppl_increase=damage, kl_mean=damage, kl_q95=damage,
        top1_agreement=1 - damage, kv_bytes_full=3000, kv_bytes=3000 - 50 * saved_layers,
        compression_ratio=3000 / (3000 - 50 * saved_layers), tokens_scored=2, windows=2, prefix_length=1,
        continuation_length=1, ppl_increase_ci95=(0.99 * damage, 1.01 * damage),
        kl_mean_ci95=(0.99 * damage, 1.01 * damage),  # narrow: as sure as a point estimate
    )


INTERACTION = 0.6


def test_search_stays_within_budget_extends_greedily_and_measures_little():
    from minicache.calibrate.capture import candidate_runs
    from minicache.calibrate.search import Budget, Candidate, search
    from minicache.profile import MergeProfile

    layers = 12
    s = MergeSettings.create()
    # Deeper groups restore better (smaller error) and so hurt less.
    damage_of, candidates = {}, {}
    for run in candidate_runs(layers, 3):
        depth = run[0] / layers
        err = 0.5 * (1.2 - depth) * (len(run) - 1)
        candidates[run] = Candidate(run, s, s, (err, err), len(run) - 1)
        damage_of[run] = 0.004 * (1.2 - depth) ** 3 * (len(run) - 1)

    calls = []

    def evaluate(profile: MergeProfile):
        groups = [g.layers for g in profile.groups]
        calls.append(groups)
        # Groups together hurt less than the sum of their single measurements (as seen on SmolLM2),
        # so a selection by predicted sums leaves room that only measured extensions find.
        damage = sum(damage_of[g] for g in groups) * (INTERACTION if len(groups) > 1 else 1.0)
        return _fake_result(damage, sum(len(g) - 1 for g in groups))

    budget = Budget("ppl_increase", 0.01)
    result = search(
        candidates, evaluate, budget, layers,
        make_profile=lambda groups: MergeProfile(groups=groups), probes=4, log=lambda _: None,
    )
    chosen = [c.layers for c in result.chosen]
    assert chosen, "something fits this budget"
    used = [layer for g in chosen for layer in g]
    assert len(used) == len(set(used)), "groups never overlap"
    assert result.final is not None and budget.fits(result.final)
    expected = sum(damage_of[g] for g in chosen) * (INTERACTION if len(chosen) > 1 else 1)
    assert result.final.ppl_increase == pytest.approx(expected)
    assert len(calls) <= 4 + 4 + 6  # probes + verifications + extensions
    assert len({tuple(sorted(c)) for c in calls}) == len(calls), "no set of groups is measured twice"
    extended = [s for s in result.steps if s.kind == "extend"]
    assert extended, "the search tries to grow the verified set"
    assert any(budget.fits(s.result) for s in extended), "in this setting an extension fits"
    # No single measured extension that fitted was thrown away: the final set is the last fitting one.
    fitting = [s for s in result.steps if s.kind == "extend" and budget.fits(s.result)]
    if fitting:
        assert tuple(sorted(chosen)) == fitting[-1].groups
