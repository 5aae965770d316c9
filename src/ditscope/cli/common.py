"""What every command shares: the typer app and one-line user errors (option checks: `ditscope.runtime`)."""

from __future__ import annotations

import functools
import sys

import typer

from ..errors import DitscopeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Measure step-to-step redundancy in diffusion transformers.",
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=2)


def user_errors(fn):
    """Turn a DitscopeError into one line on stderr and exit code 2, and Ctrl-C into exit code 130 (what
was kept is said where it is kept, e.g. by `profile`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DitscopeError as e:
            raise _fail(str(e)) from None
        except KeyboardInterrupt:
            raise typer.Exit(code=130) from None

    return wrapper


