"""Is the sample data large enough for a calibration? Checked before the model loads, again once tokenized.

A calibration needs tokens twice: calibration windows for the statistics (and the methods' fitted
tensors), and held-out windows on which every candidate is measured. The search accepts a set only
when the upper end of its 95 % interval (bootstrap over held-out windows) is within the budget, so
the number of held-out windows decides how much of the budget the point estimate may use: on
SmolLM2 the damage of a merge varies between windows with a standard deviation of about 1.5 times
its mean (shipped profile: 0.68–1.06 % against +0.52–0.69 % on 32–64 windows of unseen text), so
with ``n`` windows the accepted damage is at most about ``budget / (1 + 1.96 · 1.5 / √n)``: half the
budget with 8 windows, a third with 2.

Standard library only (plus :mod:`minicache.data`), so that the command line can check before
importing torch or loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from minicache.data import DataError, Sample, split_samples

__all__ = [
    "CHARS_PER_TOKEN",
    "MIN_CALIBRATION_WINDOWS",
    "MIN_HELD_OUT_WINDOWS",
    "DataCheck",
    "check_data",
    "usable_share",
]

#: Below this many calibration windows the statistics are refused (unless forced): the capture fits
#: tensors on one half and measures candidates on the other.
MIN_CALIBRATION_WINDOWS = 4
#: Below this many held-out windows the bootstrap interval is refused (unless forced): with 2 or 3
#: windows it has only a handful of distinct resamples.
MIN_HELD_OUT_WINDOWS = 4
#: Characters per token assumed before a tokenizer is loaded (English prose with a BPE vocabulary:
#: 4–5; code and other languages: fewer, so this rather overestimates tokens than warns wrongly).
CHARS_PER_TOKEN = 4.0
#: Standard deviation of a merge's per-window damage relative to its mean (SmolLM2, see the module).
DAMAGE_SPREAD = 1.5


def usable_share(held_out_windows: int) -> float:
    """Share of the budget the point estimate may use when the interval's upper end must fit."""
    if held_out_windows < 2:
        return 0.0
    return 1.0 / (1.0 + 1.96 * DAMAGE_SPREAD / math.sqrt(held_out_windows))


