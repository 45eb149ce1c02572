"""Triton kernels (merge, fused decode attention) against the torch reference.

Without a GPU the kernels run on CPU tensors through Triton's interpreter. ``TRITON_INTERPRET``
is read when a kernel is *decorated*, i.e. when its module is imported, so it is set here before
anything imports the kernel modules (and modules imported earlier are reloaded). On a CUDA machine
the same tests run the compiled kernels on the GPU.

Tolerances (kernel vs the float32 reference on the same stored data):

* merge: distances 1e-6 absolute (our float32 atan2 is within ~1.5e-7 rad of torch's);
  directions within one unit of the model dtype's precision (``finfo.eps``; 1e-6 for fp32);
  magnitudes 1e-6 relative for fp32, and the fp16 storage rounding (1e-3 relative) otherwise;
  retention decisions identical.
* decode attention: fp32 1e-5 (abs and rel); fp16 3e-3; bf16 2e-2 (the output's own rounding
  is up to 8e-3 at |x| ≈ 2, plus probabilities rounded to bf16 before the P·V product, as in
  flash attention).
* generate: identical tokens, logits within 1e-4 (fp32 tiny model).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    # tests/conftest.py sets this before anything imports triton (Triton's own jit'd standard
    # library is decorated at its import); setting it here too keeps this file runnable alone.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the kernels need triton (pip install 'minicache[kernels]')")
for _name in ("minicache.runtime.kernels.merge", "minicache.runtime.kernels.decode"):
    if _name in sys.modules:  # decorated before TRITON_INTERPRET was set: decorate again
        importlib.reload(sys.modules[_name])

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from minicache import MergeProfile, MiniCache  # noqa: E402
from minicache.methods.slerp import slerp_pair  # noqa: E402
from minicache.profile import Defaults, MergeGroup, MergeSettings  # noqa: E402
from minicache.runtime import attention  # noqa: E402
from minicache.runtime.attention import minicache_attention_forward  # noqa: E402
from minicache.runtime.kernels import decode as decode_module  # noqa: E402
from minicache.runtime.kernels.decode import fused_decode_attention  # noqa: E402
from minicache.runtime.kernels.merge import merge_block  # noqa: E402
from minicache.runtime.kernels.reference import fused_decode_reference  # noqa: E402
from minicache.runtime.kernels.synthetic import random_merged_views, with_rotation  # noqa: E402
from minicache.runtime.retention import retention_mask  # noqa: E402
from minicache.runtime.store import GroupStore, PaddingInfo  # noqa: E402
from minicache.runtime.views import MergedKVView  # noqa: E402
from tests.test_cache import sequence  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DECODE_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- merge kernel ------------------------------------------------------------------------------
def _merge_inputs(dtype: torch.dtype, b=2, h=3, n=40, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_a = torch.randn(b, h, n, d, generator=g)
    x_b = torch.randn(b, h, n, d, generator=g)
    x_b[0, 0, 3] = x_a[0, 0, 3]  # identical: Ω = 0, linear fallback
    x_b[0, 0, 4] = -x_a[0, 0, 4]  # opposite: Ω = π
    x_b[0, 1, 5] = x_a[0, 1, 5] + 1e-6 * torch.randn(d, generator=g)  # sin Ω below the fallback threshold
    x_a[1, 1, 6] = 0.0  # one zero vector
    x_a[1, 1, 7] = x_b[1, 1, 7] = 0.0  # both zero
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    sink = torch.zeros(b, n, dtype=torch.bool)
    sink[0, 0] = sink[1, 5] = True
    return x_a.to(dtype).to(DEVICE), x_b.to(dtype).to(DEVICE), valid.to(DEVICE), sink.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_merge_kernel_matches_slerp_pair(dtype):
    x_a, x_b, valid, sink = _merge_inputs(dtype)
    count, window, t, gamma = 32, 8, 0.6, 0.2
    mag_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    out = merge_block(
        x_a, x_b, t, gamma, valid=valid, sink=sink, window=window, count=count, magnitude_dtype=mag_dtype
    )
    ref = slerp_pair(x_a, x_b, t)
    torch.testing.assert_close(out.distance, ref.distance, rtol=0, atol=1e-6)
    eps = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(
        out.direction.float(), ref.direction[..., :count, :].to(dtype).float(), rtol=0, atol=eps
    )
    assert out.direction.dtype == dtype and out.magnitude.dtype == mag_dtype
    keep_ref = retention_mask(ref.distance, gamma, valid=valid, sink=sink, window=window, count=count)
    keep_own = retention_mask(out.distance, gamma, valid=valid, sink=sink, window=window, count=count)
    assert torch.equal(out.keep, keep_own), "in-kernel retention = retention_mask on the kernel's distances"
    assert torch.equal(out.keep, keep_ref)
    assert out.keep.any() and not out.keep.all()
    magnitude = ref.magnitudes[..., :count, :].masked_fill(keep_ref.unsqueeze(-1), -1.0)
    rtol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.magnitude.float(), magnitude, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize(
    ("rule", "gamma", "window"),
    [
        ("similar", 0.3, 8),
        ("distinct", 0.0, 8),
        ("distinct", 1.0, 8),
        ("distinct", 0.1, None),
        ("similar", 0.5, 40),
    ],
)
def test_merge_kernel_retention_settings(rule, gamma, window):
    x_a, x_b, valid, sink = _merge_inputs(torch.float32, n=24, seed=1)
    out = merge_block(x_a, x_b, 0.5, gamma, rule, valid=valid, sink=sink, window=window, count=20)
    keep = retention_mask(out.distance, gamma, rule, valid=valid, sink=sink, window=window, count=20)
    assert torch.equal(out.keep, keep)
    assert torch.equal(out.magnitude[..., 0] < 0, keep)


def _store(merge_kernel: bool, padding: PaddingInfo, rotations: dict | None = None) -> GroupStore:
    settings = MergeSettings.create(t=0.6, gamma=0.2, sink_tokens=1, align=rotations is not None)
    tensors = None if rotations is None else {n: {"rotation": r} for n, r in rotations.items()}
    store = GroupStore(
        MergeGroup((0, 1), settings, settings), residual_length=5, block_size=4, padding=padding, tensors=tensors,
    )
    store.merge_kernel = merge_kernel
    return store


@pytest.mark.parametrize("aligned", [False, True])
def test_store_merge_with_kernel_matches_torch(aligned):
    from tests.alignment_helpers import random_rotations

    g = torch.Generator().manual_seed(0)
    ka, kb, va, vb = (torch.randn(3, 2, 27, 32, generator=g).to(DEVICE) for _ in range(4))
    real = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    real[1, :6] = False
    rotations = None
    if aligned:  # an aligned pair enters the merge kernel rotated
        rotations = {
            n: random_rotations(2, 2, 32, seed=i, identity_last=False) for i, n in enumerate(("keys", "values"))
        }
    stores = [_store(flag, PaddingInfo(real), rotations) for flag in (False, True)]
    for store in stores:
        for lo, hi in ((0, 21), (21, 25), (25, 27)):  # a prefill chunk, then short steps
            store.update(0, ka[..., lo:hi, :], va[..., lo:hi, :])
            store.update(1, kb[..., lo:hi, :], vb[..., lo:hi, :])
    torch_store, kernel_store = stores
    assert kernel_store.merged_length == torch_store.merged_length == 20
    for c in range(2):
        want, got = torch_store.kernel_views(0)[c], kernel_store.kernel_views(0)[c]
        # Aligned: the kernel gets rotated float32 inputs (norms rounded once more than in torch).
        tol = 2e-6 if aligned else 1e-6
        torch.testing.assert_close(got.direction, want.direction, rtol=0, atol=tol)
        torch.testing.assert_close(got.magnitude, want.magnitude, rtol=1e-6, atol=10 * tol)
        assert torch.equal(got.retained_index, want.retained_index)
        assert torch.equal(got.retained_value, want.retained_value)
        for member in range(2):
            got_window = kernel_store.kernel_views(member)[c].residual
            assert torch.equal(got_window, torch_store.kernel_views(member)[c].residual)


# ---- fused decode attention ----------------------------------------------------------------------
def _decode_case(
    dtype, group, head_dim, *, batch=2, kv_heads=2, merged=150, residual=9, retained=None, seed=0
):
    if retained is None:  # ragged: a row with none, rows with few and many retained tokens
        retained = torch.tensor([[0.0, 0.3], [0.1, 0.6]])[:batch, :kv_heads]
    keys, values = random_merged_views(
        batch,
        kv_heads,
        merged,
        residual,
        head_dim,
        dtype=dtype,
        device=DEVICE,
        retained=retained,
        member=1,
        seed=seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=g).to(dtype).to(DEVICE)
    mask = torch.ones(batch, 1, 1, merged + residual, dtype=torch.bool, device=DEVICE)
    if batch > 1:
        mask[1, ..., : min(17, (merged + residual) // 2)] = False  # left padding of the second sequence
    return query, keys, values, mask


def _assert_decode_close(got, query, keys, values, mask, dtype, **kwargs):
    want = fused_decode_reference(query.float(), keys, values, mask, **kwargs)
    tol = DECODE_TOL[dtype]
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_decode_matches_reference(dtype, group, head_dim):
    query, keys, values, mask = _decode_case(dtype, group, head_dim)
    counts = keys.retained.offsets.diff()
    assert (counts == 0).any() and counts.max() > 32, "ragged retention, including an empty row"
    # 64-token splits: several dense splits, two retained splits for the busiest row.
    got = fused_decode_attention(query, keys, values, mask, split_tokens=64)
    _assert_decode_close(got, query, keys, values, mask, dtype)


@pytest.mark.parametrize(
    "case",
    ["nothing_merged", "nothing_retained", "everything_retained", "no_mask", "float_mask", "default_plan"],
)
def test_fused_decode_edge_cases(case):
    dtype = torch.float32
    kwargs = {"merged": 0} if case == "nothing_merged" else {}
    if case in ("nothing_retained", "everything_retained"):
        kwargs["retained"] = 0.0 if case == "nothing_retained" else 1.0
    query, keys, values, mask = _decode_case(dtype, 4, 64, **kwargs)
    if case == "no_mask":
        mask = None
    elif case == "float_mask":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        mask[0, ..., 40] = -2.5  # any additive bias, not only -inf
    split = None if case == "default_plan" else 64
    got = fused_decode_attention(query, keys, values, mask, scaling=0.3, split_tokens=split)
    _assert_decode_close(got, query, keys, values, mask, dtype, scaling=0.3)


def test_fused_decode_without_magnitudes_is_the_benchmark_baseline():
    query, keys, values, mask = _decode_case(torch.float32, 4, 64)
    got = fused_decode_attention(query, keys, values, mask, use_magnitude=False, split_tokens=64)
    _assert_decode_close(got, query, keys, values, mask, torch.float32, use_magnitude=False)


def test_kernel_views_of_a_store_restore_like_the_torch_path():
    store = _store(False, PaddingInfo())
    g = torch.Generator().manual_seed(3)
    ka, kb, va, vb = (torch.randn(2, 3, 23, 16, generator=g).to(DEVICE) for _ in range(4))
    store.update(0, ka, va)
    store.update(1, kb, vb)
    for member in range(2):
        keys, values = store.kernel_views(member)
        assert isinstance(keys, MergedKVView) and keys.shape == (2, 3, 23, 16)
        # The view's two ways to the retained tokens (CSR for kernels, COO for torch) agree.

        for view in (keys, values):
            csr_only = dataclasses.replace(view, retained_index=None)
            assert torch.equal(csr_only.materialize(), view.materialize())
    store.views = True  # the kernel path keeps the CSR lists between steps
    csr = store.kernel_views(0)[0].retained
    assert store.kernel_views(1)[0].retained is csr, "CSR lists are built once per change"
    store.select_batch(torch.tensor([1, 0, 1]))
    keys, _ = store.kernel_views(0)
    assert keys.retained is not csr
    assert torch.equal(dataclasses.replace(keys, retained_index=None).materialize(), keys.materialize())


def test_fused_decode_groups_retained_lists_given_in_store_order_only():
    """Views holding their retained tokens only in store order (no CSR: the vLLM plugin's batch gathered
    from its pages) must be attended as the store's own kernel views are, not with the retained tokens
    dropped."""

    from minicache.runtime.kernels import fused_decode_attention

    store = _store(False, PaddingInfo())
    g = torch.Generator().manual_seed(4)
    ka, kb, va, vb = (torch.randn(2, 3, 40, 16, generator=g).to(DEVICE) for _ in range(4))
    store.update(0, ka, va)
    store.update(1, kb, vb)
    query = torch.randn(2, 6, 1, 16, generator=g).to(DEVICE)
    keys, values = store.kernel_views(1)
    assert keys.retained_count and keys.retained is not None
    want = fused_decode_attention(query, keys, values)
    coo = [dataclasses.replace(v, retained=None) for v in (keys, values)]
    torch.testing.assert_close(fused_decode_attention(query, *coo), want, rtol=0, atol=0)


# ---- transformers integration ----------------------------------------------------------------------
def _tiny_llama(kv_heads: int = 2, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    overrides = {
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": kv_heads,
    }
    try:
        from tests.tiny_configs import tiny_config

        config = tiny_config("llama", **overrides)
    except ImportError:
        config = LlamaConfig(vocab_size=256, intermediate_size=256, max_position_embeddings=512, **overrides)
    return AutoModelForCausalLM.from_config(config).to(device=DEVICE, dtype=dtype).eval()


def _profile() -> MergeProfile:
    defaults = Defaults(residual_length=8, block_size=4, gamma=0.1)
    groups = tuple(
        MergeGroup(layers, defaults.settings(), defaults.settings()) for layers in ((0, 1), (2, 3))
    )
    return MergeProfile(groups=groups, defaults=defaults)


def _generate(model, cache, new_tokens=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 26), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding
    return model.generate(
        input_ids=ids.to(DEVICE),
        attention_mask=mask.to(DEVICE),
        cache=cache,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_generate_through_the_fused_path_matches_the_torch_path(monkeypatch):
    model = _tiny_llama(kv_heads=2)  # 4 query heads per KV head
    want = _generate(model, MiniCache(_profile(), model))
    fused_calls = _count_calls(monkeypatch, decode_module, "fused_decode_attention")
    merge_calls = _count_calls(
        monkeypatch, importlib.import_module("minicache.runtime.kernels.merge"), "merge_block"
    )
    assert attention.enable_fused_attention(model, force=True)
    assert model.config._attn_implementation == "minicache"
    cache = MiniCache(_profile(), model)
    assert cache.bound and all(store.views and store.merge_kernel for store in cache.stores), (
        "the attention path is decided once, when the cache meets the model"
    )
    got = _generate(model, cache)
    assert attention.bound_caches(model) == [cache]
    attention.disable_fused_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(store.views for store in cache.stores), "disabling unbinds the model's caches"
    assert cache.rows is not None, "a padded batch is stored per sequence"
    assert not any(store.views for row in cache.rows.rows for store in row.stores), "and its sequences' caches"

    # 11 decode steps x 4 merged layers x 2 sequences (the first new token comes from prefill; a padded
    # batch decodes one sequence at a time over its real tokens).
    assert len(fused_calls) == 11 * 4 * 2
    assert merge_calls, "merged with the Triton kernel"
    assert min(cache.memory_report()["groups"][0]["merged_tokens"]) > 0
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [8, 1])
def test_generate_fused_other_gqa_ratios(kv_heads):
    model = _tiny_llama(kv_heads=kv_heads)
    want = _generate(model, MiniCache(_profile(), model), new_tokens=8)
    assert attention.enable_fused_attention(model, force=True)
    got = _generate(model, MiniCache(_profile(), model), new_tokens=8)
    attention.disable_fused_attention(model)
    assert torch.equal(got.sequences, want.sequences)


def test_enable_is_a_noop_with_a_message_without_a_gpu(caplog):
    if ON_CUDA:
        pytest.skip("this machine has a GPU")
    model = _tiny_llama()
    with caplog.at_level(logging.WARNING):
        assert not attention.enable_fused_attention(model)  # CPU, not forced
    assert model.config._attn_implementation == "sdpa"
    assert "fused attention not enabled" in caplog.text


def test_attention_function_falls_back_when_the_kernel_cannot_serve(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_WARNED", set())
    query, keys, values, _ = _decode_case(torch.float32, 4, 64)
    module = torch.nn.Module()
    module.num_key_value_groups = 4
    with caplog.at_level(logging.WARNING):
        out, weights = minicache_attention_forward(module, query, keys, values, None, output_attentions=True)
    assert "not used" in caplog.text and weights is None
    k, v = keys.materialize(), values.materialize()
    want = torch.nn.functional.scaled_dot_product_attention(query, k, v, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---- compiling for a GPU without one; the benchmark's logic -------------------------------------------
def _run_clean(args, env_updates, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_updates)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_kernels_compile_for_h100():
    """Catch compile errors that only a real target shows (the interpreter skips the compiler)."""
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    proc = _run_clean(["-m", "minicache.runtime.kernels.aot_check", "--arch", "90"], {}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    assert {r["kernel"] for r in reports} == {
        "_merge_kernel",
        "_decode_partial_kernel",
        "_decode_combine_kernel",
    }


def test_lowbit_kernel_benchmark_reduced_mode_checks_every_store(tmp_path):
    out = tmp_path / "lowbit.json"
    proc = _run_clean(["benchmarks/lowbit_kernel_bench.py", "--reduced", "--out", str(out)],
                      {"TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["store"] == "4-bit kivi" and len(rows) == 7
    assert all(r["max_abs_diff_vs_blockwise"] < 5e-2 and r["ms"] > 0 for r in rows)


def test_benchmark_reduced_mode_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_clean(
        ["benchmarks/kernel_bench.py", "--reduced", "--out", str(out)], {"TRITON_INTERPRET": "1"}, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in (
        "device",
        "torch_version",
        "triton_version",
        "command",
        "copy_bandwidth_gbs",
        "targets",
        "results",
    ):
        assert key in result, key
    assert result["reduced"] is True and result["results"]
    for row in result["results"]:
        for key in (
            "shape",
            "batch",
            "context",
            "bytes_read",
            "ms",
            "bandwidth_gbs",
            "ratios",
            "max_abs_error",
        ):
            assert key in row, key
        assert set(row["ms"]) == {"fused", "fused_no_magnitude", "restore_then_sdpa", "sdpa_full"}
        assert row["ms"]["restore_then_sdpa"] > 0 and row["ms"]["sdpa_full"] > 0
        if row["ms"]["fused"] is not None:  # the interpreter ran the kernel
            assert row["max_abs_error"] < 1e-4
    assert "fused" in proc.stdout and "target" in proc.stdout


# ---- aligned groups (issue 7) ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("which", ["keys", "values", "both"])
def test_fused_decode_with_alignment_matches_reference(dtype, which):

    from tests.alignment_helpers import random_rotations

    query, keys, values, mask = _decode_case(dtype, 4, 64)
    rot = random_rotations(2, 2, 64, seed=5, identity_last=False).to(DEVICE)
    if which in ("keys", "both"):
        keys = with_rotation(keys, rot[0])
    if which in ("values", "both"):
        values = with_rotation(values, rot[1])
    got = fused_decode_attention(query, keys, values, mask, split_tokens=64)
    _assert_decode_close(got, query, keys, values, mask, dtype)
    # The rotation matters: the unaligned store gives another answer.
    plain = fused_decode_reference(query.float(), *_decode_case(dtype, 4, 64)[1:3], mask)
    assert (got.float() - plain).abs().max() > 2 * DECODE_TOL[dtype]


def test_generate_fused_aligned_three_layer_group_matches_the_torch_path():
    from tests.alignment_helpers import aligned_profile

    model = _tiny_llama(kv_heads=2)
    d = model.config.hidden_size // model.config.num_attention_heads

    def profile():
        return aligned_profile(((0, 1, 2),), heads=2, dim=d, seed=3)

    want = _generate(model, MiniCache(profile(), model), new_tokens=6)
    assert attention.enable_fused_attention(model, force=True)
    cache = MiniCache(profile(), model)
    got = _generate(model, cache, new_tokens=6)
    attention.disable_fused_attention(model)
    assert min(cache.memory_report()["groups"][0]["merged_tokens"]) > 0
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


# ---- packed (quantized) stores, issue 6 ------------------------------------------------------------
def _quantized_case(dtype, group, bits, **kwargs):
    from minicache.runtime.kernels.synthetic import quantize_views

    query, keys, values, mask = _decode_case(dtype, group, 64, merged=166, **kwargs)
    # 160 key tokens packed in groups of 32, the newest 6 still dense; values packed per token.
    qkeys, qvalues = quantize_views(keys, values, bits, key_group=32, value_group=32, key_tail=6)
    return query, (keys, values), (qkeys, qvalues), mask


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group", [1, 4])
def test_fused_decode_reads_packed_data_like_the_reference(dtype, bits, group):
    query, dense, (qkeys, qvalues), mask = _quantized_case(dtype, group, bits)
    assert qkeys.packed_length == 160 and qkeys.merged_length == 166 and qvalues.packed_length == 166
    assert qkeys.retained_q is not None and qkeys.retained_value is None
    got = fused_decode_attention(query, qkeys, qvalues, mask, split_tokens=64)
    # The reference restores the dequantized store: the kernel must attend on exactly that data.
    _assert_decode_close(got, query, qkeys, qvalues, mask, dtype)
    # ... which is not the unquantized store (the test would pass vacuously otherwise).
    unquantized = fused_decode_reference(query.float(), *dense, mask)
    assert (got.float() - unquantized).abs().max() > 5 * DECODE_TOL[dtype]


def test_fused_decode_packed_and_aligned():

    from tests.alignment_helpers import random_rotations

    dtype = torch.bfloat16
    query, _, (qkeys, qvalues), mask = _quantized_case(dtype, 4, 4)
    rot = random_rotations(2, 2, 64, seed=5, identity_last=False).to(DEVICE)
    qkeys, qvalues = with_rotation(qkeys, rot[0]), with_rotation(qvalues, rot[1])
    got = fused_decode_attention(query, qkeys, qvalues, mask, split_tokens=64)
    _assert_decode_close(got, query, qkeys, qvalues, mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("scale_bits", [None, 8], ids=["float-scales", "8-bit-scales"])
def test_fused_decode_of_an_unmerged_quantized_layer_is_plain_attention(dtype, scale_bits):
    from minicache.quant.packed import quantize

    g = torch.Generator().manual_seed(7)
    k, v = (torch.randn(2, 2, 136, 64, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    packed_k = quantize(k[..., :128, :], 4, 32, "tokens", scale_bits=scale_bits)
    packed_v = quantize(v[..., :128, :], 4, 32, "channels", scale_bits=scale_bits)
    keys = MergedKVView.of_quantized_layer(k[..., 128:, :], packed_k)
    values = MergedKVView.of_quantized_layer(v[..., 128:, :], packed_v)
    query = torch.randn(2, 8, 1, 64, generator=g).to(dtype).to(DEVICE)
    mask = torch.ones(2, 1, 1, 136, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :9] = False
    got = fused_decode_attention(query, keys, values, mask, split_tokens=64)
    # sdpa over the dequantized prefix + exact window, i.e. what the torch path attends on.
    full_k = torch.cat([packed_k.dequantize(dtype), k[..., 128:, :]], dim=-2)
    full_v = torch.cat([packed_v.dequantize(dtype), v[..., 128:, :]], dim=-2)
    want = torch.nn.functional.scaled_dot_product_attention(
        query.float(), full_k.float().repeat_interleave(4, 1), full_v.float().repeat_interleave(4, 1), mask
    )
    tol = DECODE_TOL[dtype]
    torch.testing.assert_close(got.float(), want.transpose(1, 2), rtol=tol, atol=tol)


def test_fused_decode_reads_keys_and_values_of_different_widths():

    from minicache.runtime.kernels.synthetic import quantize_views

    _, keys, values, mask = _decode_case(torch.float32, 1, 64, merged=166)
    query = torch.randn(2, 2, 1, 64, device=DEVICE)
    k4, v4 = quantize_views(keys, values, 4, key_group=32, value_group=32, key_tail=6)
    _, v2 = quantize_views(keys, values, 2, key_group=32, value_group=32, key_tail=6)
    assert attention.triton_unsupported(k4, v2, DEVICE) is None, "keys 4 / values 2 bits go to the kernel"
    got = fused_decode_attention(query, k4, v2, mask, split_tokens=64)
    _assert_decode_close(got, query, k4, v2, mask, torch.float32)
    # ... which differs from 4/4 (each side really reads its own width).
    assert (got - fused_decode_attention(query, k4, v4, mask, split_tokens=64)).abs().max() > 1e-3
    # One side's parts at two widths: refused.
    with pytest.raises(ValueError, match="different bit widths"):
        fused_decode_attention(query, dataclasses.replace(v2, retained_q=v4.retained_q), v2, mask)
    # Exact retained vectors beside packed directions (what the launcher makes of a rotated merged group's
    # retained lists, in_packing_frame) are read as they are.
    unpacked_retained = dataclasses.replace(k4, retained_q=None, retained_value=keys.retained_value)
    got = fused_decode_attention(query, unpacked_retained, v4, mask, split_tokens=64)
    _assert_decode_close(got, query, unpacked_retained, v4, mask, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize(("sinks", "scheme", "bits"), [(0, "rotated", (4, 3)), (3, "rotated", (4, 3)),
                                                       (3, "rotated-lloyd", (2, 2)), (0, "rotated-lloyd", (4, 2))])
def test_fused_decode_of_a_rotated_layer_with_sinks_is_its_restore(dtype, sinks, scheme, bits):
    from minicache.profile import Quantization
    from minicache.runtime.blockwise import blockwise_decode_attention
    from minicache.runtime.layers import QuantizedLayer

    g = torch.Generator().manual_seed(11)
    layer = QuantizedLayer(Quantization(bits=bits[0], value_bits=bits[1], group_size=32, residual_length=8,
                                        scheme=scheme, sink_tokens=sinks))
    k, v = (torch.randn(2, 2, 141, 64, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    k[..., :sinks, :] *= 6  # outlier sinks: a stand-in row attended by mistake would show
    layer.update(k, v)
    keys, values = layer.views_of()
    assert keys.frame is not None and keys.qdirection.rotation is not None and keys.retained_count == 2 * 2 * sinks
    assert (keys.qdirection.bits, values.qdirection.bits) == bits
    # rotated-lloyd: 2-bit codes index its table of levels (the kernel loads it), wider ones are even
    assert [q.levels is not None for q in (keys.qdirection, values.qdirection)] == [
        scheme == "rotated-lloyd" and b == 2 for b in bits]
    assert attention.triton_unsupported(keys, values, DEVICE) is None
    query = torch.randn(2, 8, 1, 64, generator=g).to(dtype).to(DEVICE)
    mask = torch.ones(2, 1, 1, 141, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :5] = False
    got = fused_decode_attention(query, keys, values, mask, split_tokens=32)
    _assert_decode_close(got, query, keys, values, mask, dtype)  # attention over the views' own restore
    torch.testing.assert_close(got.float(), blockwise_decode_attention(query, keys, values, mask).float(),
                               rtol=DECODE_TOL[dtype], atol=DECODE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("scheme", ["kivi", "rotated"])
def test_fused_decode_puts_rope_back_on_keys_packed_before_it(dtype, scheme):

    from minicache.profile import Quantization
    from minicache.runtime.blockwise import blockwise_decode_attention
    from minicache.runtime.layers import QuantizedLayer
    from minicache.runtime.rope import RopeAngles

    g = torch.Generator().manual_seed(12)
    # Partial rotary (24 of 64 channels) with attention scaling: every branch of the maps is used.
    rope = RopeAngles(10000.0 ** -(torch.arange(12) / 12), scaling=1.1)
    layer = QuantizedLayer(Quantization(bits=4, value_bits=3, group_size=32, residual_length=8, scheme=scheme,
                                        sink_tokens=2, pre_rope_keys=True), rope=rope)
    k, v = (torch.randn(2, 2, 141, 64, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    layer.update(k, v)
    keys, values = layer.views_of()
    assert keys.rope is not None and keys.frame is None and (values.frame is not None) == (scheme == "rotated")
    assert attention.triton_unsupported(keys, values, DEVICE) is None
    query = torch.randn(2, 8, 1, 64, generator=g).to(dtype).to(DEVICE)
    mask = torch.ones(2, 1, 1, 141, dtype=torch.bool, device=DEVICE)
    got = fused_decode_attention(query, keys, values, mask, split_tokens=32)
    _assert_decode_close(got, query, keys, values, mask, dtype)  # the views' restore puts RoPE back
    torch.testing.assert_close(got.float(), blockwise_decode_attention(query, keys, values, mask).float(),
                               rtol=DECODE_TOL[dtype], atol=DECODE_TOL[dtype])
    # ... at the right indices: the same packing attended without RoPE put back is far off.
    no_rope = fused_decode_attention(query, dataclasses.replace(keys, rope=None), values, mask, split_tokens=32)
    assert (no_rope.float() - got.float()).abs().max() > 10 * DECODE_TOL[dtype]
    # Wider heads than the maps fit in shared memory (sm_90, aot_check) go to the blockwise path.
    from minicache.runtime.kernels.support import rope_unsupported

    assert rope_unsupported(128, torch.bfloat16) is None and rope_unsupported(128, torch.float32) is not None
    assert "shared memory" in rope_unsupported(256, torch.bfloat16)


def _rotated_packing(view: MergedKVView, rotation: torch.Tensor, levels: torch.Tensor | None) -> MergedKVView:
    """The same codes read as a rotated packing (``x R`` held) of a merged group, retained lists too."""
    field = view.stored["direction"]
    packed = dataclasses.replace(field.packed, rotation=rotation)
    retained_q = dataclasses.replace(view.retained_q, rotation=rotation, levels=levels)
    return dataclasses.replace(view, stored={**view.stored, "direction": dataclasses.replace(field, packed=packed)},
                               retained_q=retained_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("aligned", [False, True], ids=["plain", "aligned"])
@pytest.mark.parametrize("uneven", [False, True], ids=["even-levels", "uneven-retained"])
def test_fused_decode_reads_a_rotated_packing_in_a_merged_group(dtype, aligned, uneven):
    """A merged group packed rotated (``rotated``, ``rotated-lloyd``): the packed directions hold ``e R``, the
    dense tail ``e``, retained vectors ``x R`` (uneven levels with ``rotated-lloyd``). The kernel reads them in
    the frame ``A R`` (alignment times packing rotation) after the launcher rotates the tail in."""
    from minicache.quant.lloyd import levels_table
    from minicache.quant.rotated import rotation_matrix
    from minicache.runtime.kernels.support import packing_unsupported
    from tests.alignment_helpers import random_rotations

    query, _, (qkeys, qvalues), mask = _quantized_case(dtype, 4, 2 if uneven else 3)
    assert qkeys.direction is not None and qkeys.direction.shape[-2] == 6, "a dense tail beside the packed chunks"
    if aligned:
        rot = random_rotations(2, 2, 64, seed=5, identity_last=False).to(DEVICE)
        qkeys, qvalues = with_rotation(qkeys, rot[0]), with_rotation(qvalues, rot[1])
    rotation = rotation_matrix(64).to(DEVICE)
    levels = levels_table(2, DEVICE) if uneven else None
    keys, values = (_rotated_packing(v, rotation, levels) for v in (qkeys, qvalues))
    for view, role in ((keys, "keys"), (values, "values")):
        assert packing_unsupported(view, role) is None
    assert attention.triton_unsupported(keys, values, DEVICE) is None
    got = fused_decode_attention(query, keys, values, mask, split_tokens=64)
    _assert_decode_close(got, query, keys, values, mask, dtype)
    # The blockwise torch path reads the same frame (the query rotated once, no packed block rotated back).
    _assert_decode_close(attention.decode_views(query, keys, values, mask, None, fused=False), query, keys, values,
                         mask, dtype)
    # The rotation and the levels change what the codes mean: reading them as before would be far off.
    unrotated = fused_decode_reference(query.float(), qkeys, qvalues, mask)
    assert (got.float() - unrotated).abs().max() > 10 * DECODE_TOL[dtype]


def _quantized_profile(groups=((0, 1),), scale_bits=None) -> MergeProfile:
    from minicache.profile import Quantization

    defaults = Defaults(residual_length=8, block_size=4, gamma=0.1)
    merged = tuple(MergeGroup(layers, defaults.settings(), defaults.settings()) for layers in groups)
    return MergeProfile(groups=merged, defaults=defaults).with_quantization(Quantization(4, 8, 8,
                                                                                         scale_bits=scale_bits))


def _fused_generate_matches_the_torch_path(monkeypatch, model, profile: MergeProfile) -> MiniCache:
    """Greedy generation of ``profile`` through the fused kernel equals the torch path's (tokens, scores within
    1e-4), and every layer of every decode step went to the kernel; returns the fused run's cache."""
    want = _generate(model, MiniCache(profile, model))
    fused_calls = _count_calls(monkeypatch, decode_module, "fused_decode_attention")
    assert attention.enable_fused_attention(model, force=True)
    cache = MiniCache(profile, model)
    got = _generate(model, cache)
    attention.disable_fused_attention(model)
    assert len(fused_calls) == 11 * 4 * 2, "every layer of every decode step (per sequence: the batch is padded)"
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    return cache


