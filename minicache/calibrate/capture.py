"""The calibration's one capture loop: prefill calibration windows and hand each batch's KV to statistics.

:func:`prefill_batches` runs the model on ``[N, T]`` token windows a batch at a time with a plain
`DynamicCache` and yields every layer's exact keys and values; only one batch's KV is alive at a
time. Everything the calibrator measures on the model's KV is a sum over these batches:

* :class:`~minicache.calibrate.statistics.PairStatistics`: similarity of adjacent layers (the report);
* the merge methods' fit statistics (e.g. SLERP's cross-covariances for alignment), over all windows;
* :class:`RestoreErrors`: the restore error of every candidate group under every parameter option the
  methods offer, measured on the second half of the windows with tensors fitted on the first half
  (out-of-sample, so that fitted alignment does not look better than it is).

Methods whose stored keys depend on RoPE (:attr:`~minicache.methods.MergeMethod.rope_sensitive`) can
have their key options offered before RoPE as well (``key_rope``): their fit statistics then also see
every batch with the keys' RoPE removed (calibration windows start at position 0, so a token's
position is its index), and those options are measured on such keys.

:class:`CalibrationCapture` runs the last two in the order that keeps every sum reproducible.

Data-parallel (``torch.distributed`` initialised with several processes): each process captures its
share of the windows, and every sum all-reduces; the fit statistics of the first half all-reduce
once more at the phase boundary (:meth:`CalibrationCapture.start_measurement`), so that every
process measures the candidates with the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from minicache.calibrate.defaults import KEY_ROPE_CHOICES
from minicache.methods import COMPONENTS, MergeMethod, MethodParams
from minicache.methods.base import FitStatistic, all_reduce_sum, energy, process_group
from minicache.runtime.retention import retention_mask
from minicache.runtime.rope import RopeAngles

__all__ = ["CalibrationCapture", "Option", "RestoreErrors", "candidate_runs", "prefill_batches", "progress_bar",
           "without_rope"]

KV = Sequence[tuple[torch.Tensor, torch.Tensor]]


def without_rope(kv: KV, rope: RopeAngles) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``kv`` with every layer's keys turned back to before RoPE (float32; positions ``0 ..``: a prefill
    of whole windows)."""
    return [(rope.remove(keys, 0), values) for keys, values in kv]


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "tok"):
    """A tqdm bar (when ``enabled`` and tqdm is installed), else an object with the same two methods."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False)
        except ImportError:
            pass
    return _NoProgress()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


QUERY_CAPTURE = "minicache_query_capture"


@contextmanager
def hooked_queries(model, listener: Callable[[int, torch.Tensor], None] | None):
    """Within the block, ``listener(layer index, queries [B, Hq, T, D])`` sees every attention call's
    post-RoPE queries (a wrapper around the model's attention function; sdpa when that is eager).

    Yields whether the queries are seen: False (and nothing changed) when ``listener`` is None or
    the model's attention implementation cannot be switched.
    """
    if listener is None:
        yield False
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS.get(previous, sdpa_attention_forward)
    mask = ALL_MASK_ATTENTION_FUNCTIONS.get(previous, sdpa_mask) if previous in ALL_ATTENTION_FUNCTIONS else sdpa_mask

    def forward(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is not None:
            listener(int(layer), query)
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(QUERY_CAPTURE, forward)
    AttentionMaskInterface.register(QUERY_CAPTURE, mask)
    try:
        model.set_attn_implementation(QUERY_CAPTURE)
    except (ValueError, AttributeError):
        yield False
        return
    try:
        yield model.config._attn_implementation == QUERY_CAPTURE
    finally:
        model.set_attn_implementation(previous)


@torch.inference_mode()
def prefill_batches(
    model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True, desc: str = "capturing KV",
    on_queries: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[tuple[int, int, KV]]:
    """Yield ``(batch index, number of batches, kv)`` for ``windows`` (``[N, T]`` token ids).

    ``kv`` holds every layer's ``(keys, values)``, ``[B, H, T, D]``, of one prefill with a plain
    `DynamicCache`; it is dropped before the next batch runs. ``on_queries``: called with every
    layer's post-RoPE queries during the prefill (:func:`hooked_queries`), before the batch is yielded.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    starts = list(range(0, windows.shape[0], batch_size))
    bar = progress_bar(int(windows.numel()), progress, desc)
    with hooked_queries(model, on_queries):
        try:
            for i, start in enumerate(starts):
                batch = windows[start : start + batch_size].to(device)
                cache = DynamicCache(config=model.config)
                model(input_ids=batch, attention_mask=torch.ones_like(batch), cache=cache)
                yield i, len(starts), [(layer.keys, layer.values) for layer in cache.layers]
                del cache
                bar.update(batch.numel())
        finally:
            bar.close()


def candidate_runs(num_layers: int, max_group_size: int, min_group_size: int = 2) -> list[tuple[int, ...]]:
    """Every run of ``min_group_size..max_group_size`` adjacent layers, smallest groups first, shallowest first."""
    return [
        tuple(range(start, start + size))
        for size in range(min_group_size, max_group_size + 1)
        for start in range(num_layers - size + 1)
    ]


@dataclass(frozen=True)
class Option:
    """One way to merge a candidate group's component: a method, its parameters and their tensors."""

    method: MergeMethod
    params: MethodParams
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    pre_rope: bool = False  # keys stored before RoPE (measured on such keys, tensors fitted on them)


class RestoreErrors:
    """Restore errors of candidate groups under every option, as float64 sums per KV head.

    For every run of layers and component: ``tokens [H]``, ``energy [H]`` (Σ over members of
    ``‖x_i‖²``) and ``error [H, O]``, the squared restore error ``Σ_i ‖x̂_i − x_i‖²`` of the merged
    (non-retained, at ``gamma``) tokens under each option ``O`` — the statistic the search
    regresses damage on.

    Parameters
    ----------
    options : dict
        ``{(layers, component): [Option, ...]}``.
    gamma : float
        Retention fraction at which errors are counted.
    window : int
        Retention look-ahead (the profile's block size).
    """

    def __init__(self, options: dict[tuple[tuple[int, ...], str], list[Option]], num_heads: int, *,
                 gamma: float, window: int = 64):
        self.options = options
        self.gamma, self.window = gamma, window
        self.num_heads = num_heads
        self.sums = {
            key: {
                "tokens": torch.zeros(num_heads, dtype=torch.float64),
                "energy": torch.zeros(num_heads, dtype=torch.float64),
                "error": torch.zeros(num_heads, len(opts), dtype=torch.float64),
            }
            for key, opts in options.items()
        }

    def add(self, kv: KV, sink_tokens: int = 1, kv_pre: KV | None = None, pre_scale: float = 1.0) -> None:
        """Add one batch; ``kv_pre``: the same with the keys before RoPE, for options with ``pre_rope``
        (``pre_scale``: RoPE's ``scaling²``, which turns their squared errors into the cache's)."""
        for (layers, component), options in self.options.items():
            c = COMPONENTS.index(component)
            xs = [kv[layer][c] for layer in layers]
            s = self.sums[layers, component]
            sq = energy(xs)  # [B, H, T, k]
            counted = torch.ones(sq.shape[:3], dtype=torch.bool, device=sq.device)
            counted[..., :sink_tokens] = False
            sink = ~counted[:, 0, :]
            s["tokens"] += counted.double().sum(dim=(0, 2)).cpu()
            s["energy"] += (sq.sum(-1) * counted).sum(dim=(0, 2)).cpu()
            keep = last = None
            for o, option in enumerate(options):
                inputs = xs
                if option.pre_rope:  # RoPE is a rotation per token: errors compare with the others' as they are
                    if kv_pre is None:
                        raise ValueError(f"option {o} of {list(layers)} {component} stores keys before RoPE: "
                                         "add the batch's keys without RoPE too (kv_pre)")
                    inputs = [kv_pre[layer][c] for layer in layers]
                distance, err = option.method.restore_error(option.params, inputs, option.tensors)
                if option.pre_rope and pre_scale != 1.0:
                    err = err * pre_scale
                # Options that share the distance (e.g. SLERP's t grid) share the retention decision.
                if keep is None or not torch.equal(distance, last):
                    keep = retention_mask(distance, self.gamma, window=self.window, sink=sink)
                    last = distance
                s["error"][:, o] += (err * (~keep & counted)).sum(dim=(0, 2)).cpu()

    def relative_error(self, layers: tuple[int, ...], component: str) -> torch.Tensor:
        """``[O]`` restore error energy / KV energy of the group's members, summed over heads."""
        s = self.sums[layers, component]
        return s["error"].sum(0) / s["energy"].sum().clamp_min(1e-30)

    def all_reduce(self) -> None:
        """Sum over the processes of ``torch.distributed`` (no-op when it is not initialised)."""
        all_reduce_sum(tensor for sums in self.sums.values() for tensor in sums.values())


class CalibrationCapture:
    """The methods' fit statistics and the candidates' restore errors, batch by batch.

    Fit statistics see every batch. The restore errors are measured on the batches from the middle
    on, with each option's tensors fitted on the batches before (with a single batch, fit and
    measurement share it); the tensors a profile ships are refitted on all batches
    (:meth:`fitted`).

    Parameters
    ----------
    methods : sequence of MergeMethod
        The methods the search may use.
    runs : list of tuple of int
        Candidate groups; None: fit statistics only (a preset's groups are fitted after capture).
    fit : bool
        Fit the methods' tensors and offer their fitted variants.
    num_layers, num_heads, head_dim : int
        The model's shape (:class:`~minicache.model_spec.ModelSpec`).
    max_offset : int
        Largest distance between two layers of a group.
    gamma, window, defaults
        Retention at which errors are counted, its look-ahead, and the defaults handed to
        :meth:`~minicache.methods.MergeMethod.param_options`.
    rope : RopeAngles, optional
        The model's RoPE; required unless ``key_rope`` is ``"post"``.
    key_rope : str
        One of :data:`KEY_ROPE_CHOICES`: the key options of RoPE-sensitive methods are offered on keys as
        the cache receives them (``"post"``), before RoPE (``"pre"``), or both ways.
    """

    def __init__(self, methods: Sequence[MergeMethod], runs: list[tuple[int, ...]] | None, *, fit: bool,
                 num_layers: int, num_heads: int, head_dim: int, max_offset: int, gamma: float, window: int,
                 defaults: dict | None = None, rope: RopeAngles | None = None, key_rope: str = "post"):
        if key_rope not in KEY_ROPE_CHOICES:
            raise ValueError(f"key_rope {key_rope!r}; allowed: {', '.join(KEY_ROPE_CHOICES)}")
        if key_rope != "post" and rope is None:
            raise ValueError(f"key_rope {key_rope!r} needs the model's RoPE")
        self.methods = list(methods)
        # only RoPE-sensitive methods see keys before RoPE: without one, no batch is turned back
        self.rope = rope if key_rope != "post" and any(m.rope_sensitive for m in self.methods) else None
        self.key_rope = key_rope
        self.runs = runs
        self.fit_enabled = fit
        self.num_heads = num_heads
        self.gamma, self.window = gamma, window
        self.defaults = {"head_dim": head_dim, **(defaults or {})}
        self.fit_statistics: dict[str, FitStatistic] = {}
        # the same statistics of the RoPE-sensitive methods on keys before RoPE (key_rope pre or both)
        self.pre_rope_statistics: dict[str, FitStatistic] = {}
        self._shape = (num_layers, num_heads, head_dim, max_offset)
        self._fit_methods: dict[str, MergeMethod] = {}
        if fit:
            for method in self.methods:
                if method.fit_key is not None and method.fit_key not in self.fit_statistics:
                    stat = method.new_fit_statistic(num_layers, num_heads, head_dim, max_offset)
                    if stat is not None:
                        self.fit_statistics[method.fit_key] = stat
                        self._fit_methods[method.fit_key] = method
            if self.rope is not None:
                for key, method in self._fit_methods.items():
                    if any(m.rope_sensitive for m in self.methods if m.fit_key == key):
                        self.pre_rope_statistics[key] = method.new_fit_statistic(*self._shape)
        self.errors: RestoreErrors | None = None
        self._fitted: dict[tuple[str, tuple[int, ...], bool], dict] = {}

    def fittable(self, method: MergeMethod) -> bool:
        return method.fit_key in self.fit_statistics

    def rope_modes(self, method: MergeMethod, component: str) -> tuple[bool, ...]:
        """``pre_rope`` values the options of ``method`` for ``component`` are offered with."""
        if component != "keys" or not method.rope_sensitive or self.rope is None:
            return (False,)
        return {"post": (False,), "pre": (True,), "both": (False, True)}[self.key_rope]

    def _without_rope(self, kv: KV) -> KV | None:
        return None if self.rope is None else without_rope(kv, self.rope)

    def measure_from(self, num_batches: int) -> int:
        """First batch (of ``num_batches``) measured for restore errors; ``num_batches`` when none is."""
        return num_batches // 2 if self.runs is not None else num_batches

    def option_count(self) -> int:
        """Options measured per batch: every method's parameter options for every run and component."""
        return sum(
            len(method.param_options(len(layers), self.fittable(method), {**self.defaults, "component": component}))
            * len(self.rope_modes(method, component))
            for layers in self.runs or () for method in self.methods if len(layers) >= method.min_members
            for component in COMPONENTS
        )

    def query_listener(self, sink_tokens: int = 1) -> Callable[[int, torch.Tensor], None] | None:
        """What :func:`prefill_batches` hands the queries to: the fit statistics that count them (None: none)."""
        if not any(hasattr(stat, "add_queries") for stat in self.fit_statistics.values()):
            return None

        def listen(layer: int, queries: torch.Tensor) -> None:
            # looked up per call: data-parallel measurement starts some statistics afresh
            for stat in self.fit_statistics.values():
                if hasattr(stat, "add_queries"):
                    stat.add_queries(layer, queries, sink_tokens)
        return listen

    def add(self, kv: KV, batch: int, num_batches: int, sink_tokens: int = 1) -> None:
        """Add one batch (``batch`` of ``num_batches``) of every layer's ``(keys, values)``.

        One process. Data-parallel, every process adds its share with :meth:`add_fit`, then calls
        :meth:`start_measurement`, then :meth:`add_measured` (and :meth:`add_fit` for the second half).
        """
        fit_added = False
        split = self.measure_from(num_batches)
        kv_pre = self._without_rope(kv)
        if batch >= split:
            if self.errors is None:
                if batch == 0:  # one batch only: the fit sees it before the measurement
                    self._fit_add(kv, sink_tokens, kv_pre)
                    fit_added = True
                self.errors = RestoreErrors(self._options(), self.num_heads, gamma=self.gamma, window=self.window)
            self._errors_add(kv, sink_tokens, kv_pre)
        if not fit_added:
            self._fit_add(kv, sink_tokens, kv_pre)

    def _fit_add(self, kv: KV, sink_tokens: int, kv_pre: KV | None = None) -> None:
        for stat in self.fit_statistics.values():
            stat.add(kv, sink_tokens)
        if self.pre_rope_statistics:
            kv_pre = self._without_rope(kv) if kv_pre is None else kv_pre
            for stat in self.pre_rope_statistics.values():
                stat.add(kv_pre, sink_tokens)

    def _errors_add(self, kv: KV, sink_tokens: int, kv_pre: KV | None) -> None:
        scale = 1.0 if self.rope is None else self.rope.scaling**2
        self.errors.add(kv, sink_tokens, kv_pre, scale)

    # -- data-parallel: the two phases made explicit, so that every process joins the phase boundary
    def add_fit(self, kv: KV, sink_tokens: int = 1) -> None:
        """Add one batch to the fit statistics only."""
        self._fit_add(kv, sink_tokens)

    def start_measurement(self) -> None:
        """End the fit phase: options get tensors fitted on the batches added so far (by every process).

        Collective when data-parallel: every process calls it once, whether or not it holds windows of
        either phase. The fit statistics all-reduce first; afterwards every process but rank 0 starts
        them again from zero, so that the final :meth:`all_reduce` counts the first half once.
        """
        if self.runs is None:
            raise ValueError("no candidate groups to measure (runs=None)")
        group = process_group()
        if group is not None:
            for stat in (*self.fit_statistics.values(), *self.pre_rope_statistics.values()):
                stat.all_reduce()
        self.errors = RestoreErrors(self._options(), self.num_heads, gamma=self.gamma, window=self.window)
        if group is not None and group[0] != 0:
            for key, method in self._fit_methods.items():
                self.fit_statistics[key] = method.new_fit_statistic(*self._shape)
                if key in self.pre_rope_statistics:
                    self.pre_rope_statistics[key] = method.new_fit_statistic(*self._shape)

    def add_measured(self, kv: KV, sink_tokens: int = 1) -> None:
        """Add one batch to the candidates' restore errors (after :meth:`start_measurement`)."""
        if self.errors is None:
            raise ValueError("call start_measurement() before add_measured()")
        self._errors_add(kv, sink_tokens, self._without_rope(kv))

    def _options(self) -> dict[tuple[tuple[int, ...], str], list[Option]]:
        """Every method's parameter options per candidate run and component, tensors fitted so far."""
        out: dict[tuple[tuple[int, ...], str], list[Option]] = {}
        for layers in self.runs:
            for method in self.methods:
                if len(layers) < method.min_members:
                    continue
                fitted = self.fittable(method)
                tensors = {mode: method.fit(self._statistic(method, mode), layers) if fitted else {}
                           for mode in {m for c in COMPONENTS for m in self.rope_modes(method, c)}}
                for component in COMPONENTS:
                    options = method.param_options(len(layers), fitted, {**self.defaults, "component": component})
                    for pre_rope in self.rope_modes(method, component):
                        for params in options:
                            own = method.tensors_for(params, tensors[pre_rope].get(component, {})) if (
                                method.fitted_params(params)) else {}
                            out.setdefault((layers, component), []).append(Option(method, params, own, pre_rope))
        return out

    def _statistic(self, method: MergeMethod, pre_rope: bool) -> FitStatistic:
        return (self.pre_rope_statistics if pre_rope else self.fit_statistics)[method.fit_key]

    def all_reduce(self) -> None:
        for stat in (*self.fit_statistics.values(), *self.pre_rope_statistics.values()):
            stat.all_reduce()
        if self.errors is not None:
            self.errors.all_reduce()

    def fitted(self, method: MergeMethod, layers: tuple[int, ...], *,
               pre_rope: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors of one group fitted on every batch: ``{component: {local: tensor}}`` (cached);
        ``pre_rope``: fitted on keys before RoPE (their ``keys`` are what a ``pre_rope`` component uses)."""
        key = (method.name, tuple(layers), pre_rope)
        if key not in self._fitted:
            if not self.fittable(method):
                raise ValueError(f"{method.name!r} tensors for {list(layers)} were not fitted (fit=False)")
            if pre_rope and method.fit_key not in self.pre_rope_statistics:
                raise ValueError(f"{method.name!r} tensors before RoPE were not fitted (key_rope {self.key_rope!r})")
            self._fitted[key] = method.fit(self._statistic(method, pre_rope), tuple(layers))
        return self._fitted[key]
