"""How unmerged quantized layers store keys (issue 18): exact sink tokens (``Quantization.sink_tokens``)
and keys packed before RoPE (``Quantization.pre_rope_keys``, :mod:`minicache.runtime.rope`)."""

import pytest
import torch

from minicache import MergeProfile, MiniCache
from minicache.evaluate.compare import parse_storage
from minicache.profile import ProfileError, Quantization
from minicache.runtime.layers import QuantizedLayer
from minicache.runtime.rope import RopeAngles
from tests.test_cache import left_padded_batch, make_model, profile_for, sequence, sum_of_storages
from tests.test_quant import _feed, decode_on_both_torch_paths
from tests.tiny_configs import tiny_config


def _outlier_keys(seed=0, tokens=40):
    torch.manual_seed(seed)
    keys, values = torch.randn(2, 3, tokens, 16), torch.randn(2, 3, tokens, 16)
    keys[..., 0, :] *= 30  # a sink: an outlier key, as real models have at token 0
    return keys, values


@pytest.mark.parametrize("scheme", ["kivi", "rotated"])
def test_sinks_stay_exact_and_do_not_stretch_the_first_group(scheme):
    keys, values = _outlier_keys()
    spec = Quantization(bits=3, group_size=8, residual_length=8, scheme=scheme)
    plain, sinks = QuantizedLayer(spec), QuantizedLayer(Quantization(**{**spec.__dict__, "sink_tokens": 2}))
    for layer in (plain, sinks):
        _feed(layer, keys, values, [13, 1, 1, 9, 16])
    k_plain, _ = plain.update(keys[..., :0, :], values[..., :0, :])
    k_sink, v_sink = sinks.update(keys[..., :0, :], values[..., :0, :])
    assert sinks.quantized_length == plain.quantized_length == 32
    assert torch.equal(k_sink[..., :2, :], keys[..., :2, :]) and torch.equal(v_sink[..., :2, :], values[..., :2, :])
    assert not torch.equal(k_plain[..., :2, :], keys[..., :2, :]), "without sinks token 0 is packed"
    # Token 0 no longer sets the first key group's ranges: the rest of that group is closer.
    err_plain = (k_plain[..., 2:8, :] - keys[..., 2:8, :]).norm()
    err_sink = (k_sink[..., 2:8, :] - keys[..., 2:8, :]).norm()
    assert err_sink < 0.5 * err_plain
    # Later groups are packed the same way, and the exact window is the same.
    assert torch.equal(k_sink[..., 8:, :], k_plain[..., 8:, :])
    # Every byte is counted: the sinks under "retained".
    parts = sinks.memory_parts()
    assert parts["retained"] == 2 * 2 * 3 * 2 * 16 * 4
    assert sum(parts.values()) == sum(t.numel() * t.element_size() for t in sinks.tensors())
    assert plain.memory_parts()["retained"] == 0


def test_sink_views_restore_what_the_default_path_returns():
    keys, values = _outlier_keys(1)
    layer = QuantizedLayer(Quantization(bits=2, group_size=8, residual_length=8, scheme="rotated", sink_tokens=3))
    k_all, v_all = layer.update(keys, values)
    k_all, v_all = layer.update(keys[..., :0, :], values[..., :0, :])
    k_view, v_view = layer.views_of()
    assert k_view.retained_count == 2 * 3 * 3
    torch.testing.assert_close(k_view.materialize(), k_all)
    torch.testing.assert_close(v_view.materialize(), v_all)
    # In the rotated frame (what the blockwise path attends), sinks are the exact vectors rotated in.
    rotation = layer.qkeys.rotation
    in_frame = k_view.restored_block(0, 8, in_frame=True)
    torch.testing.assert_close(in_frame[..., :3, :], keys[..., :3, :] @ rotation)
    # Batch selection keeps each row's own sinks.
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.update(keys[..., :0, :], values[..., :0, :])[0][..., :3, :], keys[[1, 0], :, :3, :])


