"""Every cache method registers itself once: its name, config, method, a one-line summary, the settings the
bench sweeps, and the two settings its invariant tests run (`exact`: it computes everything, bit-identical to
no cache; `aggressive`: it caches something even on random weights). `apply`, `config_from_options` (the
CLI's --cache), the CLI's help, the bench's presets and the tests (tests/test_cache.py runs every registered
method on every family) all read this table, so a new method is one file that calls `register` (a method
defined outside the package, or in a test, registers the same way)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ..errors import DitscopeError


@dataclass(frozen=True)
class Knob:
    """The one option that trades quality for speed, as `ditscope tune` fits it.

    Attributes:
        name: the config field.
        mild, aggressive: the range searched, from the setting closest to no cache to the fastest.
        integer: the option takes whole numbers (an interval); otherwise a real number.
        log: search on a logarithmic scale (thresholds spanning orders of magnitude).
    """

    name: str
    mild: float
    aggressive: float
    integer: bool = False
    log: bool = False

    def at(self, a: float):
        """The value at fraction `a` of the way from mild (0) to aggressive (1)."""
        lo, hi = self.mild, self.aggressive
        v = lo * (hi / lo) ** a if self.log else lo + (hi - lo) * a
        return int(round(v)) if self.integer else float(v)

    def values(self) -> list:
        """Integer knobs: every value, mild to aggressive."""
        step = 1 if self.aggressive >= self.mild else -1
        return list(range(int(self.mild), int(self.aggressive) + step, step))


@dataclass(frozen=True)
class Registered:
    name: str  # what the CLI and the bench call it
    config: type  # the config dataclass a user builds
    method: type  # the CacheMethod that executes it
    summary: str  # one line: what it caches
    grid: tuple[dict, ...] = (
        {},
    )  # the bench's default grid: near-lossless to aggressive, around the paper setting
    compact: tuple[dict, ...] = (
        {},
    )  # the compact grid: the mildest and the most aggressive of those, and variants
    knob: Knob | None = None  # what `ditscope tune` fits (None: nothing to fit, e.g. a plan)
    # the tests' settings: options, or a function (model, steps, layout) -> config for a method whose config
    # depends on the model (a plan names its units)
    exact: dict | Callable | None = None  # computes everything: the output is bit-identical to no cache
    aggressive: dict | Callable | None = None  # caches something on every model, even with random weights

    def test_config(self, which: str, model=None, steps: int | None = None, layout=None):
        """The config of the `exact` or `aggressive` setting (for `model`, at `steps` steps, where it needs one)."""
        setting = getattr(self, which)
        if setting is None:
            raise DitscopeError(
                f"cache method {self.name!r} registers no {which} setting; pass {which}= to register"
            )
        return setting(model, steps, layout) if callable(setting) else self.config(**setting)


REGISTRY: dict[str, Registered] = {}


def register(
    name: str,
    config: type,
    method: type,
    summary: str,
    grid=({},),
    compact=None,
    knob: Knob | None = None,
    exact=None,
    aggressive=None,
) -> Registered:
    """Add a cache method; `compact` defaults to the first and last settings of `grid`. `exact` and `aggressive`
    (options, or a function (model, steps, layout) -> config) are what the invariant tests run it with."""
    known = REGISTRY.get(name)
    if known is not None and (known.config is not config or known.method is not method):
        raise DitscopeError(f"cache method name {name!r} is already taken by {known.config.__name__}")
    grid = tuple(grid)
    compact = (
        tuple(compact)
        if compact is not None
        else tuple(dict(g) for g in {0: grid[0], len(grid) - 1: grid[-1]}.values())
    )
    entry = Registered(name, config, method, summary, grid, compact, knob, exact, aggressive)
    REGISTRY[name] = entry
    return entry


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def check_fields(config) -> None:
    """One check of a config's values against its defaults' types: a number where the default is one (an integer
    where it is an integer), finite, and not negative (no option of a cache method means anything below 0); a
    flag where it is a flag. Raises DitscopeError naming the option; what a method's own `check` adds is its
    ranges (an interval of at least 1, a ratio up to 1)."""
    import dataclasses
    import math

    if not dataclasses.is_dataclass(config):
        return
    name = type(config).__name__
    for f in dataclasses.fields(config):
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        value = getattr(config, f.name)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, (int, float)) for v in value):
            if not all(
                math.isfinite(v) for v in value
            ):  # polynomial coefficients, step lists: finite, any sign
                raise DitscopeError(f"{name}.{f.name} must hold finite numbers, not {value!r}")
        if isinstance(default, dict) and isinstance(
            value, dict
        ):  # per-kind factors: known kinds, numbers >= 0
            unknown = [k for k in value if default and k not in default]
            if unknown:
                raise DitscopeError(
                    f"{name}.{f.name} has no entry {unknown[0]!r}; use {', '.join(map(str, default))}"
                )
            bad = [
                (k, v)
                for k, v in value.items()
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0
            ]
            if bad:
                raise DitscopeError(
                    f"{name}.{f.name}[{bad[0][0]!r}] must be a finite number >= 0, not {bad[0][1]!r}"
                )
            continue
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise DitscopeError(f"{name}.{f.name} is a flag (True or False), not {value!r}")
        elif isinstance(default, (int, float)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (isinstance(default, int) and not isinstance(value, int)):
                kind = "an integer" if isinstance(default, int) else "a number"
                raise DitscopeError(f"{name}.{f.name} must be {kind}, not {value!r} ({type(value).__name__})")
            if not math.isfinite(value) or value < 0:
                raise DitscopeError(f"{name}.{f.name} must be a finite number >= 0, not {value!r}")


def for_config(config) -> Registered | None:
    """The registered method of a config instance (or class)."""
    cls = config if isinstance(config, type) else type(config)
    return next((e for e in REGISTRY.values() if e.config is cls), None)


class ConfigsByName(Mapping):
    """A live read-only view name -> config class (methods registered later appear in it)."""

    def __getitem__(self, name: str) -> type:
        return REGISTRY[name].config

    def __iter__(self) -> Iterator[str]:
        return iter(list(REGISTRY))

    def __len__(self) -> int:
        return len(REGISTRY)
