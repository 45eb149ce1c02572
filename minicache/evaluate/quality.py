"""Quality of a merge profile against the full cache, on prefix + continuation windows.

For each window the prefix goes through the cache (merged), then the continuation is fed
teacher-forced in chunks through the same cache (so decode-time merging happens too) and scored
against one forward pass of the whole window with the full cache: perplexity of the continuation,
KL divergence of next-token distributions, top-1 agreement. The cache's memory is reported after
the prefix. The calibrator calls this same code to measure candidate profiles.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from minicache.profile import MergeProfile
from minicache.runtime.cache import MiniCache
from minicache.runtime.memory import cache_bytes, compression_ratio


@dataclass(frozen=True)
class QualityResult:
    """Metrics of one profile on a set of windows (relative values: 0.01 = +1 %).

    ``ppl_increase_ci95`` and ``kl_mean_ci95`` are 95 % intervals of ``ppl_increase`` and
    ``kl_mean`` from a bootstrap over the windows (:func:`ppl_increase_interval`,
    :func:`window_mean_interval`; None for a single window): how far the point estimate could move
    on other text like this. The calibrator accepts a profile on the upper end.
    ``window_nll_increase``: each window's mean NLL increase over the full cache (nats per token), so that
    two profiles scored on the same windows can be compared paired (:func:`paired_ppl_difference`).
    """

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
    ppl_increase_ci95: tuple[float, float] | None = None
    kl_mean_ci95: tuple[float, float] | None = None
    window_nll_increase: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("ppl_increase_ci95", "kl_mean_ci95", "window_nll_increase"):
            if out[name] is not None:
                out[name] = list(out[name])  # JSON and YAML have lists, not tuples
        return out

    def interval_text(self) -> str:
        """``"95 % interval +0.10 %..+0.80 %, 2048 tokens in 8 windows"`` (or just the token count)."""
        where = f"{self.tokens_scored} tokens in {self.windows} windows"
        if self.ppl_increase_ci95 is None:
            return where
        return f"95 % interval {format_interval(self.ppl_increase_ci95)}, {where}"


@dataclass
class ReferenceRun:
    """Full-cache log-probabilities of the continuation positions, computed once per data set.

    Attributes
    ----------
    log_probs : list[torch.Tensor]
        One ``[batch, continuation_length, vocab]`` float32 tensor per batch of windows.
    nll : torch.Tensor
        ``[num_windows, continuation_length]`` negative log-likelihood of the true tokens.
    prefix_kv : list or None
        With ``keep_prefix_kv``: per batch, per layer, the exact prefix ``(keys, values)``, each
        ``[batch, kv_heads, prefix_length, head_dim]``. Prefill is exact in MiniCache (merging
        happens after the prefill's attention), so a profile's cache can be filled from these
        through its own ``update`` instead of running the prefix through the model again: the
        calibrator scores many profiles on the same windows and saves two thirds of each pass.
    """

    log_probs: list[torch.Tensor]
    nll: torch.Tensor
    prefix_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None


def _batches(windows: torch.Tensor, batch_size: int):
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def _logits_kwargs(model, keep: int) -> dict:
    # Only the last `keep` positions' logits are needed; models without the argument compute all.
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _replayable(cache: DynamicCache) -> bool:
    """Whether every layer of a filled cache holds its whole prefix (no sliding-window layer)."""
    return all(not getattr(layer, "is_sliding", False) for layer in cache.layers)


# ---- metrics (pure functions, unit-tested on known answers) -------------------------------------
def token_nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the true tokens: ``log_probs`` ``[..., V]``, ``target`` ``[...]`` → ``[...]``."""
    return -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)`` over all positions of ``nll`` (any shape), accumulated in float64."""
    return math.exp(nll.double().mean().item())


def format_interval(interval: Sequence[float]) -> str:
    """``(low, high)`` relative values as ``"+0.28%..+0.75%"``."""
    low, high = interval
    return f"{low:+.2%}..{high:+.2%}"


def _bootstrap_means(per_window: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """Means of ``resamples`` resamples (with replacement) of ``per_window`` ``[windows]`` → ``[resamples]``."""
    windows = per_window.shape[0]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(windows, (resamples, windows), generator=generator)
    return per_window.double()[picks].mean(dim=1)


def _percentiles(values: torch.Tensor, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high


def window_mean_interval(
    values: torch.Tensor, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of the mean of ``values`` ``[windows, tokens]`` from a bootstrap over windows.

    Returns None with fewer than 2 windows.
    """
    if values.dim() != 2:
        raise ValueError(f"expected a [windows, tokens] tensor, got {tuple(values.shape)}")
    if values.shape[0] < 2:
        return None
    return _percentiles(_bootstrap_means(values.double().mean(dim=1), resamples, seed), confidence)


