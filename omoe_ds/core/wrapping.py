"""Methods replaced on one instance (a module's forward, an engine's step), undone in reverse order."""
from __future__ import annotations

from typing import Callable

_ABSENT = object()


def wrap_instance_method(obj, name: str, wrapper) -> Callable[[], None]:
    """Set obj.name = wrapper on the instance; returns what puts back the instance attribute it replaced (or none),
    so that wrappers attached and removed in last-in-first-out order keep each other."""
    before = obj.__dict__.get(name, _ABSENT)
    setattr(obj, name, wrapper)

    def restore() -> None:
        if before is _ABSENT:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, before)
    return restore
