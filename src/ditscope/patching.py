"""Swapping an attribute for a while (a module's `forward`, a scheduler's method, a library function) and
putting it back exactly: one utility for every place ditscope wraps something.

A restore puts back the object's own attribute if it had one and otherwise removes ours, so a
class-level method shows through again (no instance attribute is left behind), and it undoes swaps in
reverse order, checking first that each attribute still holds what we put there: if someone wrapped
it after us, restoring would silently drop their wrapper, so it stops with an error instead.
"""

from __future__ import annotations

import inspect

from .errors import DitscopeError

_ABSENT = object()


class Patches:
    """A stack of attribute swaps; `restore()` (or leaving the `with` block) undoes them all."""

    def __init__(self):
        self._stack: list[tuple[object, str, object, object]] = []  # (object, attribute, own previous, ours)

    def set(self, obj, attr: str, value):
        """`setattr(obj, attr, value)`, remembered; returns the value it replaced (what a wrapper calls)."""
        current = getattr(obj, attr)
        own = vars(obj).get(attr, _ABSENT) if hasattr(obj, "__dict__") else _ABSENT
        self._stack.append((obj, attr, own, value))
        setattr(obj, attr, value)
        return current

    def wrap(self, obj, attr: str, make_wrapper):
        """Replace `obj.attr` by `make_wrapper(original)`; returns the wrapper."""
        wrapper = make_wrapper(getattr(obj, attr))
        self.set(obj, attr, wrapper)
        return wrapper

    def restore(self):
        """Undo every swap, newest first. Raises (and restores nothing more) if an attribute no longer
        holds our value: someone wrapped it after us and must be unwrapped first."""
        while self._stack:
            obj, attr, own, ours = self._stack[-1]
            now = vars(obj).get(attr, _ABSENT) if hasattr(obj, "__dict__") else getattr(obj, attr, _ABSENT)
            if now is not ours:
                raise DitscopeError(
                    f"{_name(obj)}.{attr} was replaced by someone else after ditscope wrapped it; "
                    "undo that first (exit wrappers in the reverse order of entering them)"
                )
            self._stack.pop()
            if own is _ABSENT:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)

    def __len__(self) -> int:
        return len(self._stack)

    def __enter__(self) -> Patches:
        return self

    def __exit__(self, *exc):
        self.restore()


def _name(obj) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def timestep_argument(forward, name: str = "timestep") -> int | None:
    """Position of the `timestep` parameter (or the one called `name`) in a model's forward signature (None
    if it has none)."""
    params = list(inspect.signature(forward).parameters)
    return params.index(name) if name in params else None


def read_timestep(args: tuple, kwargs: dict, position: int | None, name: str = "timestep"):
    """The timestep a model call got, by keyword or at `position` (see `timestep_argument`); None if absent."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if position is not None and position < len(args) else None
