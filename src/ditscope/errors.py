"""One error type for everything a user can get wrong.

The CLI turns a `DitscopeError` into a single line on stderr and exit code 2; library users catch it.
Messages name the problem and what to do about it.
"""


class DitscopeError(Exception):
    """A problem with the user's input or environment (not a bug in ditscope)."""
