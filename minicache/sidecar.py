"""The tensors sidecar of a merge profile: ``minicache_tensors.safetensors`` (DESIGN.md §4).

A profile is plain YAML; tensors that belong to it (today: the orthogonal alignment of aligned
groups, issue 7) live next to it in a safetensors file, which can hold only raw tensors and is
read without unpickling anything. The YAML names the file and its SHA-256::

    tensors: {file: minicache_tensors.safetensors, sha256: 3f2a...}

so a profile and a sidecar that do not belong together (a crash between the two renames of a
save, a sidecar copied from another profile) fail on load instead of running with wrong matrices.

Names inside the file: ``rotation.<first>-<last>.<keys|values>``, shape ``[k, H, D, D]`` float32:
member ``i``'s ``R_i`` per KV head, mapping its unit vectors into the group's frame
(``u_i R_i``). Loading checks every name, shape (against the profile's model), dtype, finiteness
and orthogonality.

This module imports torch and safetensors; :mod:`minicache.profile` imports it only when a profile
uses tensors, so plain profiles stay readable with PyYAML alone.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["ORTHOGONALITY_TOLERANCE", "ProfileTensors", "rotation_name", "sha256_hex"]

#: Largest ``|RᵀR − I|`` entry accepted for an alignment matrix. float32 SVD products are
#: orthogonal to ~1e-6; anything far above is not a rotation and would scale restored vectors.
ORTHOGONALITY_TOLERANCE = 1e-4
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


def rotation_name(label: str, component: str) -> str:
    """Name of a group's alignment in the sidecar, e.g. ``rotation.20-21.keys``."""
    return f"rotation.{label}.{component}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _error(detail: str, path: str = "", source: str | None = None):
    from minicache.profile import ProfileError

    return ProfileError(detail, path, source)


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
                raise _error(f"tensor name {name!r} is not a non-empty string", "tensors")
            if not isinstance(tensor, torch.Tensor):
                raise _error(f"{name} is a {type(tensor).__name__}; allowed: a torch.Tensor", "tensors")
            out[name] = tensor.detach().to("cpu").contiguous()
        self._tensors = out
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}

    # -- mapping-like access --------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

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

    def on(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The tensor on ``device``, copied once per device and shared by every cache built from it."""
        device = torch.device(device)
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self._tensors[name].to(device)
        return self._device_cache[key]

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
                raise _error(f"{name} has dtype {tensor.dtype}, which the sidecar cannot store", "tensors")
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
            raise _error(
                f"not a valid safetensors file ({err}); allowed: a file written by minicache",
                "tensors",
                source,
            ) from None
        return cls(tensors)


def check_rotation(
    tensor: torch.Tensor | None, path: str, name: str, members: int, shape: tuple[int, int] | None
) -> None:
    """Validate one group's alignment tensor, raising ProfileError naming ``path``.

    Parameters
    ----------
    tensor : torch.Tensor or None
        ``[k, H, D, D]`` float32 orthogonal matrices; None when the sidecar lacks it.
    path : str
        Profile field that asks for it, e.g. ``groups[3].keys.align``.
    name : str
        Its name in the sidecar.
    members : int
        ``k``, the group's number of layers.
    shape : (int, int) or None
        ``(H, D)`` of the model when known.
    """
    if tensor is None:
        raise _error(
            f"true, but the tensors sidecar has no {name!r}; allowed: a sidecar written with this "
            "profile (minicache-calibrate --align writes both)",
            path,
        )
    if tensor.dtype != torch.float32:
        raise _error(f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; allowed: float32", path)
    heads = "H" if shape is None else shape[0]
    dim = "D" if shape is None else shape[1]
    want = f"[{members}, {heads}, {dim}, {dim}]"
    ok = tensor.dim() == 4 and tensor.shape[0] == members and tensor.shape[2] == tensor.shape[3]
    if ok and shape is not None:
        ok = tuple(tensor.shape[1:3]) == shape
    if not ok:
        raise _error(
            f"{name} has shape {list(tensor.shape)}; allowed: {want} (k layers of the group, KV heads, "
            "head_dim, head_dim)",
            path,
        )
    if not torch.isfinite(tensor).all():
        raise _error(f"{name} has non-finite entries; allowed: orthogonal matrices", path)
    r = tensor.double()
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    worst = float((r.transpose(-1, -2) @ r - eye).abs().max()) if r.numel() else 0.0
    if worst > ORTHOGONALITY_TOLERANCE:
        raise _error(
            f"{name} is not orthogonal (|RᵀR - I| up to {worst:.2g}); allowed: orthogonal matrices "
            f"(|RᵀR - I| <= {ORTHOGONALITY_TOLERANCE:g})",
            path,
        )


def validate_profile_tensors(
    groups: Any, tensors: ProfileTensors | None, model_shape: tuple[int, int] | None
) -> None:
    """Check that ``tensors`` holds exactly what the aligned groups need, in valid form."""
    needed = set()
    for i, group in enumerate(groups):
        for component in ("keys", "values"):
            if not getattr(group, component).align:
                continue
            name = rotation_name(group.label, component)
            needed.add(name)
            path = f"groups[{i}].{component}.align"
            if tensors is None:
                raise _error(
                    "true, but no tensors sidecar was loaded with this profile; allowed: a profile saved "
                    "with its minicache_tensors.safetensors next to it (MergeProfile.load reads both), "
                    "or align: false",
                    path,
                )
            found = tensors[name] if name in tensors else None  # noqa: SIM401 (not a dict)
            check_rotation(found, path, name, len(group.layers), model_shape)
    if tensors is not None:
        extra = sorted(set(tensors.names()) - needed)
        if extra:
            raise _error(
                f"the sidecar holds {extra[0]!r}, which no aligned group uses; allowed: only the tensors "
                "of this profile's aligned groups (was the sidecar written for another profile?)",
                "tensors",
            )
