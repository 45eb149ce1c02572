"""Streaming statistics of cross-layer KV similarity, for every adjacent pair, KV head, keys and values.

The calibration's diagnostic of a model (the report's similarity plots and table): every batch the
capture loop (:mod:`minicache.calibrate.capture`) prefills is measured pair by pair with the merge
methods' own math (:func:`minicache.methods.slerp.slerp_pair` and
:func:`~minicache.runtime.retention.retention_mask`), added into fixed-size float64 sums and dropped.
Sums from several processes combine with one all-reduce.

What is accumulated per (pair, component, head) makes the search's predictions cheap: since
``x̂ = m·e`` with ``∠(e, u_a) = tΩ`` and ``∠(e, u_b) = (1−t)Ω``, the squared restore error of a
token is ``m_a²·2(1−cos tΩ)`` for the shallower and ``m_b²·2(1−cos (1−t)Ω)`` for the deeper layer.
Summing these for a grid of ``t`` and ``γ`` (tokens retained at ``γ`` contribute no error) gives
the relative restore error of any grid point without touching the data again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from minicache.methods.base import all_reduce_sum
from minicache.methods.slerp import T_GRID, slerp_pair
from minicache.runtime.retention import retention_mask

__all__ = ["COMPONENTS", "GAMMA_GRID", "HIST_BINS", "PairStatistics", "capture_statistics"]

GAMMA_GRID: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
HIST_BINS = 50
COMPONENTS = ("keys", "values")


@dataclass
class PairStatistics:
    """Sums over captured tokens, indexed ``[pair, component, head, ...]``.

    ``pair`` p is layers (p, p+1); ``component`` 0 is keys, 1 values. All tensors are float64 sums
    so that they add across batches and processes.

    Attributes
    ----------
    tokens : torch.Tensor
        ``[P, 2, H]`` tokens counted (sink tokens excluded).
    cos_sum : torch.Tensor
        ``[P, 2, H]`` sum of cos Ω.
    angle_hist : torch.Tensor
        ``[P, 2, H, HIST_BINS]`` histogram of the angular distance Ω/π over ``[0, 1]``.
    log_ratio_sum, log_ratio_sq_sum : torch.Tensor
        ``[P, 2, H]`` sums of ``log(m_b / m_a)`` and its square.
    energy : torch.Tensor
        ``[P, 2, H, 2]`` sums of ``m_a²`` and ``m_b²``.
    retained : torch.Tensor
        ``[P, 2, H, G]`` tokens retained at each γ of ``gammas`` (forward window ``window``).
    error : torch.Tensor
        ``[P, 2, H, G, T, 2]`` squared restore error of the non-retained tokens, per γ, per t of
        ``ts``, per member (shallower, deeper).
    """

    num_layers: int
    num_heads: int
    ts: tuple[float, ...] = T_GRID
    gammas: tuple[float, ...] = GAMMA_GRID
    window: int = 64
    tokens: torch.Tensor = field(init=False)
    cos_sum: torch.Tensor = field(init=False)
    angle_hist: torch.Tensor = field(init=False)
    log_ratio_sum: torch.Tensor = field(init=False)
    log_ratio_sq_sum: torch.Tensor = field(init=False)
    energy: torch.Tensor = field(init=False)
    retained: torch.Tensor = field(init=False)
    error: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.num_layers < 2:
            raise ValueError(f"need at least 2 layers to have adjacent pairs, got {self.num_layers}")
        p, h, g, t = self.num_layers - 1, self.num_heads, len(self.gammas), len(self.ts)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.tokens = z(p, 2, h)
        self.cos_sum = z(p, 2, h)
        self.angle_hist = z(p, 2, h, HIST_BINS)
        self.log_ratio_sum = z(p, 2, h)
        self.log_ratio_sq_sum = z(p, 2, h)
        self.energy = z(p, 2, h, 2)
        self.retained = z(p, 2, h, g)
        self.error = z(p, 2, h, g, t, 2)

    # -- accumulation -------------------------------------------------------------------------
    def sums(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, name)
            for name in ("tokens", "cos_sum", "angle_hist", "log_ratio_sum", "log_ratio_sq_sum", "energy",
                         "retained", "error")
        }

    def add_pair(self, pair: int, component: int, x_a: torch.Tensor, x_b: torch.Tensor, sink_tokens: int = 1) -> None:
        """Add one batch of one pair's keys or values, ``x_a, x_b``: ``[B, H, T, D]``."""
        merged = slerp_pair(x_a, x_b, 0.5)
        omega = merged.distance * torch.pi  # [B, H, T]
        m_a, m_b = merged.magnitudes.unbind(-1)
        counted = torch.ones_like(omega, dtype=torch.bool)
        counted[..., :sink_tokens] = False  # sinks are always retained and never merged
        c = counted.double()
        self.tokens[pair, component] += c.sum(dim=(0, 2))
        self.cos_sum[pair, component] += (torch.cos(omega).double() * c).sum(dim=(0, 2))
        bins = (merged.distance * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        hist = torch.zeros(omega.shape[1], HIST_BINS, dtype=torch.float64)
        width = omega.shape[1]
        hist.scatter_add_(1, bins.transpose(0, 1).reshape(width, -1), c.transpose(0, 1).reshape(width, -1))
        self.angle_hist[pair, component] += hist
        log_ratio = (torch.log(m_b.clamp_min(1e-12)) - torch.log(m_a.clamp_min(1e-12))).double()
        self.log_ratio_sum[pair, component] += (log_ratio * c).sum(dim=(0, 2))
        self.log_ratio_sq_sum[pair, component] += (log_ratio.square() * c).sum(dim=(0, 2))
        energy = torch.stack([m_a.square(), m_b.square()], dim=-1).double()  # [B, H, T, 2]
        self.energy[pair, component] += (energy * c.unsqueeze(-1)).sum(dim=(0, 2))
        ts = torch.tensor(self.ts, dtype=torch.float64)
        om = omega.double().unsqueeze(-1)
        # [B, H, T, t, 2] relative squared error of each member at each t
        rel = torch.stack([2 * (1 - torch.cos(ts * om)), 2 * (1 - torch.cos((1 - ts) * om))], dim=-1)
        abs_err = rel * energy.unsqueeze(-2)
        sink = ~counted[:, 0, :]
        for g, gamma in enumerate(self.gammas):
            keep = retention_mask(merged.distance, gamma, window=self.window, sink=sink)
            merged_tok = (~keep & counted).double()
            self.retained[pair, component, :, g] += ((keep & counted).double()).sum(dim=(0, 2))
            self.error[pair, component, :, g] += (abs_err * merged_tok[..., None, None]).sum(dim=(0, 2))

    def add(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], sink_tokens: int = 1) -> None:
        """Add every adjacent pair of one batch: each layer's ``(keys, values)``, ``[B, H, T, D]``."""
        for pair in range(self.num_layers - 1):
            (k_a, v_a), (k_b, v_b) = kv[pair], kv[pair + 1]
            self.add_pair(pair, 0, k_a, k_b, sink_tokens)
            self.add_pair(pair, 1, v_a, v_b, sink_tokens)

    def all_reduce(self) -> None:
        """Sum the statistics of every process (no-op unless torch.distributed is initialised)."""
        all_reduce_sum(self.sums().values())

    # -- derived quantities ---------------------------------------------------------------------
    def mean_cosine(self) -> torch.Tensor:
        """``[P, 2, H]`` mean cos Ω between adjacent layers' directions."""
        return self.cos_sum / self.tokens.clamp_min(1)

    def retained_fraction(self) -> torch.Tensor:
        """``[P, 2, H, G]`` fraction of tokens retained at each γ."""
        return self.retained / self.tokens.clamp_min(1).unsqueeze(-1)

    def relative_error(self) -> torch.Tensor:
        """``[P, 2, G, T]`` restore error energy / KV energy of the pair, summed over heads and members."""
        err = self.error.sum(dim=(2, 5))  # [P, 2, G, T]
        energy = self.energy.sum(dim=(2, 3))  # [P, 2]
        return err / energy.clamp_min(1e-30)[..., None, None]

    def magnitude_log_ratio(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``log(m_b / m_a)``, ``[P, 2, H]`` each."""
        n = self.tokens.clamp_min(1)
        mean = self.log_ratio_sum / n
        var = (self.log_ratio_sq_sum / n - mean.square()).clamp_min(0)
        return mean, var.sqrt()

    def angle_quantiles(self, qs: Iterable[float] = (0.05, 0.5, 0.95)) -> torch.Tensor:
        """``[P, 2, H, len(qs)]`` quantiles of Ω/π from the histogram (bin-centre resolution)."""
        cdf = self.angle_hist.cumsum(-1) / self.angle_hist.sum(-1, keepdim=True).clamp_min(1)
        centres = (torch.arange(HIST_BINS, dtype=torch.float64) + 0.5) / HIST_BINS
        out = [centres[(cdf < q).sum(-1).clamp(max=HIST_BINS - 1)] for q in qs]
        return torch.stack(out, dim=-1)


def capture_statistics(
    model,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    window: int = 64,
    sink_tokens: int = 1,
    progress: bool = True,
) -> PairStatistics:
    """Prefill ``windows`` (``[N, T]`` token ids) in batches and accumulate :class:`PairStatistics`.

    Only one batch's KV is alive at a time. Call :meth:`PairStatistics.all_reduce` afterwards when
    running data-parallel.
    """
    from minicache.calibrate.capture import prefill_batches
    from minicache.model_spec import ModelSpec

    spec = ModelSpec.from_config(model)
    stats = PairStatistics(num_layers=spec.num_layers, num_heads=spec.kv_heads, window=window)
    for _, _, kv in prefill_batches(model, windows, batch_size=batch_size, progress=progress,
                                    desc="capturing KV statistics"):
        stats.add(kv, sink_tokens)
    return stats