def test_sinks_in_a_minicache_decode_the_same_on_every_torch_path_and_are_counted():
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 33])
    profile = profile_for(model, groups=((0, 1),)).with_quantization(
        Quantization(bits=2, group_size=8, residual_length=8, scheme="rotated", sink_tokens=4))
    restore = decode_on_both_torch_paths(model, ids, mask, profile)
    report = restore.memory_report()
    assert report["kv_bytes"] == sum_of_storages(restore)
    assert report["parts"]["retained"] > 0 and sequence(restore).layers[2].sink_keys.shape[-2] == 4


def test_triton_reads_sink_layers():
    # The kernel itself is checked against the restore in test_kernels.py (rotated layers with sinks).
    from minicache.runtime.attention import triton_unsupported

    keys, values = _outlier_keys(2)
    layer = QuantizedLayer(Quantization(bits=4, group_size=8, residual_length=8, sink_tokens=1))
    layer.update(keys, values)
    assert triton_unsupported(*layer.views_of(), torch.device("cpu")) is None


def test_sink_tokens_in_profiles_and_storage_specs(tmp_path):
    model = make_model("llama")
    profile = MergeProfile.preset("paper", model.config).with_quantization(
        Quantization(3, 64, 32, scheme="rotated", sink_tokens=4))
    assert "4 exact sinks" in profile.describe()
    path = profile.save(tmp_path / "p.yaml")
    quant_line = next(line for line in path.read_text().splitlines() if line.startswith("quantization:"))
    assert "sink_tokens: 4" in quant_line
    assert MergeProfile.load(path).quantization.sink_tokens == 4
    without = MergeProfile.preset("paper", model.config).with_quantization(Quantization(3, 64, 32))
    text = without.save(tmp_path / "q.yaml").read_text()
    assert "sink_tokens" not in next(line for line in text.splitlines() if line.startswith("quantization:"))
    with pytest.raises(ProfileError) as info:
        MergeProfile.from_dict({"format_version": 1, "quantization": {"group_size": 8, "sink_tokens": 8}})
    assert info.value.path == "quantization.sink_tokens"
    assert parse_storage("rotated:k3v2/64+s4") == Quantization(3, 64, scheme="rotated", value_bits=2, sink_tokens=4)
    assert parse_storage("kivi:4+prerope").pre_rope_keys and parse_storage("4+s2+prerope").sink_tokens == 2
    assert parse_storage("rotated:3/64+s4+r0+prerope").residual_length == 0
    assert parse_storage("3+r32").residual_length == 32 and parse_storage("3").residual_length == 128
    for bad in ("3+s", "rotated:3/+s4", "3+sx", "3+prerope+s4", "3+r", "3+r32+s4"):
        with pytest.raises(ValueError, match=r"\[SCHEME:\]BITS"):
            parse_storage(bad)