@pytest.mark.parametrize("scale_bits", [None, 8], ids=["float-scales", "8-bit-scales"])
def test_generate_fused_on_a_quantized_cache_matches_the_torch_path(monkeypatch, scale_bits):
    cache = _fused_generate_matches_the_torch_path(monkeypatch, _tiny_llama(kv_heads=2),
                                                   _quantized_profile(scale_bits=scale_bits))
    # Layers 0-1 merged and packed; layers 2-3 unmerged and packed: every layer attends on packed data.
    assert sequence(cache, 1).views(0)[0].qdirection is not None
    assert sequence(cache, 1).layers[2].qkeys is not None
    assert sequence(cache, 1).layers[2].qkeys.scale_bits == scale_bits
    assert sequence(cache, 1).views(0)[0].qdirection.scale_bits == scale_bits
    assert sequence(cache, 1).views(0)[0].retained_q.scale_bits == scale_bits


@pytest.mark.parametrize(("pre_rope", "scheme"), [(False, "rotated"), (True, "rotated"), (False, "rotated-lloyd")],
                         ids=["post-rope", "pre-rope", "lloyd"])
def test_generate_fused_on_rotated_layers_with_sinks_and_mixed_widths_matches_the_torch_path(monkeypatch, pre_rope,
                                                                                             scheme):
    from minicache.profile import Quantization

    model = _tiny_llama(kv_heads=2)
    quant = Quantization(bits=(4, 3, 4, 2), value_bits=(3, 4, 2, 2), group_size=8, residual_length=8,
                         scheme=scheme, sink_tokens=2, pre_rope_keys=pre_rope)
    cache = _fused_generate_matches_the_torch_path(monkeypatch, model,
                                                   _quantized_profile(groups=()).with_quantization(quant))
    assert sequence(cache, 1).layers[3].qkeys is not None and sequence(cache, 1).layers[3].sink_keys is not None