@dataclass(frozen=True)
class DataCheck:
    """Windows the data gives against those asked for.

    Attributes
    ----------
    available_calibration, available_held_out : int
        Windows of ``max_length`` tokens each part of the data could give.
    wanted_calibration, wanted_held_out : int
        ``num_samples`` and ``eval_windows``.
    calibration_tokens, held_out_tokens : int
        Tokens in each part (estimated when ``estimated``).
    estimated : bool
        Token counts from characters (:data:`CHARS_PER_TOKEN`), not from the tokenizer.
    """

    available_calibration: int
    available_held_out: int
    wanted_calibration: int
    wanted_held_out: int
    calibration_tokens: int
    held_out_tokens: int
    max_length: int
    held_out: float
    estimated: bool = False

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out must be a share in (0, 1), got {self.held_out}")

    @property
    def calibration_windows(self) -> int:
        return min(self.available_calibration, self.wanted_calibration)

    @property
    def held_out_windows(self) -> int:
        return min(self.available_held_out, self.wanted_held_out)

    @property
    def refused(self) -> bool:
        """Below a floor: the calibration cannot give a result worth its promise."""
        return (self.calibration_windows < MIN_CALIBRATION_WINDOWS
                or self.held_out_windows < MIN_HELD_OUT_WINDOWS)

    def _more_tokens(self, windows: int, have: int, share: float) -> int:
        """Tokens of sample data to add (both parts) so that one part reaches ``windows`` windows."""
        missing = max(windows * self.max_length - have, 0)
        return math.ceil(missing / share)

    def problems(self) -> list[str]:
        """One line per shortfall of the data, saying what to add; empty when it gives what was asked for."""
        about = "about " if self.estimated else ""
        lines = []
        if self.available_calibration < self.wanted_calibration:
            add = self._more_tokens(self.wanted_calibration, self.calibration_tokens, 1 - self.held_out)
            lines.append(
                f"calibration: {about}{self.available_calibration} windows of {self.max_length} tokens for the "
                f"statistics ({self.wanted_calibration} asked for, --num-samples): add {about}{add:,} tokens of "
                f"sample text, or lower --num-samples / --max-length"
            )
        if self.available_held_out < self.wanted_held_out:
            add = self._more_tokens(self.wanted_held_out, self.held_out_tokens, self.held_out)
            lines.append(
                f"held-out: {about}{self.available_held_out} windows of {self.max_length} tokens to verify quality "
                f"({self.wanted_held_out} asked for, --eval-windows): the profile may then use only "
                f"~{usable_share(self.held_out_windows):.0%} of the budget (the upper end of the interval must fit; "
                f"{usable_share(self.wanted_held_out):.0%} with {self.wanted_held_out}); add {about}{add:,} tokens "
                f"of sample text"
            )
        return lines

    def enforce(self, allow_small_data: bool, warn: Callable[[str], None]) -> None:
        """Warn of every shortfall (``"warning: ..."`` lines), then refuse below the floor unless allowed.

        Raises
        ------
        DataError
            :attr:`refused` and not ``allow_small_data`` (the message is :meth:`refusal`).
        """
        for line in self.problems():
            warn(f"warning: {line}")
        if self.refused and not allow_small_data:
            raise DataError(self.refusal())

    def refusal(self) -> str:
        """The one-line error when :attr:`refused`: too little data, or too few windows asked for."""
        floors = (f"at least {MIN_CALIBRATION_WINDOWS} calibration and {MIN_HELD_OUT_WINDOWS} held-out windows are "
                  f"needed for statistics and a quality interval worth stating")
        if (self.available_calibration < MIN_CALIBRATION_WINDOWS
                or self.available_held_out < MIN_HELD_OUT_WINDOWS):
            source = (f" (estimated from about {self.calibration_tokens + self.held_out_tokens:,} tokens)"
                      if self.estimated else "")
            return (
                f"too little sample data: {self.available_calibration} calibration and {self.available_held_out} "
                f"held-out windows of {self.max_length} tokens{source}; {floors}. Add sample text, lower "
                f"--max-length, or pass --allow-small-data to calibrate anyway"
            )
        return (f"--num-samples {self.wanted_calibration} / --eval-windows {self.wanted_held_out}: {floors}; "
                f"ask for more, or pass --allow-small-data to calibrate with so few anyway")


def check_data(
    samples: list[Sample],
    *,
    max_length: int,
    num_samples: int,
    eval_windows: int,
    held_out: float,
    seed: int,
    count_tokens: Callable[[Sample], int] | None = None,
) -> DataCheck:
    """Windows each part of ``samples`` gives, split as :func:`~minicache.calibrate.api.calibrate` splits them.

    Parameters
    ----------
    count_tokens : callable, optional
        Tokens of one sample (with the tokenizer). Default: exact for ``input_ids`` samples, estimated
        from characters for text and messages (no tokenizer needed, so it runs before the model loads).
    """
    estimated = count_tokens is None and any(s.input_ids is None for s in samples)
    count = count_tokens or _estimated_tokens
    calib, held = split_samples(samples, held_out, seed)
    # +1 per sample: samples are joined with an end-of-sequence token between them (token_windows)
    calib_tokens = sum(count(s) + 1 for s in calib)
    held_tokens = sum(count(s) + 1 for s in held)
    return DataCheck(
        available_calibration=calib_tokens // max_length,
        available_held_out=held_tokens // max_length,
        wanted_calibration=num_samples,
        wanted_held_out=eval_windows,
        calibration_tokens=calib_tokens,
        held_out_tokens=held_tokens,
        max_length=max_length,
        held_out=held_out,
        estimated=estimated,
    )


def _estimated_tokens(sample: Sample) -> int:
    if sample.input_ids is not None:
        return len(sample.input_ids)
    if sample.messages is not None:
        # content plus a few template tokens per turn
        return sum(int(len(str(m.get("content", ""))) / CHARS_PER_TOKEN) + 4 for m in sample.messages)
    return int(len(sample.text) / CHARS_PER_TOKEN)
