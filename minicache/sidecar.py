"""The tensors sidecar of a merge profile (DESIGN.md §4): named tensors in safetensors format.

A profile is plain YAML; tensors that belong to it (e.g. the orthogonal alignment of aligned SLERP
groups) live next to it in a safetensors-format file, which holds only raw tensors and is read without
unpickling anything. The YAML names the file and its SHA-256::

    tensors: {file: minicache_config.cd0f93a18498ccf9.tensors, sha256: cd0f93a1...}

so a profile and a sidecar that do not belong together fail on load instead of running with wrong
matrices. Which tensors a profile needs, and what makes them valid, is up to each group's merge
method (:meth:`minicache.methods.MergeMethod.check_tensor`); this module only stores them.

This module imports torch and safetensors; :mod:`minicache.profile` imports it only when a profile
uses tensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from minicache.validation import ProfileError

__all__ = ["ProfileTensors", "sha256_hex"]

_METADATA = {"format": "minicache-tensors", "format_version": "1"}
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian data
    raise ImportError("minicache.sidecar writes safetensors files on little-endian machines only")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: id(profile tensor) -> {(device, dtype): its copy}; an entry goes when its tensor is freed.
_HELD: dict[int, dict[tuple[str, torch.dtype], torch.Tensor]] = {}


def held_copy(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (and in ``dtype``), converted once and shared by every cache that asks.

    A profile's tensors are shared by every cache built from it, and by every row of a padded batch;
    converting them per cache would hold one copy per sequence. ``tensor`` itself when it needs no
    conversion.
    """
    dtype = tensor.dtype if dtype is None else dtype
    if tensor.device == device and tensor.dtype == dtype:
        return tensor
    key = (str(device), dtype)
    copies = _HELD.get(id(tensor))
    if copies is None:
        copies = _HELD[id(tensor)] = {}
        weakref.finalize(tensor, _HELD.pop, id(tensor), None)
    if key not in copies:
        copies[key] = tensor.to(device, dtype)
    return copies[key]


def held_copies(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The copies :func:`held_copy` made of ``tensor``."""
    return list(_HELD.get(id(tensor), {}).values())


class ProfileTensors:
    """Named tensors that ship with a profile (CPU, contiguous).

    Parameters
    ----------
    tensors : mapping of str to torch.Tensor
        E.g. ``{"rotation.20-21.keys": R}`` with ``R`` ``[k, H, D, D]`` float32.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        out: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name:
                raise ProfileError(f"tensor name {name!r} is not a non-empty string", "tensors")
            if not isinstance(tensor, torch.Tensor):
                raise ProfileError(f"{name} is a {type(tensor).__name__}; allowed: a torch.Tensor", "tensors")
            out[name] = tensor.detach().to("cpu").contiguous()
        self._tensors = out

    # -- mapping-like access --------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self._tensors.get(name)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProfileTensors):
            return NotImplemented
        return self.names() == other.names() and all(
            self._tensors[n].dtype == other._tensors[n].dtype
            and torch.equal(self._tensors[n], other._tensors[n])
            for n in self.names()
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {list(self._tensors[n].shape)}" for n in self.names())
        return f"ProfileTensors({shapes})"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    # -- files ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The safetensors serialisation, deterministic: same tensors, same bytes.

        Written here rather than by ``safetensors.torch.save``, whose header order varies from call
        to call; the layout is the safetensors format (8-byte little-endian header length, JSON
        header with sorted keys padded to 8 bytes, raw little-endian data) and is read back with
        safetensors itself.
        """
        header: dict[str, Any] = {"__metadata__": dict(_METADATA)}
        chunks, offset = [], 0
        for name in self.names():
            tensor = self._tensors[name]
            if tensor.dtype not in _DTYPE_NAMES:
                raise ProfileError(f"{name} has dtype {tensor.dtype}, which the sidecar cannot store", "tensors")
            data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            header[name] = {
                "dtype": _DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + len(data)],
            }
            chunks.append(data)
            offset += len(data)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + b"".join(chunks)

    @classmethod
    def from_bytes(cls, data: bytes, source: str | None = None) -> ProfileTensors:
        """Parse a safetensors file's bytes (no pickle: safetensors holds raw tensors only)."""
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt files
            raise ProfileError(
                f"not a valid safetensors file ({err}); allowed: a file written by minicache",
                "tensors",
                source,
            ) from None
        return cls(tensors)
