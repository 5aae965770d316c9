"""What a bench runs: one `Setting` per (system, method, options), expanded from a preset or a grid file.

A grid file is JSON (or YAML) mapping a method name to either a list of option dicts or a dict of option
lists (their cartesian product):

    {"toca": {"ratio": [0.2, 0.3], "interval": [3, 4]},
     "fbcache": [{"threshold": 0.05}, {"threshold": 0.1}],
     "steps": [10, 14]}

Method names are ditscope's (`toca`, `fora`, ...), a peer's (`diffusers-fbcache`, `cachedit-dbcache`,
`smoothcache`, `tgate`, ...) or `steps`, the "fewer steps" baseline whose values are step counts; `methods()`
is the one view of them all, with each method's system as its registration says.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import CONFIGS, REGISTRY, option_strings  # noqa: F401  (option_strings: read from here too)
from ..errors import DitscopeError, closest

BASELINE = "none"
FEWER_STEPS = "steps"

# "quick": two settings of three methods, a quick look (and what the tests run). "default" and "compact"
# are read from each method's registration (`cache.register`): its grid, and its compact settings.
PRESETS: dict[str, dict[str, list[dict]]] = {
    "quick": {
        "toca": [{}, {"interval": 5, "ratio": 0.2}],
        "fora": [{"interval": 3}, {"interval": 4}],  # 3: the default, the best of the defaults on the zoo
        "fbcache": [{"threshold": 0.05}, {"threshold": 0.2}],
    },
}
FEWER_STEPS_FRACTIONS = (0.5, 0.7)  # the "fewer steps" baseline, as fractions of the model's steps


@dataclass(frozen=True)
class Setting:
    system: str  # "ditscope", "baseline" or a peer's system (`methods()`)
    method: str
    options: dict = field(default_factory=dict)
    steps: int | None = None  # the fewer-steps baseline's step count

    @property
    def label(self) -> str:
        if self.method == FEWER_STEPS:
            return f"{self.steps} steps"
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method} {opts}".strip()

    @property
    def key(self) -> str:
        """Stable id of this setting (results are resumed by it)."""
        text = json.dumps([self.system, self.method, self.options, self.steps], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Method:
    """One method the bench runs, whoever's: its name, its system, and whether it is a peer (run through
    `peers.apply_peer`; its options, grid and knob in `peers.PEERS[name]`)."""

    name: str
    system: (
        str  # "ditscope", "baseline", or the peer's own system ("diffusers", "cache-dit", "smoothcache", ...)
    )
    peer: bool = False


def methods() -> dict[str, Method]:
    """Every method the bench knows, by name: ditscope's (the cache registry), the baselines, and the peers
    (each with the system its adapter registered: no method's system is read from its name)."""
    from .peers import PEERS

    view = {name: Method(name, "ditscope") for name in CONFIGS}
    view.update({name: Method(name, "baseline") for name in (BASELINE, FEWER_STEPS)})
    view.update({name: Method(name, peer.system, peer=True) for name, peer in PEERS.items()})
    return view


def method_of(method: str) -> Method:
    """The method named `method`; a misspelt one fails here, before the model loads, not after the uncached run."""
    view = methods()
    if method in view:
        return view[method]
    known = [*(m for m, e in view.items() if e.system != "baseline"), FEWER_STEPS]
    raise DitscopeError(f"unknown method {method!r}{closest(method, known)} (methods: {', '.join(known)})")


def system_of(method: str) -> str:
    return method_of(method).system


def load_grid(grid: str) -> dict[str, list]:
    """A preset name or a JSON/YAML grid file -> {method: [options or step count, ...]}."""
    if grid in PRESETS:
        return {m: list(v) for m, v in PRESETS[grid].items()}
    if grid == "default":
        return {name: [dict(o) for o in entry.grid] for name, entry in REGISTRY.items()}
    if grid == "compact":  # ours, and the peers' mildest and most aggressive
        from .peers import PEER_GRIDS

        ours = {name: [dict(o) for o in entry.compact] for name, entry in REGISTRY.items()}
        return {**ours, **{m: [g[0], g[-1]] for m, g in PEER_GRIDS.items()}}
    path = Path(grid)
    if not path.is_file():
        raise DitscopeError(
            f"--grid {grid!r} is neither a preset ({', '.join(['default', 'compact', *PRESETS])}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 (any parse failure is the user's file)
        raise DitscopeError(
            f"--grid {grid}: cannot parse it ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    if not isinstance(raw, dict):
        raise DitscopeError(f"--grid {grid}: expected a mapping of method -> settings")
    if not raw:
        raise DitscopeError(f"--grid {grid} names no method; give at least one (method -> settings)")
    out = {}
    for method, spec in raw.items():
        if spec in ([], {}):
            raise DitscopeError(
                f"--grid {grid}: {method!r} has no settings; give at least one ({{}} is its default)"
            )
        if isinstance(spec, dict):  # {option: [values]} -> cartesian product
            keys = list(spec)
            values = [v if isinstance(v, list) else [v] for v in spec.values()]
            empty = [k for k, v in zip(keys, values) if not v]
            if empty:
                raise DitscopeError(
                    f"--grid {grid}: {method} option {empty[0]!r} has an empty list of values"
                )
            out[method] = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
        elif isinstance(spec, list):
            out[method] = spec
        else:
            raise DitscopeError(f"--grid {grid}: settings of {method!r} must be a list or a dict of lists")
    return out


def expand(methods: list[str] | None, grid: dict[str, list], model_steps: int) -> list[Setting]:
    """The settings to run: the uncached baseline first, then every method's grid in the given order."""
    chosen = methods if methods else [*grid, *([] if FEWER_STEPS in grid else [FEWER_STEPS])]
    settings = [Setting("baseline", BASELINE)]
    for method in chosen:
        entry = method_of(method)
        system = entry.system
        if method == FEWER_STEPS:
            counts = grid.get(FEWER_STEPS) or sorted(
                {max(2, round(f * model_steps)) for f in FEWER_STEPS_FRACTIONS}
            )
            for n in counts:
                if not isinstance(n, int) or n < 2:
                    raise DitscopeError(f"the fewer-steps baseline needs step counts >= 2, not {n!r}")
                if n >= model_steps:
                    raise DitscopeError(
                        f"the fewer-steps baseline runs fewer than the bench's {model_steps} steps, "
                        f"not {n}; give smaller step counts or more --steps"
                    )
                settings.append(Setting(system, FEWER_STEPS, steps=n))
            continue
        options = grid.get(method)
        if not options and entry.peer:
            from .peers import PEER_GRIDS

            options = PEER_GRIDS.get(method)
        options = options or [{}]
        for opts in options:
            if not isinstance(opts, dict):
                raise DitscopeError(f"settings of {method!r} must be option dicts, not {opts!r}")
            if "tune" in opts:  # the knob is fitted on calibration prompts: check the target and the knob now
                from ..planning.planner import Target
                from .tune import knob_of

                if Target.parse(opts["tune"]).kind == "flops":
                    raise DitscopeError(f"{method} tune={opts['tune']}: tune psnr=, ssim= or speedup=")
                knob_of(method)
            elif (
                system == "ditscope" and method == "plan" and "target" in opts
            ):  # planned on calibration prompts
                from ..planning.planner import Target

                Target.parse(opts["target"])
            elif system == "ditscope":  # check the options now, not an hour into the run
                from ..cache import config_from_options

                config_from_options(method, option_strings(opts))
            elif entry.peer:  # a peer's option names and types, checked now too
                from .peers import _resolve_options

                _resolve_options(method, opts)
            settings.append(Setting(system, method, dict(opts)))
    return settings
