"""One error type for everything a user can get wrong.

The CLI turns a `DitscopeError` into a single line on stderr and exit code 2; library users catch it.
Messages name the problem and what to do about it.
"""


class DitscopeError(Exception):
    """A problem with the user's input or environment (not a bug in ditscope)."""


class EveryRankError(DitscopeError):
    """A problem every rank of a torchrun launch finds at the same point from the same input (fewer prompts
    than ranks). torchrun stops the other ranks as soon as one exits, so the CLI has every rank print its
    line before any of them exits."""


class DitscopeWarning(UserWarning):
    """Something ditscope did differently from what was asked, and went on (a plan resampled to another step
    count, unknown prompt words). The CLI prints these as `warning: ...` lines and keeps other libraries' quiet."""


def closest(name: str, choices) -> str:
    """`; did you mean X?` for the choice nearest a mistyped `name` (empty when none is near)."""
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {near[0]}?" if near else ""
