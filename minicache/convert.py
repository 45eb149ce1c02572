"""``minicache-convert``: write the model directory a user ships, optionally with its merge profile.

The output is an ordinary Hugging Face model directory (``config.json``, ``generation_config.json``,
tokenizer files, ``model.safetensors``) plus, with ``--profile``, ``minicache_config.yaml``, the
way PEFT ships ``adapter_config.json`` next to the weights. ``MiniCache.from_pretrained(DIR)``
finds the profile there; ``AutoModelForCausalLM.from_pretrained(DIR)`` loads the weights as usual.

The directory is built in a temporary sibling and renamed into place at the end, so an
interrupted or failed run never leaves a half-written ``DIR``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minicache.cli_options import DTYPES, ArgumentParser, add_allow_mismatch_option, add_model_option
from minicache.model_spec import ModelSpec

if TYPE_CHECKING:  # minicache.models imports torch: loaded in convert(), after the arguments are parsed
    from minicache.models import ModelSource

__all__ = ["ConvertResult", "build_parser", "convert", "main"]

PROFILE_FILENAME = "minicache_config.yaml"  # same as minicache.profile.PROFILE_FILENAME

DESCRIPTION = """\
Write a model directory to ship: the model's weights as safetensors, its config, generation
config and tokenizer, and (with --profile) the MiniCache merge profile as minicache_config.yaml
next to the weights, the way PEFT ships adapter_config.json.

Users then load it like any Hugging Face model directory, and MiniCache finds the profile there:

    model = AutoModelForCausalLM.from_pretrained(DIR)
    cache = MiniCache.from_pretrained(DIR, model)

The model may be a .gguf file (dequantized once here, so later loads take seconds instead of half
a minute), another model directory, the built-in alias smollm2-135m, or a hub id already in the
local Hugging Face cache (nothing is downloaded). The profile is checked against the model before
anything is written. DIR is built in a temporary directory beside it and renamed into place at
the end: a failed run leaves no half-written DIR."""

EPILOG = """\
examples:
  minicache-convert --model smollm2-135m --out smollm2-minicache --profile profile.yaml
  minicache-convert --model model.Q4_1.gguf --out model-dir --dtype bfloat16
  minicache-convert --model model-dir --out model-dir --profile new.yaml --force

exit status: 0 on success, 2 on a usage error (bad model, profile, or an existing DIR)."""


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote."""

    out_dir: pathlib.Path
    files: tuple[pathlib.Path, ...]
    source: ModelSource
    profile_file: pathlib.Path | None
    seconds: float


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="minicache-convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(
        parser,
        required=True,
        help="model to convert: a model directory, a .gguf file, the alias smollm2-135m, "
        "or a hub id in the local Hugging Face cache",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="directory to write (created; must not exist or be empty)"
    )
    parser.add_argument(
        "--profile",
        metavar="P",
        help="MiniCache merge profile (.yaml file, or a directory holding minicache_config.yaml) to ship "
        "with the weights as DIR/minicache_config.yaml. Without it, a profile already next to the "
        "source model's weights is carried over",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default=None,
        help="dtype of the written weights (default: keep the checkpoint's; float32 for .gguf files)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DIR (only one that holds a model, i.e. config.json; the old one is "
        "removed only after the new one is complete)",
    )
    add_allow_mismatch_option(parser)
    return parser


def _check_out_dir(out: pathlib.Path, force: bool) -> None:
    """Refuse before loading anything: a file at DIR, or an existing DIR without --force."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not force:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
    if not (out / "config.json").is_file():
        raise FileExistsError(
            f"--out {out} is not empty and holds no config.json, so it is not a model directory; "
            "refusing to replace it even with --force (remove it yourself, or choose another --out)"
        )


def _load_profile(path: str | os.PathLike) -> Any:
    from minicache.profile import MergeProfile  # lazily: only needed with a profile

    return MergeProfile.load(path)


def convert(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    profile: str | os.PathLike | None = None,
    dtype: Any = None,
    force: bool = False,
    allow_model_mismatch: bool = False,
    log: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Write a model directory (weights, config, tokenizer, and optionally the profile) to ``out``.

    Parameters
    ----------
    model : str or os.PathLike
        Anything :func:`minicache.models.load_model` accepts.
    out : str or os.PathLike
        The directory to write; built beside itself and renamed into place at the end.
    profile : path, optional
        A profile file (or a directory holding ``minicache_config.yaml``), checked against the
        model with ``check_model`` and written as ``out/minicache_config.yaml``. Without it, a
        profile next to the source model (when ``model`` is a directory) is carried over.
    dtype : torch.dtype or str, optional
        dtype of the written weights; None keeps the checkpoint's.
    force : bool
        Replace an existing ``out`` that holds a model (``config.json``).
    allow_model_mismatch : bool
        Passed to ``MergeProfile.check_model``.
    log : callable, optional
        Receives progress lines.

    Raises
    ------
    FileExistsError, FileNotFoundError, ValueError, ImportError
        User errors (existing ``out``, bad model spec, bad or mismatched profile, missing package).
    """
    from minicache.models import (
        atomic_directory,
        load_model,
        resolve_model_source,
        save_model_directory,
        write_source_record,
    )

    say = log or (lambda line: None)
    started = time.perf_counter()
    out_dir = pathlib.Path(out).expanduser()
    _check_out_dir(out_dir, force)
    source = resolve_model_source(model)

    merge_profile, profile_origin = None, None
    if profile is not None:
        merge_profile, profile_origin = _load_profile(profile), str(profile)
    elif source.kind == "directory" and (source.path / PROFILE_FILENAME).is_file():
        merge_profile, profile_origin = _load_profile(source.path), str(source.path / PROFILE_FILENAME)
        say(f"carrying over the profile {profile_origin}")

    say(f"loading {source.describe()}")
    loaded, tokenizer = load_model(model, dtype=dtype)
    say(f"loaded {ModelSpec.from_config(loaded).model_type} model, {loaded.dtype}, in "
        f"{time.perf_counter() - started:.1f}s")
    if merge_profile is not None:
        merge_profile.check_model(loaded.config, allow_mismatch=allow_model_mismatch)

    profile_file = None
    with atomic_directory(out_dir, overwrite=force) as tmp:
        save_model_directory(loaded, tokenizer, tmp)
        if merge_profile is not None:
            merge_profile.save(tmp)
            profile_file = out_dir / PROFILE_FILENAME
        record = {
            "name_or_path": source.name_or_path,
            "converted_from": str(source.path) if source.kind != "hub" else source.name_or_path,
            "source_kind": source.kind,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "profile": profile_origin,
            "minicache_version": _version("minicache"),
            "transformers_version": _version("transformers"),
        }
        if source.kind == "alias" and source.gguf_file is not None:
            record["gguf_file"] = source.gguf_file.name
        write_source_record(tmp, record)
        names = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    files = tuple(out_dir / name for name in names)
    return ConvertResult(out_dir, files, source, profile_file, time.perf_counter() - started)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"  # pragma: no cover


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        result = convert(
            args.model,
            args.out,
            profile=args.profile,
            dtype=args.dtype,
            force=args.force,
            allow_model_mismatch=args.allow_model_mismatch,
            log=lambda line: print(line, flush=True),
        )
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    total = 0
    print(f"wrote {result.out_dir}:")
    for file in result.files:
        size = file.stat().st_size
        total += size
        print(f"  {file.relative_to(result.out_dir).as_posix():<28} {_size(size):>10}")
    note = f"profile in {PROFILE_FILENAME}" if result.profile_file else "no MiniCache profile"
    print(f"{len(result.files)} files, {_size(total)}, {note}; took {result.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