# ---- keys packed before RoPE -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma"])
def test_rope_angles_are_the_models_own(arch):
    model = make_model(arch)
    rope = RopeAngles.of_model(model)
    assert torch.equal(rope.inv_freq, RopeAngles.of_model(model.config).inv_freq), "config alone builds the same"
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    torch.manual_seed(0)
    heads, dim = model.config.num_key_value_heads, rope.rotary_dim
    keys = torch.randn(2, heads, 9, model.config.head_dim if hasattr(model.config, "head_dim") else dim)
    positions = torch.arange(5, 14).unsqueeze(0)
    cos, sin = rotary(keys, positions)
    half = cos.shape[-1] // 2
    rotated = keys[..., : cos.shape[-1]]
    rotated = rotated * cos[:, None] + torch.cat([-rotated[..., half:], rotated[..., :half]], -1) * sin[:, None]
    want = torch.cat([rotated, keys[..., cos.shape[-1]:]], -1)
    torch.testing.assert_close(rope.apply(keys, 5), want)
    torch.testing.assert_close(rope.remove(rope.apply(keys, 5), 5), keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("span_held", [4, 1])
def test_rope_angles_come_from_fixed_tables_so_every_range_reads_the_same_bits(monkeypatch, span_held):
    # Packing removes RoPE over one range of indices, decode puts it back block by block over others; a
    # position must turn by the same bits whichever range reads it, across tables too, from a held run of
    # tables or from rows copied for one read (span_held 1: every range over two tables is copied).
    import minicache.runtime.rope as rope_module

    monkeypatch.setattr(rope_module, "SPAN_HELD", span_held)
    rope = RopeAngles(10000.0 ** -(torch.arange(6) / 6), scaling=1.1)  # 12 rotary channels of 14
    chunk = rope_module.TABLE_CHUNK
    keys = torch.randn(2, 3 * chunk, 14, generator=torch.Generator().manual_seed(0))
    whole = rope.apply(keys, 0)
    for start, end in ((0, 5), (chunk - 3, chunk + 4), (7, 2 * chunk + 9), (2 * chunk, 3 * chunk)):
        assert torch.equal(rope.apply(keys[:, start:end], start), whole[:, start:end])
    # Reads within a held run are slices of it, not copies made per read (decode reads every step).
    first, second = (rope.cos_sin(chunk - 3, 7, "cpu")[0] for _ in range(2))
    shared = first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert shared == (span_held > 1)
    cos, sin = rope.cos_sin(chunk - 2, 4, "cpu")
    angles = torch.arange(chunk - 2, chunk + 2, dtype=torch.float64)[:, None] * rope.inv_freq.double()
    torch.testing.assert_close(cos.double(), angles.cos() * 1.1, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin() * 1.1, atol=1e-4, rtol=0)
    assert torch.equal(whole[..., 12:], keys[..., 12:]), "partial rotary: the rest passes through"
    torch.testing.assert_close(rope.remove(whole[:, 5:chunk + 5], 5), keys[:, 5:chunk + 5], atol=1e-5, rtol=1e-5)


def test_rope_angles_refuse_what_cannot_be_undone():
    dynamic = tiny_config("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic"):
        RopeAngles.of_model(dynamic)
    with pytest.raises(ValueError, match="no rotary embedding"):
        RopeAngles.of_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="need the model's RoPE"):
        QuantizedLayer(Quantization(pre_rope_keys=True))
    profile = MergeProfile().with_quantization(Quantization(bits=4, group_size=8, pre_rope_keys=True))
    with pytest.raises(ProfileError) as info:
        MiniCache(profile, dynamic)
    assert info.value.path == "quantization.pre_rope_keys"


def _rope_keys(rope: RopeAngles, tokens=48, seed=0):
    """Keys with stable per-channel offsets before RoPE (what real keys look like), then RoPE'd."""
    torch.manual_seed(seed)
    pre = torch.randn(2, 3, tokens, 16) * 0.3 + torch.randn(1, 3, 1, 16) * 3
    return rope.apply(pre, 0), torch.randn(2, 3, tokens, 16)


@pytest.mark.parametrize("scheme", ["kivi", "rotated"])
def test_pre_rope_keys_pack_closer_and_every_read_agrees(scheme):
    model = make_model("llama", head_dim=16)
    rope = RopeAngles.of_model(model)
    keys, values = _rope_keys(rope)
    spec = Quantization(bits=3, group_size=8, residual_length=8, scheme=scheme)
    post = QuantizedLayer(spec)
    pre = QuantizedLayer(Quantization(**{**spec.__dict__, "pre_rope_keys": True, "sink_tokens": 1}), rope=rope)
    for layer in (post, pre):
        _feed(layer, keys, values, [13, 1, 1, 9, 24])
    k_post, _ = post.update(keys[..., :0, :], values[..., :0, :])
    k_pre, v_pre = pre.update(keys[..., :0, :], values[..., :0, :])
    assert pre.quantized_length == 40 and "pre-RoPE" in repr(pre)
    assert (k_pre[..., :40, :] - keys[..., :40, :]).norm() < 0.7 * (k_post[..., :40, :] - keys[..., :40, :]).norm()
    assert torch.equal(k_pre[..., :1, :], keys[..., :1, :]), "the sink is exact"
    k_view, v_view = pre.views_of()
    assert k_view.frame is None and k_view.rope is rope and v_view.rope is None
    torch.testing.assert_close(k_view.materialize(), k_pre)
    torch.testing.assert_close(v_view.materialize(), v_pre)
    torch.testing.assert_close(torch.cat([k_view.restored_block(8, 24), k_view.restored_block(24, 40)], -2),
                               k_pre[..., 8:40, :])


