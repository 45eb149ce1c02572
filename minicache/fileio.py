"""Writing files all at once or not at all (profiles, sidecars, reports, result files)."""

from __future__ import annotations

import os
import pathlib
import tempfile

__all__ = ["atomic_write", "check_output_file", "exists_message", "save_figure"]


def exists_message(target: pathlib.Path) -> str:
    return f"{target} exists; refusing to overwrite it (pass overwrite=True, or --force on the command line)"


def check_output_file(path: str | os.PathLike | None, option: str, force: bool) -> None:
    """Refuse, before any work, an output file a command could not write at the end.

    Raises
    ------
    FileExistsError
        It exists and ``force`` is False.
    IsADirectoryError
        It is a directory.
    PermissionError
        Its directory (or the nearest one that exists) is not writable.
    """
    if path is None:
        return
    target = pathlib.Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{option} {target} is a directory; allowed: a file path")
    if target.exists() and not force:
        raise FileExistsError(f"{option} {target} exists; pass --force to overwrite it")
    check_writable_directory(target.parent, option)


def check_writable_directory(directory: pathlib.Path, option: str) -> None:
    """``directory`` (or, if it does not exist yet, its nearest existing ancestor) is a writable directory."""
    existing = pathlib.Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option}: {existing} is not writable")


def atomic_write(target: pathlib.Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``target`` all at once or not at all (readable by others, like any shipped file).

    Without ``overwrite`` an existing ``target`` is never replaced, even one that appears while
    writing (:class:`FileExistsError`).
    """
    target = pathlib.Path(target)
    # Temp file in the same directory: os.replace/os.link are atomic only within one file system.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shipped profile must be readable
        if overwrite:
            os.replace(tmp, target)
        else:
            _link_no_clobber(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _link_no_clobber(tmp: pathlib.Path, target: pathlib.Path) -> None:
    # A hard link fails if the target appeared since our check, so a concurrent writer is never
    # clobbered; file systems without hard links fall back to check-then-replace.
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(exists_message(target)) from None
    except OSError:
        if target.exists():
            raise FileExistsError(exists_message(target)) from None
        os.replace(tmp, target)


def save_figure(fig, path: pathlib.Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, with the same bytes for the same figure."""
    import io

    buffer = io.BytesIO()
    # Fixed metadata so that the same calibration writes the same bytes.
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic_write(pathlib.Path(path), buffer.getvalue(), overwrite=True)
