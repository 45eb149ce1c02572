"""Strict validation of plain data (profiles, method and quantizer parameters) with errors that name the field.

Every check raises :class:`ProfileError` with the path of the bad field, the bad value and what is
allowed, e.g. ``"groups[2].keys.t: 1.5 is out of range; allowed: a number in [0, 1]"``. Parameter
dataclasses (a merge method's ``Params``, :class:`~minicache.profile.Defaults`, ...) call these
helpers in ``__post_init__`` with the field's own name as the path; :func:`build` places the error
under the path of the enclosing object. Standard library only: a profile is validated without torch.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "UNIT",
    "ModelMismatchWarning",
    "ProfileError",
    "build",
    "check_bool",
    "check_choice",
    "check_instance",
    "check_int",
    "check_keys",
    "check_str",
    "check_unit",
    "check_weights",
    "plain",
    "show",
    "type_name",
]

UNIT = "a number in [0, 1]"


class ProfileError(ValueError):
    """A profile that is malformed or does not fit the model.

    The message reads ``"<path>: <problem>; allowed: <what is allowed>"``, e.g.
    ``"groups[2].keys.t: 1.5 is out of range; allowed: a number in [0, 1]"``.

    Attributes
    ----------
    path : str
        Field path inside the profile (``"groups[2].keys.t"``); empty for the whole document.
    detail : str
        The message without the path.
    source : str or None
        The file the profile was read from, when there is one.
    """

    def __init__(self, detail: str, path: str = "", source: str | None = None):
        self.path, self.detail, self.source = path, detail, source
        message = f"{path}: {detail}" if path else detail
        super().__init__(f"{source}: {message}" if source else message)

    def within(self, prefix: str) -> ProfileError:
        """The same error with its path placed under ``prefix`` (``"t"`` -> ``"groups[2].keys.t"``)."""
        if not self.path:
            path = prefix
        elif self.path.startswith("["):
            path = prefix + self.path
        else:
            path = f"{prefix}.{self.path}"
        return ProfileError(self.detail, path, self.source)


class ModelMismatchWarning(UserWarning):
    """A profile made for another model is used anyway (``allow_mismatch=True``)."""


def show(value: Any) -> str:
    """``repr`` of a bad value, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_unit(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProfileError(f"{show(value)} is a {type_name(value)}; allowed: {UNIT}", path)
    if not 0.0 <= value <= 1.0:  # NaN fails this comparison too
        raise ProfileError(f"{show(value)} is out of range; allowed: {UNIT}", path)
    return float(value)


def check_int(value: Any, path: str, minimum: int) -> int:
    allowed = f"an integer >= {minimum}"
    # bool is an int in Python, but `sink_tokens: true` is a typo, not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProfileError(f"{show(value)} is a {type_name(value)}; allowed: {allowed}", path)
    if value < minimum:
        raise ProfileError(f"{show(value)} is out of range; allowed: {allowed}", path)
    return int(value)


def check_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ProfileError(f"{show(value)} is a {type_name(value)}; allowed: true or false", path)
    return value


def check_choice(value: Any, path: str, choices: Sequence[str], what: str) -> str:
    """``value`` as one of the strings ``choices`` (``what`` names them: "a retention rule")."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        hint = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ProfileError(f"{show(value)} is not {what}{did_you_mean}; allowed: one of {allowed}", path)
    return str(value)


def check_weights(value: Any, path: str) -> tuple[float, ...]:
    allowed = "a list of non-negative numbers summing to 1, one per layer of the group"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) < 2:
        raise ProfileError(f"{show(value)} is not a list of weights; allowed: {allowed}", path)
    out = []
    for i, w in enumerate(value):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0.0 <= w <= 1.0:
            raise ProfileError(f"{show(w)} is not a weight; allowed: {allowed}", f"{path}[{i}]")
        out.append(float(w))
    if abs(sum(out) - 1.0) > 1e-6:
        raise ProfileError(f"{show(value)} sums to {sum(out):g}; allowed: {allowed}", path)
    return tuple(out)


def check_str(value: Any, path: str, allowed: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{show(value)} is a {type_name(value)}; allowed: {allowed}", path)
    return value


def check_instance(value: Any, cls: type, path: str) -> None:
    if not isinstance(value, cls):
        raise ProfileError(f"{show(value)} is a {type_name(value)}; allowed: a {cls.__name__}", path)


def check_keys(data: Any, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> Mapping:
    """``data`` as a mapping with only ``allowed`` keys and all ``required`` ones."""
    where = path or "the top level"
    if not isinstance(data, Mapping):
        raise ProfileError(
            f"{show(data)} is a {type_name(data)}; allowed: a mapping with keys {', '.join(allowed)}", path
        )
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            key_path = f"{path}.{key}" if path else str(key)
            raise ProfileError(
                f"unknown key {key!r}{did_you_mean}; allowed keys at {where}: {', '.join(allowed)}", key_path
            )
    for key in required:
        if key not in data:
            raise ProfileError(
                f"required key {key!r} is missing; allowed keys at {where}: {', '.join(allowed)}", path
            )
    return data


def plain(value: Any, path: str) -> Any:
    """A copy of ``value`` as YAML-safe plain data (dict/list/str/int/float/bool/None)."""
    # Converting subclasses (NumPy scalars, str enums) here keeps `yaml.safe_dump` from failing at
    # save time, long after the value was set; tuples become lists because YAML has no tuples.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProfileError(f"key {show(key)} is a {type_name(key)}; allowed: string keys", path)
            out[key] = plain(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [plain(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise ProfileError(
        f"{show(value)} is a {type_name(value)}; allowed: plain data (mappings with string keys, lists, "
        "strings, numbers, booleans, null)",
        path,
    )


def build(cls: type, path: str, kwargs: Mapping[str, Any]) -> Any:
    """``cls(**kwargs)`` with validation errors placed under ``path``."""
    try:
        return cls(**kwargs)
    except ProfileError as err:
        raise (err.within(path) if path else err) from None
