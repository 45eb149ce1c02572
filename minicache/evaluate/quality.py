"""Quality of a merge profile against the full cache, on prefix + continuation windows.

For each window the prefix goes through the cache (merged), then the continuation is fed
teacher-forced in chunks through the same cache (so decode-time merging happens too) and scored
against one forward pass of the whole window with the full cache: perplexity of the continuation,
KL divergence of next-token distributions, top-1 agreement. The cache's memory is reported after
the prefix. The calibrator calls this same code to measure candidate profiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from minicache.profile import MergeProfile
from minicache.runtime.cache import MiniCache


@dataclass(frozen=True)
class QualityResult:
    """Metrics of one profile on a set of windows (relative values: 0.01 = +1 %)."""

    ppl_full: float
    ppl: float
    ppl_increase: float
    kl_mean: float
    kl_q95: float
    top1_agreement: float
    kv_bytes_full: int
    kv_bytes: int
    compression_ratio: float
    tokens_scored: int
    windows: int
    prefix_length: int
    continuation_length: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReferenceRun:
    """Full-cache log-probabilities of the continuation positions, computed once per data set.

    Attributes
    ----------
    log_probs : list[torch.Tensor]
        One ``[batch, continuation_length, vocab]`` float32 tensor per batch of windows.
    nll : torch.Tensor
        ``[num_windows, continuation_length]`` negative log-likelihood of the true tokens.
    """

    log_probs: list[torch.Tensor]
    nll: torch.Tensor


def _batches(windows: torch.Tensor, batch_size: int):
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def _continuation_log_probs(logits: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Log-probs at the positions that predict the continuation tokens: ``[B, C, V]``."""
    return F.log_softmax(logits[:, prefix_length - 1 : -1].float(), dim=-1)


# ---- metrics (pure functions, unit-tested on known answers) -------------------------------------
def token_nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the true tokens: ``log_probs`` ``[..., V]``, ``target`` ``[...]`` → ``[...]``."""
    return -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)`` over all positions of ``nll`` (any shape), accumulated in float64."""
    return math.exp(nll.double().mean().item())


def kl_divergence(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(P_ref ‖ P)`` in nats per position: log-probs ``[..., V]`` → ``[...]``.

    Clamped at 0: float rounding can make the KL of (nearly) identical distributions a tiny
    negative number, and a KL is never negative.
    """
    return (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).clamp_min(0.0)


def top1_agreement(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Whether both distributions have the same most likely token: ``[..., V]`` → bool ``[...]``."""
    return log_probs.argmax(-1) == ref_log_probs.argmax(-1)


def cache_bytes(cache) -> tuple[int, int]:
    """``(bytes held, bytes a DynamicCache would hold)`` of a cache after use.

    A :class:`MiniCache` reports both (``memory_report``); a plain transformers cache holds
    everything at full size.
    """
    if isinstance(cache, MiniCache):
        report = cache.memory_report()
        return int(report["kv_bytes"]), int(report["kv_bytes_full"])
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))
    return int(held), int(held)


def compression_ratio(kv_bytes_full: int, kv_bytes: int) -> float:
    """Full-cache bytes ÷ bytes held (1.0 for an empty cache)."""
    return kv_bytes_full / kv_bytes if kv_bytes else 1.0


@torch.inference_mode()
def reference_run(model, windows: torch.Tensor, prefix_length: int, batch_size: int = 4) -> ReferenceRun:
    """One forward pass of each whole window with a full cache (the exact baseline)."""
    log_probs, nll = [], []
    device = next(model.parameters()).device
    for batch in _batches(windows, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
        lp = _continuation_log_probs(logits, prefix_length)
        log_probs.append(lp.cpu())
        nll.append(token_nll(lp, batch[:, prefix_length:]).cpu())
    return ReferenceRun(log_probs=log_probs, nll=torch.cat(nll))


@torch.inference_mode()
def evaluate_profile(
    model,
    windows: torch.Tensor,
    prefix_length: int,
    profile: MergeProfile,
    *,
    reference: ReferenceRun | None = None,
    batch_size: int = 4,
    chunk_size: int = 64,
    cache_factory: Callable[[MergeProfile, object], object] | None = None,
    allow_model_mismatch: bool = False,
) -> QualityResult:
    """Measure ``profile`` on ``windows`` (``[N, prefix_length + continuation_length]`` token ids).

    Parameters
    ----------
    reference : ReferenceRun, optional
        Full-cache results for the same windows; computed here when absent. Pass it when scoring
        several profiles on the same data (the calibrator does).
    chunk_size : int
        Continuation tokens fed per forward pass. Smaller is closer to token-by-token decoding.
    cache_factory : callable, optional
        ``(profile, model) -> Cache``; defaults to :class:`MiniCache`.
    """
    if windows.dim() != 2 or windows.shape[1] <= prefix_length:
        raise ValueError(f"windows must be [N, prefix + continuation] with a continuation, got {tuple(windows.shape)}")
    if windows.shape[0] == 0:
        raise ValueError("no windows to evaluate: the data is shorter than one prefix + continuation window")
    reference = reference or reference_run(model, windows, prefix_length, batch_size)
    factory = cache_factory or (lambda p, m: MiniCache(p, m, allow_model_mismatch=allow_model_mismatch))
    device = next(model.parameters()).device
    nll, kl, agree = [], [], []
    kv_bytes = kv_bytes_full = 0
    for batch, ref_lp in zip(_batches(windows, batch_size), reference.log_probs, strict=True):
        batch = batch.to(device)
        cache = factory(profile, model)
        prefix = batch[:, :prefix_length]
        out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), cache=cache)
        held, full = cache_bytes(cache)
        kv_bytes += held
        kv_bytes_full += full
        logits = [out.logits[:, -1:]]
        seen = prefix_length
        for start in range(prefix_length, batch.shape[1] - 1, chunk_size):
            chunk = batch[:, start : min(start + chunk_size, batch.shape[1] - 1)]
            seen += chunk.shape[1]
            mask = torch.ones(batch.shape[0], seen, dtype=torch.long, device=device)
            logits.append(model(input_ids=chunk, attention_mask=mask, cache=cache).logits)
        lp = F.log_softmax(torch.cat(logits, dim=1).float(), dim=-1).cpu()
        nll.append(token_nll(lp, batch[:, prefix_length:].cpu()))
        kl.append(kl_divergence(ref_lp, lp))
        agree.append(top1_agreement(ref_lp, lp))
    nll_t, kl_t, agree_t = torch.cat(nll), torch.cat(kl), torch.cat(agree)
    ppl_full = perplexity(reference.nll)
    ppl = perplexity(nll_t)
    return QualityResult(
        ppl_full=ppl_full,
        ppl=ppl,
        ppl_increase=ppl / ppl_full - 1.0,
        kl_mean=kl_t.double().mean().item(),
        kl_q95=torch.quantile(kl_t.flatten().double(), 0.95).item(),
        top1_agreement=agree_t.double().mean().item(),
        kv_bytes_full=int(kv_bytes_full),
        kv_bytes=int(kv_bytes),
        compression_ratio=compression_ratio(kv_bytes_full, kv_bytes),
        tokens_scored=int(nll_t.numel()),
        windows=int(windows.shape[0]),
        prefix_length=prefix_length,
        continuation_length=windows.shape[1] - prefix_length,
    )


def full_cache_factory(profile: MergeProfile, model) -> DynamicCache:
    """Cache factory for the ``--baseline full`` run: transformers' own `DynamicCache`."""
    return DynamicCache(config=model.config)