@pytest.mark.parametrize("scheme", ["rotated", "rotated-lloyd"])
def test_generate_fused_on_a_rotated_merged_group_matches_the_torch_path(monkeypatch, scheme):
    """Layers 0-1 merged and packed rotated (2 bits: uneven levels in the packed prefix and retained lists with
    ``rotated-lloyd``), layers 2-3 unmerged: every layer of every decode step is read by the kernel."""
    from minicache.profile import Quantization

    model = _tiny_llama(kv_heads=2)
    quant = Quantization(bits=(2, 2, 3, 4), value_bits=(2, 2, 4, 3), group_size=8, residual_length=8, scheme=scheme)
    cache = _fused_generate_matches_the_torch_path(monkeypatch, model, _quantized_profile().with_quantization(quant))
    keys = sequence(cache, 1).views(0)[0]
    assert keys.qdirection.rotation is not None and keys.retained_q.rotation is not None
    assert (keys.retained_q.levels is not None) == (scheme == "rotated-lloyd")


def test_interpreter_switched_on_after_triton_import_is_reported():
    script = (
        "import os, triton, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from minicache.runtime.kernels import why_unusable\n"
        "print(why_unusable('cpu'))\n"
    )
    proc = _run_clean(["-c", script], {}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TRITON_INTERPRET=1 was set after triton was imported" in proc.stdout
    # Set first, as tests/conftest.py does: usable.
    proc = _run_clean(["-c", script.replace("import os, triton, torch", "import os")], {}, timeout=120)
    assert proc.stdout.strip().endswith("None"), proc.stdout + proc.stderr[-2000:]
