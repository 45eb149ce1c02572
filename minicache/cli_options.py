"""Command-line options every minicache tool shares, defined once: the model, dtype, profile and ``--kv-*``.

Each ``add_*`` function adds its options to an ``argparse`` parser (or argument group) with the same
names, defaults and help in every command; :func:`quantization_from_args` turns ``--kv-*`` into a
validated :class:`~minicache.profile.Quantization` before any model is loaded. Nothing here imports
torch: parsing stays instant, and ``--help`` or a usage error answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import functools
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "MODEL_HELP",
    "ArgumentParser",
    "add_allow_mismatch_option",
    "add_dtype_option",
    "add_kv_options",
    "add_model_option",
    "add_profile_option",
    "quantization_from_args",
]

DEFAULT_MODEL = "smollm2-135m"
#: ``--kv-compact``: the storage settings of the most compression measured within 1 % on unseen text at 4,096 tokens
#: (SmolLM2-135M, ``--kv-bits auto``: 4.92x at +0.60 % [+0.31, +0.88], README "Low-bit storage"), as the
#: ``args`` attributes they set. Options given on the command line win.
KV_COMPACT = {"kv_scheme": "rotated", "kv_sink_tokens": 4, "kv_pre_rope_keys": True, "kv_group_size": 64,
              "kv_window_bits": 8, "kv_scale_bits": 8, "kv_key_rounding": "queries"}
MODEL_HELP = "HF directory, .gguf file, hub id (local cache) or alias"
DTYPES = ("float32", "bfloat16", "float16")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors suggest the option meant (``--profle`` → ``--profile``).

    Usage errors exit with status 2 and print one line on stderr, pointing at ``--help`` (``argparse``
    would print the whole usage block first, burying the error under a dozen lines).
    """

    def parse_args(self, args=None, namespace=None):
        # Unknown options first: a typo must not be reported as a missing required option.
        known, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return known

    def parse_known_args(self, args=None, namespace=None):
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        options = {s for action in self._actions for s in action.option_strings}
        for arg in argv:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if name.startswith("--") and not any(o == name or o.startswith(name) for o in options):
                self.error(f"unrecognized arguments: {arg}")
        return super().parse_known_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            first = message.split(":", 1)[1].split()[0].split("=", 1)[0]
            options = sorted({s for action in self._actions for s in action.option_strings if s.startswith("--")})
            # 0.75: close enough for a typo (--profle, --kvbits), not for any word (--bogus is not --out)
            hint = difflib.get_close_matches(first, options, n=1, cutoff=0.75)
            if hint:
                message += f" (did you mean {hint[0]}?)"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_option(parser: Any, *, default: str | None = DEFAULT_MODEL, required: bool = False,
                     help: str | None = None) -> None:
    """``--model``: what :func:`minicache.models.load_model` accepts."""
    text = help or MODEL_HELP
    kwargs = {"required": True} if required else {"default": default}
    parser.add_argument("--model", metavar="SPEC", help=text, **kwargs)


def add_dtype_option(parser: Any, *, default: str = "float32", auto: str | None = None) -> None:
    """``--dtype``: the model (and cache) dtype; ``auto`` (with its help text) when the tool can choose."""
    choices = ("auto", *DTYPES) if auto else DTYPES
    help_text = f"model and cache dtype; auto: {auto}" if auto else "model and cache dtype"
    parser.add_argument("--dtype", choices=choices, default=default, help=help_text)


def add_profile_option(parser: Any, *, multiple: bool = False, help: str | None = None) -> None:
    """``--profile``: a merge profile, as a YAML file or a model directory holding ``minicache_config.yaml``."""
    text = help or "merge profile: a YAML file or a model directory holding minicache_config.yaml"
    if multiple:
        parser.add_argument("--profile", action="append", default=[], help=text + "; repeat to compare several")
    else:
        parser.add_argument("--profile", help=text)


def add_allow_mismatch_option(parser: Any) -> None:
    parser.add_argument("--allow-model-mismatch", action="store_true", help="use a profile made for another model")


