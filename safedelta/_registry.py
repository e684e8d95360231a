"""A registry of named strategies, filled from outside (peft's ``register_peft_method`` shape).

Budget rules (:mod:`safedelta.budget`) and generation backends
(:mod:`safedelta.eval.generation`) are each one :class:`NamedRegistry`: registration refuses a
malformed, reserved or taken name with an error saying what to change, and a lookup of an
unknown name lists the known ones. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import re
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

#: lowercase letters and digits, optionally joined by single ``-`` or ``_``, starting with a letter
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
NAME_RULE = ("lowercase letters and digits, optionally joined by single '-' or '_', starting "
             "with a letter")


class NamedRegistry(Generic[T]):
    """``name -> T`` in registration order.

    Args:
        kind: what is registered, for messages (``"budget rule"``).
        error: the exception type raised (a :class:`~safedelta.errors.SafeDeltaError`).
        reserved: names that may not be registered but are valid choices where the registry
            is used (``"auto"`` for backends); error messages list them among the known names.
    """

    def __init__(self, kind: str, error: type[Exception], *, reserved: tuple[str, ...] = ()):
        self.kind, self.error, self.reserved = kind, error, reserved
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``; returns it."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in self.reserved:
            but = f", other than {', '.join(map(repr, self.reserved))}" if self.reserved else ""
            raise self.error(f"{self.kind} name {name!r} is not usable: use {NAME_RULE} "
                             f"(e.g. 'my-{self.kind.split()[-1]}'){but}")
        if name in self._items:
            raise self.error(f"a {self.kind} named {name!r} is already registered "
                             f"({_label(self._items[name])}); choose another name")
        self._items[name] = item
        return item

    def remove(self, name: str) -> None:
        """Forget ``name`` (for tests that register a throw-away item)."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> T:
        """The item registered as ``name``; the error lists the known names."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {name!r}; known: "
                             f"{', '.join([*self.reserved, *self.names()])}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())


def _label(item: object) -> str:
    return item.__name__ if isinstance(item, type) else type(item).__name__