def test_pre_rope_keys_decode_the_same_on_every_torch_path():
    from minicache.runtime.attention import triton_unsupported

    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 29])
    profile = profile_for(model, groups=((0, 1),)).with_quantization(
        Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2, pre_rope_keys=True))
    restore = decode_on_both_torch_paths(model, ids, mask, profile)
    layer = sequence(restore).layers[2]
    assert layer.rope is not None and layer.quantized_length > 0
    assert restore.memory_report()["kv_bytes"] == sum_of_storages(restore)
    kivi = QuantizedLayer(Quantization(bits=4, group_size=8, residual_length=8, pre_rope_keys=True), rope=layer.rope)
    kivi.update(*(torch.randn(1, 4, 24, 16) for _ in range(2)))
    assert triton_unsupported(*kivi.views_of(), torch.device("cpu")) is None  # the kernel reads them too
    # Quality: RoPE is put back at the right positions (a wrong index would scramble the keys).
    full = model(input_ids=ids[:1]).logits[:, -8:]
    cache = MiniCache(MergeProfile().with_quantization(
        Quantization(bits=4, group_size=8, residual_length=8, pre_rope_keys=True)), model)
    model(input_ids=ids[:1, :32], cache=cache)
    logits = model(input_ids=ids[:1, 32:], cache=cache).logits
    assert cache.layers[0].quantized_length == 32
    torch.testing.assert_close(logits, full, atol=0.05, rtol=0.05)
    assert not torch.equal(logits, full), "old keys really are packed"


# ---- coded recent windows (8 bits; 6 bits, rotated) ----------------------------------------------------------
@pytest.mark.parametrize("window_bits", [8, 6])
def test_a_coded_window_stores_each_token_once_in_half_the_bytes_or_less(window_bits):
    from minicache.quant.rotated import rotation_matrix

    keys, values = _outlier_keys(3)
    spec = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2)
    exact, narrow = QuantizedLayer(spec), QuantizedLayer(Quantization(**{**spec.__dict__, "window_bits": window_bits}))
    start = 0
    for size in (13, 1, 1, 9, 3):
        new_k, new_v = keys[..., start : start + size, :], values[..., start : start + size, :]
        k_exact, _ = exact.update(new_k, new_v)
        k_narrow, v_narrow = narrow.update(new_k, new_v)
        start += size
        assert torch.equal(k_narrow[..., -size:, :], new_k) and torch.equal(v_narrow[..., -size:, :], new_v), \
            "a step attends its own tokens exact"
    assert narrow.quantized_length == exact.quantized_length == 16 and narrow.window_length == 11
    k_narrow, v_narrow = narrow.update(keys[..., :0, :], values[..., :0, :])
    k_exact, _ = exact.update(keys[..., :0, :], values[..., :0, :])
    # Each token rounded once to the nearest of 2^bits levels of its own range, in the frame it is coded in
    # (6 bits: rotated first, so the outlier channels of _outlier_keys do not take the range).
    frame = torch.eye(16) if window_bits == 8 else rotation_matrix(16)
    assert (narrow.keys.rotation is None) == (window_bits == 8)
    window_error = ((k_narrow[..., 16:, :] - keys[..., 16:27, :]) @ frame).abs()
    coded = keys[..., 16:27, :] @ frame
    step = (coded.amax(-1) - coded.amin(-1)) / (2**window_bits - 1)
    assert window_error.max() > 0 and bool((window_error <= step.unsqueeze(-1) / 2 + 1e-5).all())
    assert torch.equal(k_narrow[..., :2, :], keys[..., :2, :]), "sinks stay exact"
    # Packed from what the window stored: close to the exact window's packing, and the same however fed.
    torch.testing.assert_close(k_narrow[..., :16, :], k_exact[..., :16, :], atol=0.3, rtol=0)
    once = QuantizedLayer(narrow.spec)
    once.update(keys[..., :27, :], values[..., :27, :])
    assert torch.equal(once.qkeys.data, narrow.qkeys.data) and torch.equal(once.qvalues.zero, narrow.qvalues.zero)
    # Bytes: bits / 8 per channel and a scale and zero point per token and head, all counted (the rotation is the
    # rotated scheme's, regenerated from its seed).
    parts, exact_parts = narrow.memory_parts(), exact.memory_parts()
    code_bytes = 16 * window_bits // 8
    assert parts["residual"] == 2 * 2 * 3 * 11 * (code_bytes + 2 * 4)  # K and V, batch 2, 3 heads, fp32 scales
    assert parts["residual"] < (0.4 if window_bits == 8 else 0.32) * exact_parts["residual"]
    assert sum(parts.values()) == sum(t.numel() * t.element_size() for t in narrow.tensors())
    assert narrow.full_bytes() == exact.full_bytes()
    # Crops and batch selection act on the stored window.
    narrow.crop(-3)
    assert narrow.get_seq_length() == 24
    narrow.reorder_cache(torch.tensor([1, 0]))
    k_swapped, _ = narrow.update(keys[..., :0, :], values[..., :0, :])
    torch.testing.assert_close(k_swapped, k_narrow[[1, 0], :, :24, :])