class _Given(argparse.Action):
    """Store the value and remember that the option was given (``args.kv_given``): ``--kv-compact`` fills in only
    the options not given, and a default cannot be told apart from the same value given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.kv_given = {*(getattr(namespace, "kv_given", None) or ()), self.dest}


def _bits_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a width (an integer) or 'auto'") from None


def add_kv_options(parser: Any, *, residual: bool = True, bits_help: str | None = None, auto: bool = False,
                   scheme: str = "kivi", sink_tokens: int = 0, defaults_note: str = "") -> None:
    """``--kv-bits``, ``--kv-group-size``, ``--kv-scheme``, ``--kv-sink-tokens``, ``--kv-pre-rope-keys``,
    ``--kv-window-bits``, ``--kv-scale-bits`` and (``residual``) ``--kv-residual-length``; ``auto``:
    ``--kv-bits auto`` is accepted too (the calibrator chooses widths). ``scheme`` and ``sink_tokens`` are the
    command's defaults (``defaults_note``: why, for ``--help``)."""
    group = parser.add_argument_group("quantized storage (--kv-*)") if hasattr(parser, "add_argument_group") else parser
    group.add_argument(
        "--kv-bits", type=_bits_or_auto if auto else int, metavar="BITS",
        help=bits_help or "store the cache quantized to this many bits (the scheme's widths; kivi and rotated: "
        "2, 3 or 4)",
    )
    group.add_argument(
        "--kv-group-size", type=int, default=128, action=_Given,
        help="with --kv-bits: tokens per key group, channels per value group"
    )
    group.add_argument(
        "--kv-scheme", default=scheme, action=_Given,
        help="with --kv-bits: the quantization scheme (registered in minicache.quant)" + defaults_note,
    )
    group.add_argument(
        "--kv-sink-tokens", type=int, default=sink_tokens, metavar="S", action=_Given,
        help="with --kv-bits: the first S tokens of unmerged layers kept exact (attention sinks; fewer than "
        "--kv-group-size)",
    )
    group.add_argument(
        "--kv-pre-rope-keys", action="store_true",
        help="with --kv-bits: pack unmerged layers' keys with the model's RoPE removed (per-channel groups fit "
        "them better; undone on every read)",
    )
    group.add_argument(
        "--kv-window-bits", type=int, choices=(6, 8), metavar="{6,8}", action=_Given,
        help="with --kv-bits: store unmerged layers' recent window (--kv-residual-length tokens, and those "
        "waiting for a whole key group) as codes per token and head instead of exact: 8 bits, about half its "
        "bytes; 6 bits (rotated first), about 40 %%",
    )
    group.add_argument(
        # a literal: this module stays free of torch for --help; Quantization checks the scheme's widths
        "--kv-scale-bits", type=int, choices=(8,), metavar="8", action=_Given,
        help="with --kv-bits: store each packed group's scale and zero point as 8-bit codes instead of fp16: half "
        "their bytes, which a smaller --kv-group-size can spend on precision (e.g. --kv-group-size 64)",
    )
    group.add_argument(
        # a literal: this module stays free of torch for --help; Quantization checks them
        "--kv-key-rounding", choices=("nearest", "queries"), default=None, action=_Given,
        help="with --kv-bits: how unmerged layers round packed keys: to the nearest level (default), or "
        "'queries': channel by channel with error feedback, so that the error lands where the queries do not "
        "read (same bytes; rotated schemes; the calibrator fits per-channel query energies and ships them in "
        "the profile's sidecar)",
    )
    group.add_argument(
        "--kv-compact", action="store_true",
        help="with --kv-bits: the settings of the smallest storage measured within 1 %% (SmolLM2, 4,096 tokens of "
        "unseen text, --kv-bits auto: 4.92x at +0.60 %%; decodes at about 0.74x 4-bit KIVI's speed on CPU): "
        "--kv-scheme rotated --kv-sink-tokens 4 --kv-pre-rope-keys --kv-group-size 64 --kv-window-bits 8 "
        "--kv-scale-bits 8 --kv-key-rounding queries; options given as well win",
    )
    if residual:
        group.add_argument(
            "--kv-residual-length", type=int, default=128,
            help="with --kv-bits: recent tokens of unmerged layers kept exact",
        )


def quantization_from_args(args: argparse.Namespace, residual_length: int | None = None):
    """The :class:`~minicache.profile.Quantization` the ``--kv-*`` options ask for (None without ``--kv-bits``).

    Raises
    ------
    ProfileError
        A bad width, group size, window or scheme, naming the option (``"--kv-bits: 3 is not ..."``).
    """
    from minicache.validation import ProfileError

    if getattr(args, "kv_bits", None) is None:
        # options that only say how --kv-bits stores the cache: alone they would silently do nothing
        stray = [option for option, given in (("--kv-compact", getattr(args, "kv_compact", False)),
                                              ("--kv-window-bits", getattr(args, "kv_window_bits", None) is not None),
                                              ("--kv-scale-bits", getattr(args, "kv_scale_bits", None) is not None),
                                              ("--kv-pre-rope-keys", getattr(args, "kv_pre_rope_keys", False)),
                                              ("--kv-key-rounding", getattr(args, "kv_key_rounding", None) is not None))
                 if given]
        if stray:
            raise ProfileError("says how quantized storage is held; it needs --kv-bits", stray[0])
        return None
    from minicache.profile import Quantization

    if getattr(args, "kv_compact", False):
        given = getattr(args, "kv_given", None) or set()
        for name, value in KV_COMPACT.items():  # --kv-pre-rope-keys (a flag) is only ever set to True
            if name not in given:
                setattr(args, name, value)
    window = getattr(args, "kv_residual_length", None)
    window = residual_length if window is None else window
    try:
        if args.kv_bits == "auto":  # the calibrator lowers widths from the scheme's widest
            from minicache.quant import get_quantizer, quantizer_names

            scheme = getattr(args, "kv_scheme", "kivi")  # an unknown one: Quantization names it below
            bits = max(get_quantizer(scheme).bits) if scheme in quantizer_names() else 4
        else:
            bits = args.kv_bits
        return Quantization(
            bits=bits,
            group_size=args.kv_group_size,
            residual_length=128 if window is None else window,
            scheme=getattr(args, "kv_scheme", "kivi"),
            sink_tokens=getattr(args, "kv_sink_tokens", 0),
            pre_rope_keys=getattr(args, "kv_pre_rope_keys", False),
            window_bits=getattr(args, "kv_window_bits", None),
            scale_bits=getattr(args, "kv_scale_bits", None),
            key_rounding=getattr(args, "kv_key_rounding", None) or "nearest",
        )
    except ProfileError as err:  # name the option, not the profile field
        option = "--kv-" + err.path.split("[")[0].replace("_", "-")
        raise ProfileError(err.detail, option) from None


def interruptible(main: Callable[..., int]) -> Callable[..., int]:
    """Ctrl-C in a command that writes its outputs only at the end (atomically): one line, exit 130.

    For ``minicache-eval``, ``minicache-bench`` and ``minicache-demo``; calibrate and convert have their
    own messages (they say what was and was not written).
    """

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            import sys

            print("interrupted: nothing was written", file=sys.stderr)
            return 130

    return wrapped


def positive_int_list(text: str) -> tuple[int, ...]:
    """``argparse`` type of options like ``--context-lengths 512,2048``: distinct positive integers."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: a value is listed twice")
    return values
