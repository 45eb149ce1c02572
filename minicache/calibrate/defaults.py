"""The calibration's defaults, defined once: ``calibrate()`` and ``minicache-calibrate`` both read them.

Standard library only, so that the command line parses (and answers ``--help``) without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CALIBRATION_DEFAULTS", "KEY_ROPE_CHOICES", "KEY_ROPE_DEFAULT", "CalibrationDefaults"]

#: Which keys the options of RoPE-sensitive methods (low rank) see: as the cache receives them, before
#: RoPE, or both (:mod:`minicache.calibrate.capture`); ``auto`` (the default): before RoPE where the model's
#: RoPE can be removed (a RoPE whose angles depend on the position alone) and the key bases are PCA.
KEY_ROPE_CHOICES = ("post", "pre", "both")
KEY_ROPE_DEFAULT = "auto"


@dataclass(frozen=True)
class CalibrationDefaults:
    """What a calibration does when nothing else is said.

    Attributes
    ----------
    budget, budget_metric
        Largest quality loss accepted on held-out data: ``ppl_increase`` 0.01 = +1 % perplexity.
    kl_guard, kl_guard_without_data
        With a perplexity budget, also hold ``expm1(kl_guard * KL)`` to it (0: off; see
        :class:`~minicache.calibrate.search.Budget`). ``minicache-calibrate`` without ``--data`` uses
        ``kl_guard_without_data``: the built-in corpus stands in for text nobody has seen, so its promise
        is meant for any kind of text (on the kinds we measured, the loss rose up to 3.7 times the held-out
        KL's upper end).
    num_samples, max_length, eval_windows, held_out, seed
        Calibration windows (of ``max_length`` tokens) and held-out windows; the share of samples held
        out and the seed of that split.
    probes
        Single-group measurements that calibrate the search's prediction.
    align
        Fit each method's tensors (SLERP: an orthogonal alignment per group, KV head and K/V) and let the
        search use them where they restore better.
    max_group_size
        Largest group of adjacent layers the search considers.
    methods
        Merge methods the search may choose from.
    batch_size
        Windows per forward pass.
    """

    budget: float = 0.01
    budget_metric: str = "ppl_increase"
    kl_guard: float = 0.0
    kl_guard_without_data: float = 4.0
    num_samples: int = 32
    max_length: int = 768
    eval_windows: int = 8
    held_out: float = 0.25
    seed: int = 0
    probes: int = 6
    align: bool = True
    max_group_size: int = 3
    methods: tuple[str, ...] = ("slerp",)
    batch_size: int = 4


CALIBRATION_DEFAULTS = CalibrationDefaults()
