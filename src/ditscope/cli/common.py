"""What every command shares: the typer app and one-line user errors (option checks: `ditscope.runtime`)."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError, DitscopeWarning, EveryRankError
from ..profiling.workload import barrier

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Measure step-to-step redundancy in diffusion transformers.",
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from ..version import __version__

        print(f"ditscope {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
):
    """Measure step-to-step redundancy in diffusion transformers."""


def _no_flag_metavar() -> None:
    """typer (0.2x) prints `<bool>` after every on/off flag in the help, where it takes no value: flags show
    none (other options keep theirs, `<int>`, `<path>`). Older typers have no such method and print none."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is not None:
        TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


_no_flag_metavar()


def _fail(message: str, every_rank: bool = False) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if every_rank:  # each rank has printed its line before any exits (errors.EveryRankError)
        barrier()
    return typer.Exit(code=2)


def user_errors(fn):
    """Turn a DitscopeError into one line on stderr and exit code 2, and Ctrl-C into exit code 130 (what
    was kept is said where it is kept, e.g. by `profile`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DitscopeError as e:
            raise _fail(str(e), isinstance(e, EveryRankError)) from None
        except KeyboardInterrupt:
            raise typer.Exit(code=130) from None

    return wrapper


PACKAGE = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def library_warnings():
    """Print each warning ditscope raises in the block (a plan resampled to another step count or run under
    another scheduler, unknown prompt words) once, as `warning: ...` on stderr, when the block succeeds;
    other libraries' warnings (deprecations, advice) are noise here and stay out of the way."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [
        w
        for w in caught
        if issubclass(w.category, DitscopeWarning) or PACKAGE in Path(w.filename).resolve().parents
    ]
    for message in dict.fromkeys(str(w.message).removeprefix("ditscope: ") for w in ours):
        print(f"warning: {message}", file=sys.stderr)
