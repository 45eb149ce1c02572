"""A name → instance registry for plug-ins (merge methods, quantizers): one class each, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Stateless plug-ins, one instance per registered class, found by the class's ``name``.

    Parameters
    ----------
    kind : str
        What the plug-ins are, for messages (``"merge method"``).
    check : callable, optional
        Extra validation of a class before it is registered (raises ValueError).
    """

    def __init__(self, kind: str, check: Callable[[type], None] | None = None):
        self.kind = kind
        self._check = check
        self._items: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Register ``cls`` under its ``name`` (usable as a class decorator).

        Raises
        ------
        ValueError
            The class has no name, fails the registry's check, or another class already took the name.
        """
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{cls.__name__} needs a non-empty string `name`")
        if self._check is not None:
            self._check(cls)
        if name in self._items and type(self._items[name]) is not cls:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({type(self._items[name]).__name__})")
        self._items[name] = cls()
        return cls

    def unregister(self, name: str) -> None:
        """Remove a registered plug-in (tests register toy ones and clean up)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The plug-in registered as ``name`` (KeyError naming the registered ones otherwise)."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"no {self.kind} named {name!r}; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)
