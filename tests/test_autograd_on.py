"""A plain ``model(...)`` call with a MiniCache, outside ``torch.no_grad``, as a user's own evaluation loop makes it.

Autograd is then on (the weights require grad), and every in-place write the cache makes into what it
restores must be one autograd allows: a coded window with exact sinks once wrote into ``unbind`` views and
failed there. Each storage kind runs prefill and decode steps with autograd on and off, on the default and the
blockwise torch path, and must give the same logits both ways.
"""

import pytest
import torch

from minicache import MergeProfile, MiniCache
from minicache.profile import Quantization
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention
from tests.test_cache import profile_for
from tests.test_lowrank import _model
from tests.test_lowrank import _profile as lowrank_profile
from tests.test_predictive import _profile as predictive_profile

LOW_BIT = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2,
                       pre_rope_keys=True, window_bits=8, scale_bits=8)


def _storages(model) -> dict[str, MergeProfile]:
    return {
        "slerp": profile_for(model, groups=((2, 3),)),
        "slerp, packed 3-bit rotated, sinks, pre-RoPE keys, 8-bit window and scales":
            profile_for(model, groups=((2, 3),)).with_quantization(LOW_BIT),
        "unmerged, 6-bit window, sinks": MergeProfile().with_quantization(
            Quantization(bits=2, group_size=8, residual_length=8, scheme="rotated-lloyd", sink_tokens=2,
                         window_bits=6)),
        "lowrank": lowrank_profile(model, ((2, 3),)),
        "predictive residual, packed": predictive_profile(model, ((2, 3),), quantization=Quantization(
            bits=4, group_size=8, residual_length=8)),
    }


@pytest.mark.parametrize("path", ["default", "blockwise"])
def test_every_storage_runs_with_autograd_on_and_matches_no_grad(path):
    model = _model()
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    if path == "blockwise":
        enable_fused_attention(model, backend="torch")
    try:
        for name, profile in _storages(model).items():
            logits = {}
            for grad in (False, True):
                cache = MiniCache(profile, model)
                with torch.set_grad_enabled(grad):
                    steps = [model(input_ids=ids[:, :20], cache=cache).logits[:, -1]]
                    steps += [model(input_ids=ids[:, t : t + 1], cache=cache).logits[:, -1] for t in range(20, 30)]
                logits[grad] = torch.stack(steps).detach()
            assert cache.get_seq_length() == 30, name
            torch.testing.assert_close(logits[True], logits[False], msg=lambda m, name=name: f"{name}: {m}")
    finally:
        disable_fused_attention(model)