def ppl_increase_interval(
    nll_full: torch.Tensor, nll: torch.Tensor, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of the perplexity increase from a paired bootstrap over windows.

    Windows, not tokens, are resampled: tokens of one window are correlated (one merged prefix
    serves them all), windows of different text much less so. Both runs are resampled together
    (paired), so what is shared between them, the text's own difficulty, cancels.

    Parameters
    ----------
    nll_full, nll : torch.Tensor
        ``[windows, tokens]`` negative log-likelihoods of the same tokens, full cache and profile.

    Returns
    -------
    tuple of float or None
        ``(low, high)`` relative increases (0.01 = +1 %); None with fewer than 2 windows.
    """
    if nll.shape != nll_full.shape or nll.dim() != 2:
        raise ValueError(f"expected two [windows, tokens] tensors of one shape, got {tuple(nll_full.shape)} "
                         f"and {tuple(nll.shape)}")
    if nll.shape[0] < 2:
        return None
    difference = nll.double().mean(dim=1) - nll_full.double().mean(dim=1)  # [windows]
    # equal tokens per window: the exp of the mean difference is the ratio of perplexities
    return _percentiles(torch.expm1(_bootstrap_means(difference, resamples, seed)), confidence)


def paired_ppl_difference(
    increase_a: Sequence[float], increase_b: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float] | None]:
    """How much more perplexity profile B costs than profile A on the same windows, with a paired interval.

    Parameters
    ----------
    increase_a, increase_b : sequence of float
        ``[windows]`` each window's mean NLL increase over the full cache
        (:attr:`QualityResult.window_nll_increase`), the same windows in the same order.

    Returns
    -------
    (float, tuple of float or None)
        ``ppl_B / ppl_A - 1`` (0.01 = B's perplexity 1 % above A's), and its percentile interval from a
        bootstrap over windows, both profiles resampled together (what the windows share cancels, as in
        :func:`ppl_increase_interval`); None with fewer than 2 windows.
    """
    a, b = torch.tensor(list(increase_a), dtype=torch.float64), torch.tensor(list(increase_b), dtype=torch.float64)
    if a.dim() != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"expected two per-window lists of one length, got {len(increase_a)} and {len(increase_b)}")
    difference = b - a
    point = math.expm1(difference.mean().item())
    if difference.numel() < 2:
        return point, None
    return point, _percentiles(torch.expm1(_bootstrap_means(difference, resamples, seed)), confidence)


def kl_divergence(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(P_ref ‖ P)`` in nats per position: log-probs ``[..., V]`` → ``[...]``.

    Clamped at 0: float rounding can make the KL of (nearly) identical distributions a tiny
    negative number, and a KL is never negative.
    """
    return (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).clamp_min(0.0)


def top1_agreement(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Whether both distributions have the same most likely token: ``[..., V]`` → bool ``[...]``."""
    return log_probs.argmax(-1) == ref_log_probs.argmax(-1)


@torch.inference_mode()
def reference_run(
    model, windows: torch.Tensor, prefix_length: int, batch_size: int = 4, *, keep_prefix_kv: bool = False
) -> ReferenceRun:
    """One forward pass of each whole window with a full cache (the exact baseline).

    ``keep_prefix_kv`` also keeps the exact prefix keys/values (see :class:`ReferenceRun`) when
    every layer of the model keeps its whole context; memory: the prefix's full KV cache.
    """
    log_probs, nll, prefix_kv = [], [], []
    device = next(model.parameters()).device
    continuation = windows.shape[1] - prefix_length
    for batch in _batches(windows, batch_size):
        batch = batch.to(device)
        cache = DynamicCache(config=model.config) if keep_prefix_kv else None
        logits = model(
            input_ids=batch, attention_mask=torch.ones_like(batch), cache=cache, use_cache=keep_prefix_kv,
            **_logits_kwargs(model, continuation + 1),
        ).logits
        lp = F.log_softmax(logits[:, -continuation - 1 : -1].float(), dim=-1)
        log_probs.append(lp.cpu())
        nll.append(token_nll(lp, batch[:, prefix_length:]).cpu())
        if prefix_kv is not None and cache is not None and _replayable(cache):
            prefix_kv.append(
                [(layer.keys[..., :prefix_length, :].clone(), layer.values[..., :prefix_length, :].clone())
                 for layer in cache.layers]
            )
        else:
            prefix_kv = None
    return ReferenceRun(log_probs=log_probs, nll=torch.cat(nll), prefix_kv=prefix_kv or None)


def continuation_kwargs(cache, seen: int, chunk: torch.Tensor) -> dict:
    """Mask and positions of a continuation chunk after ``seen`` tokens.

    A cache that evicted tokens (a kvpress press) holds fewer than ``seen``: the chunk's positions
    are then given explicitly (RoPE of the true position) and the mask left to the cache's length.
    """
    batch, length = chunk.shape
    held = cache.get_seq_length()
    if held == seen:
        return {"attention_mask": torch.ones(batch, seen + length, dtype=torch.long, device=chunk.device)}
    lengths = {layer.get_seq_length() for layer in cache.layers if not getattr(layer, "is_sliding", False)}
    if len(lengths) > 1:  # one causal mask serves every layer
        raise ValueError(f"the cache evicted tokens unevenly: its layers hold {sorted(lengths)} of {seen} tokens; "
                         "only caches that hold as many tokens in every layer can be scored")
    positions = torch.arange(seen, seen + length, device=chunk.device).expand(batch, -1)
    return {"position_ids": positions}


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
    prefill_context: Callable[[object], AbstractContextManager] | None = None,
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
    prefill_context : callable, optional
        ``model -> context manager`` entered around the prefix's forward pass (a kvpress press
        compresses the cache there, :mod:`minicache.evaluate.peers`). A cache left holding fewer
        positions than it has seen is continued with explicit positions (RoPE of the true
        position, causal mask over what it holds) and its full size counted from the prefix.
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
    prefix_kv = reference.prefix_kv or [None] * len(reference.log_probs)
    batches = zip(_batches(windows, batch_size), reference.log_probs, prefix_kv, strict=True)
    for batch, ref_lp, kv in batches:
        batch = batch.to(device)
        cache = factory(profile, model)
        prefix = batch[:, :prefix_length]
        if kv is not None and isinstance(cache, MiniCache):
            # Exact prefill, replayed: the same `update` calls the model's prefill would make.
            cache.observe_attention_mask(torch.ones_like(prefix))
            for layer_idx, (keys, values) in enumerate(kv):
                cache.update(keys.to(device), values.to(device), layer_idx)
            first = ref_lp[:, :1].to(device)  # the prefix's last logits are the full run's
        else:
            with prefill_context(model) if prefill_context is not None else nullcontext():
                out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), cache=cache,
                            **_logits_kwargs(model, 1))
            first = out.logits[:, -1:]
        held, full = cache_bytes(cache, model.config, prefix.shape[0], next(model.parameters()).dtype,
                                 seen=prefix_length)
        kv_bytes += held
        kv_bytes_full += full
        logits = [first]
        seen = prefix_length
        for start in range(prefix_length, batch.shape[1] - 1, chunk_size):
            chunk = batch[:, start : min(start + chunk_size, batch.shape[1] - 1)]
            logits.append(model(input_ids=chunk, cache=cache, **continuation_kwargs(cache, seen, chunk)).logits)
            seen += chunk.shape[1]
        lp = F.log_softmax(torch.cat([x.float() for x in logits], dim=1), dim=-1).cpu()
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
        ppl_increase_ci95=ppl_increase_interval(reference.nll, nll_t),
        kl_mean_ci95=window_mean_interval(kl_t),
        window_nll_increase=tuple((nll_t.double().mean(dim=1) - reference.nll.double().mean(dim=1)).tolist()),
    )


def full_cache_factory(profile: MergeProfile, model) -> DynamicCache:
    """Cache factory for the ``--baseline full`` run: transformers' own `DynamicCache`."""
    return DynamicCache(config=model.config)


#: transformers' `QuantizedCache` backends (``--baseline quantized-cache-<backend>``).
QUANTIZED_CACHE_BACKENDS = ("fp8", "quanto", "hqq")


def quantized_cache_factory(
    backend: str, bits: int = 4, group_size: int = 64, residual_length: int = 128
) -> Callable[[MergeProfile, object], object]:
    """Cache factory for transformers' `QuantizedCache` (the comparison baseline of issue 6).

    ``fp8`` quantizes per tensor and takes no group-wise options (it runs on CPU); ``quanto`` and
    ``hqq`` need their packages and quantize keys and values along ``axis 0`` in groups.
    """
    if backend not in QUANTIZED_CACHE_BACKENDS:
        raise ValueError(f"unknown QuantizedCache backend {backend!r}; allowed: {', '.join(QUANTIZED_CACHE_BACKENDS)}")
    from transformers import QuantizedCache

    def factory(profile: MergeProfile, model):
        if backend == "fp8":
            return QuantizedCache("fp8", model.config)
        return QuantizedCache(
            backend, model.config, nbits=bits, q_group_size=group_size, residual_length=residual_length
        )

    return factory
