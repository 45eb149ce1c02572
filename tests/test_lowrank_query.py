"""Query-weighted low-rank key bases: the queries the capture sees, the fit, the profile and the runtime."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from minicache import MergeProfile
from minicache.calibrate.capture import CalibrationCapture, hooked_queries, prefill_batches
from minicache.methods import get_method
from minicache.methods.moments import SecondMoments, fit_bases
from minicache.profile import Defaults, MergeGroup, ProfileError
from tests.test_lowrank import _model, _windows, assert_generation_paths_agree, calibrate_tiny

LOWRANK = get_method("lowrank")


def _moments(model, ids, max_offset=0) -> SecondMoments:
    cfg = model.config
    stat = SecondMoments(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_offset=max_offset)
    for _, _, kv in prefill_batches(model, ids, batch_size=2, progress=False,
                                    on_queries=lambda layer, q: stat.add_queries(layer, q, 1)):
        stat.add(kv, 1)
    return stat


def test_captured_queries_are_the_post_rope_queries_and_leave_the_model_unchanged():
    model = _model()
    ids = _windows(2, 24, seed=5)
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
    seen: dict[int, torch.Tensor] = {}
    with torch.no_grad(), hooked_queries(model, lambda layer, q: seen.__setitem__(layer, q.clone())) as hooked:
        assert hooked
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, want_logits)
    assert model.config._attn_implementation != "minicache_query_capture", "the implementation comes back"
    assert sorted(seen) == list(range(model.config.num_hidden_layers))
    # layer 0's query, rebuilt by hand: q_proj of the normed embeddings, rotated at each position
    layer = model.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(model.model.embed_tokens(ids))
        b, t, _ = hidden.shape
        q = layer.self_attn.q_proj(hidden).view(b, t, -1, model.config.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(t).unsqueeze(0))
        q_post, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(seen[0], q_post)


def test_queries_count_only_with_their_batch_kv_and_sum_as_a_direct_second_moment():
    model = _model()
    ids = _windows(4, 20, seed=6)
    stat = _moments(model, ids)
    assert float(stat.query_tokens) == 4 * 19 == float(stat.tokens)
    # a prefill whose KV is not added leaves the counted queries as they were
    before = stat.queries.clone()
    for _ in prefill_batches(model, ids[:2], progress=False, on_queries=lambda layer, q: stat.add_queries(layer, q)):
        pass
    torch.testing.assert_close(stat.queries, before)
    # direct: Σ q qᵀ over the query heads reading KV head 0 of layer 2
    queries: list[torch.Tensor] = []
    with torch.no_grad(), hooked_queries(model, lambda layer, q: queries.append(q) if layer == 2 else None):
        model(input_ids=ids)
    q = queries[0][..., 1:, :].double()
    group = q.shape[1] // model.config.num_key_value_heads
    direct = torch.einsum("bgtd,bgte->de", q[:, :group], q[:, :group])
    torch.testing.assert_close(stat.queries[2, 0], direct)


@pytest.mark.parametrize("heads", ["joint", "each"])
def test_query_weighted_basis_trades_restore_error_for_logit_error(heads):
    # measured on the fit's own tokens (sinks left out), where each basis is optimal for its error
    model = _model()
    ids = _windows(4, 48, seed=7)
    stat = _moments(model, ids, max_offset=1)
    queries = {}
    with torch.no_grad(), hooked_queries(model, lambda layer, q: queries.__setitem__(layer, q[..., 1:, :])):
        kv = next(prefill_batches(model, ids, batch_size=4, progress=False))[2]
    layers = (2, 3)
    fitted = fit_bases(stat, layers)["keys"]
    assert "basis_query_joint" in fitted and "basis_query_joint" not in fit_bases(stat, layers)["values"]
    h, d = model.config.num_key_value_heads, model.config.head_dim
    xs = [kv[layer][0][..., 1:, :] for layer in layers]
    errors = {}
    for basis in ("pca", "query"):
        params = LOWRANK.params({"rank": 3, "heads": heads, "basis": basis})
        tensors = LOWRANK.tensors_for(params, fitted)
        fields = LOWRANK.encode(params, xs, tensors).fields
        plain = logit = 0.0
        for member, layer in enumerate(layers):
            diff = LOWRANK.decode(params, fields, member, tensors, torch.float32) - xs[member].float()
            q = queries[layer].float()
            g = q.shape[1] // h
            plain += float(diff.square().sum())
            logit += float(torch.einsum("bhgtd,bhnd->bhgtn", q.reshape(q.shape[0], h, g, -1, d), diff).square().sum())
        errors[basis] = (plain, logit)
    assert errors["query"][1] < errors["pca"][1], errors  # what attention sees improves
    assert errors["query"][0] >= errors["pca"][0] * 0.999, errors  # PCA is the least restore error
    # at full rank both restore exactly (the encoder undoes the decoder)
    full = LOWRANK.params({"rank": 2 * d - 1, "heads": "each", "basis": "query"})
    tensors = LOWRANK.tensors_for(full, fitted)
    assert LOWRANK.restore_error(full, xs, tensors)[1].sum() < 1e-2 * sum(float(x.square().sum()) for x in xs)


def _query_profile(model, ids) -> MergeProfile:
    d = Defaults(residual_length=8, block_size=4, gamma=0.05)
    stat = _moments(model, ids, max_offset=2)
    keys, values = d.settings("lowrank", rank=4, basis="query"), d.settings("lowrank", rank=4)
    groups, tensors = [], {}
    for layers in [(1,), (3, 4, 5)]:
        group = MergeGroup(layers, keys, values)
        fitted = fit_bases(stat, layers)
        for component, settings in (("keys", keys), ("values", values)):
            for local, t in LOWRANK.tensors_for(settings.params, fitted[component]).items():
                tensors[f"{local}.{group.label}.{component}"] = t
        groups.append(group)
    return MergeProfile(groups=tuple(groups), defaults=d, tensors=tensors)


def test_profile_carries_and_validates_the_encoder(tmp_path):
    model = _model()
    profile = _query_profile(model, _windows(4, 64, seed=11))
    assert "encoder.1-1.keys" in profile.tensors.names() and "encoder.1-1.values" not in profile.tensors.names()
    loaded = MergeProfile.load(profile.save(tmp_path / "p"))
    assert loaded == profile and "basis: query" in (tmp_path / "p" / "minicache_config.yaml").read_text()
    loaded.check_model(model.config)
    data = profile.to_dict()
    tensors = {n: profile.tensors[n] for n in profile.tensors.names()}
    bad = dict(tensors, **{"encoder.3-5.keys": tensors["encoder.3-5.keys"] * 1.5})
    with pytest.raises(ProfileError, match="biorthogonal"):
        MergeProfile.from_dict(data, tensors=bad)
    missing = {n: t for n, t in tensors.items() if n != "encoder.1-1.keys"}
    with pytest.raises(ProfileError, match=r"encoder\.1-1\.keys"):
        MergeProfile.from_dict(data, tensors=missing)


def test_generation_paths_agree_with_query_weighted_keys():
    model = _model()
    profile = _query_profile(model, _windows(4, 64, seed=11))
    assert_generation_paths_agree(model, profile, _windows(2, 30, seed=3))


def test_calibrate_with_query_bases_weights_keys_only(tmp_path, monkeypatch):
    model = _model()
    seen = []
    original = CalibrationCapture.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)
    monkeypatch.setattr(CalibrationCapture, "__init__", spy)
    result = calibrate_tiny(model, tmp_path, ("lowrank",), method_options={"lowrank_basis": "query"})
    stat = seen[0].fit_statistics["second_moments"]
    assert float(stat.query_tokens) == float(stat.tokens) > 0
    kinds = {(name, s.params.basis) for g in result.profile.groups for name, s in g.components()}
    assert kinds and kinds <= {("keys", "query"), ("values", "pca")}
    assert ("keys", "query") in kinds
    result.profile.check_model(model.config)