@pytest.mark.parametrize("window_bits", [8, 6])
def test_coded_windows_decode_the_same_on_every_torch_path_and_are_counted(window_bits):
    from minicache.runtime.attention import triton_unsupported

    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 29])
    quant = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2,
                         pre_rope_keys=True, window_bits=window_bits)
    profile = profile_for(model, groups=((0, 1),)).with_quantization(quant)
    restore = decode_on_both_torch_paths(model, ids, mask, profile)
    layer = sequence(restore).layers[2]
    assert layer.quantized_length > 0 and layer.keys.bits == window_bits
    assert restore.memory_report()["kv_bytes"] == sum_of_storages(restore)
    assert triton_unsupported(*layer.views_of(), torch.device("cpu")) is None  # the kernel reads the dequantized window
    # Quality: the coded window costs far less than the packed prefix does.
    full = model(input_ids=ids[:1]).logits[:, -8:]
    errors = []
    for bits in (None, window_bits):
        cache = MiniCache(MergeProfile().with_quantization(
            Quantization(bits=4, group_size=8, residual_length=16, window_bits=bits)), model)
        model(input_ids=ids[:1, :32], cache=cache)
        errors.append((model(input_ids=ids[:1, 32:], cache=cache).logits - full).abs().max().item())
    assert errors[0] > 0 and errors[1] < 1.5 * errors[0]


@pytest.mark.parametrize("window_bits", [8, 6])
def test_a_coded_window_with_sinks_runs_with_autograd_on(window_bits):
    """A plain ``model(...)`` call, outside ``torch.no_grad``: the window's sinks are written over its restored
    keys and values, which must be tensors autograd lets us write to (views of ``unbind`` are not)."""
    model = make_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    quant = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2,
                         window_bits=window_bits)
    logits = {}
    for grad in (False, True):
        cache = MiniCache(MergeProfile().with_quantization(quant), model)
        with torch.set_grad_enabled(grad):
            model(input_ids=ids[:, :12], cache=cache)
            logits[grad] = model(input_ids=ids[:, 12:], cache=cache).logits.detach()
    assert sequence(cache).layers[0].quantized_length > 0
    torch.testing.assert_close(logits[True], logits[False])


@pytest.mark.parametrize(("field", "option", "storage", "bad_storage", "described"), [
    ("window_bits", "--kv-window-bits", "rotated:3+s4+prerope+w8", "3+w4", "8-bit window"),
    ("scale_bits", "--kv-scale-bits", "rotated:3/64+s4+prerope+w8+z8", "3+z4", "8-bit scales"),
])
def test_8_bit_storage_fields_in_profiles_storage_specs_and_options(tmp_path, field, option, storage, bad_storage,
                                                                    described):
    import argparse

    from minicache.cli_options import add_kv_options, quantization_from_args

    model = make_model("llama")
    profile = MergeProfile.preset("none", model.config).with_quantization(
        Quantization(3, 64, 32, scheme="rotated", **{field: 8}))
    assert described in profile.describe()
    path = profile.save(tmp_path / "p.yaml")
    assert f"{field}: 8" in path.read_text()
    assert getattr(MergeProfile.load(path).quantization, field) == 8
    assert field not in Quantization(3).to_dict()
    for bad in (4, 16, True, "8"):
        with pytest.raises(ProfileError) as info:
            MergeProfile.from_dict({"format_version": 2, "quantization": {field: bad}})
        assert info.value.path == f"quantization.{field}"
    assert getattr(parse_storage(storage), field) == 8 and getattr(parse_storage("3"), field) is None
    with pytest.raises(ValueError, match=field):
        parse_storage(bad_storage)
    parser = argparse.ArgumentParser()
    add_kv_options(parser)
    assert getattr(quantization_from_args(parser.parse_args(["--kv-bits", "3", option, "8"])), field) == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-bits", "3", option, "4"])
    with pytest.raises(ProfileError, match="needs --kv-bits") as info:  # alone it would do nothing
        quantization_from_args(parser.parse_args([option, "8"]))
    assert info.value.path == option
    assert quantization_from_args(parser.parse_args([])) is None
    if field == "window_bits":  # windows also take 6-bit codes (rotated first)
        assert quantization_from_args(parser.parse_args(["--kv-bits", "3", option, "6"])).window_bits == 6
        assert parse_storage("rotated:3+w6").window_bits == 6 and "6-bit window" in MergeProfile().with_quantization(
            Quantization(3, window_bits=6)).describe()
        with pytest.raises(ProfileError, match=r"allowed: \[6, 8\]"):
            Quantization(3, window_bits=7)


def test_kv_compact_fills_in_the_5x_settings_and_options_given_win():
    from minicache.cli_options import KV_COMPACT, ArgumentParser, add_kv_options, quantization_from_args
    from minicache.validation import ProfileError

    def parse(*argv, scheme="kivi", sinks=0):
        parser = ArgumentParser()
        add_kv_options(parser, auto=True, scheme=scheme, sink_tokens=sinks)
        return quantization_from_args(parser.parse_args(list(argv)))

    compact = parse("--kv-bits", "auto", "--kv-compact")
    assert (compact.scheme, compact.sink_tokens, compact.pre_rope_keys, compact.group_size, compact.window_bits,
            compact.scale_bits, compact.key_rounding) == tuple(KV_COMPACT.values())
    assert compact.bits == 4  # auto: the search starts at the scheme's widest
    # Given options win, even when they equal the command's defaults (128 is --kv-group-size's default).
    mine = parse("--kv-bits", "3", "--kv-compact", "--kv-group-size", "128", "--kv-window-bits", "6",
                 "--kv-scheme", "kivi", "--kv-key-rounding", "nearest", "--kv-sink-tokens", "0")
    assert (mine.group_size, mine.window_bits, mine.scheme, mine.key_rounding, mine.sink_tokens) == (
        128, 6, "kivi", "nearest", 0)
    assert mine.pre_rope_keys and mine.scale_bits == 8
    # Without it, the command's own defaults, as before.
    plain = parse("--kv-bits", "3", scheme="rotated", sinks=4)
    assert (plain.group_size, plain.window_bits, plain.pre_rope_keys, plain.key_rounding) == (
        128, None, False, "nearest")
    with pytest.raises(ProfileError, match="needs --kv-bits") as info:
        parse("--kv-compact")
    assert info.value.path == "--kv-compact"
