"""`ditscope tune`: fit one cache method's knob on calibration prompts so that a target holds end to end.

Every cache method (ditscope's and the peers') has one option that trades quality for speed: FBCache's
and MagCache's thresholds, DBCache's residual threshold, ToCa's ratio, FORA's interval... (its `Knob`,
declared where the method registers). Thresholds are usually hand-set per model, and a threshold that
suits one model never fires, or always fires, on another. `tune` measures instead:

1. the uncached images of the calibration prompts are the reference;
2. the knob moves from its mildest value towards its most aggressive one, and at each value the cached
   images are compared with the reference (PSNR, SSIM) or timed (speedup);
3. quality targets keep the most aggressive value whose quality holds (the lower end of the 95% bootstrap
   interval of the mean over the prompts, as the planner does, or the mean with `assurance="mean"`);
   speed targets keep the mildest value that is fast enough. Real-valued knobs are scanned on a grid,
   then bisected next to the boundary; integer knobs are scanned value by value.

TeaCache's rescaling polynomial is fitted too (`fit_teacache`): on the uncached calibration run, the
relative change of the first block's modulated input against the relative change of the block stack's
output, a 4th-order least-squares fit with its R^2, instead of coefficients copied from another model.

The result is a `Tuned` (method, options, what was measured), saved as JSON that `ditscope generate
--cache FILE` and `ditscope.apply(pipe, Tuned.load(FILE).config())` take. A `work_dir` keeps the reference
images and every evaluation, so an interrupted tuning resumes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache.engine import CacheHandle
from ..cache.observe import TeaCacheProbe
from ..cache.registry import REGISTRY, Knob
from ..cache.schedule_data import FORMAT as PLAN_FORMAT
from ..errors import DitscopeError, closest
from ..files import json_checksum, load_images, save_images, write_text_atomic
from ..planning.calibrate import pipeline_identity
from ..planning.planner import NOT_QUALITY, Evaluations, Target, check_calibration
from ..profiling.workload import Workload, data_parallel, from_first, gather, generate, writes
from ..versioned import FileFormat

FORMAT, VERSION = "ditscope-tuned", 1
TUNED_FILE = FileFormat(
    "tuned config",
    FORMAT,
    VERSION,
    ".tuned.json",
    "ditscope tune",
    "tune again",
    edited="delete its checksum line to run a hand-edited config",
    version_key="version",
)
GRID_POINTS = 6  # real-valued knobs: values on the grid before the bisection


@dataclass
class Tuned:
    """A fitted cache setting: the method, every option it runs with, and what tuning measured."""

    method: str
    options: dict
    meta: dict = field(default_factory=dict)

    def config(self, model=None):
        """The ditscope config to `ditscope.apply` (peers run through the bench, not `apply`). With `model` (the
        pipeline or transformer it will run on), a model other than the one it was tuned on is refused."""
        from ..cache import config_from_options, option_strings
        from .peers import PEERS

        if self.method in PEERS:
            raise DitscopeError(
                f"{self.method} is a peer: run its fitted options with ditscope bench, not apply"
            )
        if self.method not in REGISTRY:
            raise DitscopeError(
                f"the tuned config names an unknown method {self.method!r}"
                f"{closest(self.method, REGISTRY)}; tune again with ditscope tune"
            )
        expected = self.meta.get("model_signature")  # absent in files from before it was kept: not checked
        if model is not None and expected and expected != _signature(model):
            name = self.meta.get("model") or expected.get("class")
            raise DitscopeError(
                f"this config was tuned on {name} ({expected.get('class')}, config "
                f"{expected.get('config_hash')}), not on this model ({_signature(model)['class']}); "
                "tune it for this one with ditscope tune"
            )
        return config_from_options(self.method, option_strings(self.options))

    def save(self, path) -> None:
        path = Path(path)
        if path.is_dir():
            raise DitscopeError(f"{path} is a folder; give a file name such as {path / 'method.tuned.json'}")
        body = json.loads(
            json.dumps(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "method": self.method,
                    "options": self.options,
                    "meta": self.meta,
                },
                default=str,
            )
        )
        write_text_atomic(path, json.dumps({**body, "checksum": json_checksum(body)}, indent=1))

    @classmethod
    def load(cls, path) -> Tuned:
        raw = Path(path)
        if raw.is_file() and raw.suffix == ".json" and _format_of(raw) == PLAN_FORMAT:
            raise DitscopeError(
                f"{raw} is a plan, not a tuned config: run it with --cache plan --cache-opt path={raw}"
            )
        path, body = TUNED_FILE.read_json(path)
        if not isinstance(body.get("method"), str) or not isinstance(body.get("options"), dict):
            raise DitscopeError(f"{path} is damaged: its method or options are missing; tune again")
        return cls(body["method"], body["options"], body.get("meta") or {})


def _format_of(path: Path):
    """The `format` field of a JSON file (None if it has none, or is not JSON)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return body.get("format") if isinstance(body, dict) else None


def knob_of(method: str, name: str | None = None, preset: str | None = None) -> tuple[Knob, dict]:
    """The knob `tune` fits for `method` (or the option `name`, on the default knob's range when it is the same
    option, else on a range around its default) and the method's default options (a ditscope method's
    `preset`, such as ToCa's "dit", supplies them; "preset" is then one of the options)."""
    from .peers import PEERS

    if preset is not None and method not in REGISTRY:
        raise DitscopeError(f"{method} has no presets; give its options one by one")
    if method in REGISTRY:
        import dataclasses

        from ..cache import config_from_options

        entry = REGISTRY[method]
        knob = entry.knob
        base = entry.config() if preset is None else config_from_options(method, [f"preset={preset}"])
        defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(entry.config)}
        if preset is not None:
            defaults["preset"] = preset
    elif method in PEERS:
        knob, defaults = PEERS[method].knob, dict(PEERS[method].defaults)
    else:
        known = [*REGISTRY, *PEERS]
        raise DitscopeError(
            f"unknown method {method!r}{closest(method, known)} (methods: {', '.join(known)})"
        )
    if name is None or (knob is not None and name == knob.name):
        if knob is None:
            hint = "fit it with ditscope plan" if method == "plan" else "give its options by hand"
            raise DitscopeError(f"{method} has no knob to tune; {hint}")
        return knob, defaults
    value = defaults.get(name)
    if name not in defaults:
        raise DitscopeError(
            f"{method} has no option {name!r}{closest(name, defaults)} (options: {', '.join(defaults)})"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DitscopeError(
            f"{method} option {name} is not a number (it is {value!r}); tune a numeric option"
        )
    if isinstance(value, int):
        return Knob(name, 1, max(10, 3 * value), integer=True), defaults
    low, high = (value / 10, value * 10) if value > 0 else (0.001, 1.0)
    if method in REGISTRY and not _accepts(method, name, high) and value <= 1 and _accepts(method, name, 1.0):
        high = 1.0  # a fraction (ToCa's ratio): the range ends where the method's own check says it must
    return Knob(name, low, high, log=True), defaults


def _accepts(method: str, name: str, value: float) -> bool:
    """Whether the method's check takes `value` for option `name` (the rest at their defaults)."""
    import dataclasses

    entry = REGISTRY[method]
    try:
        entry.method(dataclasses.replace(entry.config(), **{name: value})).check()
    except DitscopeError:
        return False
    return True


def check_request(method: str, options: dict, knob: str | None = None) -> tuple[Knob, dict]:
    """`knob_of`, and the fixed `options` checked (names, and values where the method says what they take):
    what `tune` can refuse without running anything, so the CLI refuses it before the model loads."""
    the_knob, defaults = knob_of(method, knob, options.get("preset"))
    if the_knob.name in options:
        raise DitscopeError(
            f"option {the_knob.name} is the knob being tuned; leave it out of the fixed options"
        )
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DitscopeError(
            f"{method} has no option {unknown[0]!r}{closest(unknown[0], defaults)} (options: "
            f"{', '.join(defaults)})"
        )
    trial = {**options, the_knob.name: the_knob.at(0)}  # the mildest value the search will try
    if method in REGISTRY:
        from ..cache import config_from_options, option_strings

        config_from_options(method, option_strings(trial))
    else:
        from .peers import _resolve_options

        _resolve_options(method, trial)
    return the_knob, defaults


def tune(
    pipe,
    method: str,
    prompts: list,
    target: str = "psnr=35",
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    guidance_scale=None,
    options: dict | None = None,
    knob: str | None = None,
    assurance: str = "lower",
    iterations: int = 10,
    fit_coefficients: bool = True,
    work_dir=None,
    progress=None,
    timed: bool = True,
    layout=None,
) -> Tuned:
    """Fit `method`'s knob on `prompts` so that `target` (psnr=DB, ssim=S or speedup=X) holds.

    `options` are held fixed (the knob is the only thing that moves); `knob` names another numeric option
    to fit. TeaCache's coefficients are fitted first unless `options` gives them or `fit_coefficients` is
    False. Raises DitscopeError when even the mildest setting misses a quality target (saying what it
    reaches) or the most aggressive one misses a speed target. `progress(text)` reports each evaluation.
    `timed=False` skips timing the fitted setting for a quality target (its `measured_speedup` is then None):
    for callers that measure speed themselves (`ditscope recommend` counts FLOPs on held-out prompts).
    `layout`: the declared blocks of a model outside the family table, as for `ditscope.plan` (run the tuned
    config with the same layout).
    """
    goal = Target.parse(target)
    if goal.kind == "flops":
        raise DitscopeError("tune fits psnr=, ssim= or speedup= targets; flops= is for ditscope plan")
    if assurance not in ("lower", "mean"):
        raise DitscopeError(f"unknown assurance {assurance!r}; use lower or mean")
    check_calibration(prompts, batch_size, "tuning")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise DitscopeError(f"tuning needs num_inference_steps >= 2, not {num_inference_steps!r}")
    fixed = dict(options or {})
    the_knob, _ = check_request(method, fixed, knob)
    say = progress or (lambda text: None)
    started = time.perf_counter()
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    reference = _reference(pipe, prompts, num_inference_steps, seed, batch_size, guidance_scale, work, say)
    meta: dict = {}
    if method == "teacache" and fit_coefficients and "coefficients" not in fixed:
        fit = fit_teacache(
            pipe, prompts, num_inference_steps, seed, batch_size, guidance_scale, layout=layout
        )
        fixed["coefficients"] = fit["coefficients"]
        meta["teacache_fit"] = fit
        say(f"teacache: polynomial fitted, R^2 {fit['r2']:.3f} over {fit['points']} step pairs")
    evaluations = Evaluations(
        pipe,
        prompts,
        num_inference_steps,
        seed,
        batch_size,
        guidance_scale,
        reference,
        work / "evaluations.jsonl" if work else None,
        layout,
    )
    applier = _applier(
        pipe,
        method,
        num_inference_steps,
        prompts[0],
        guidance_scale,
        layout,
        calibration=(prompts, seed, batch_size),
    )
    trace: dict[str, dict] = {}  # one entry per value evaluated (asking again reads the evaluation back)

    def measure(value, timed: bool = not goal.quality) -> dict:
        opts = {**fixed, the_knob.name: value}
        key = json.dumps([method, opts], sort_keys=True, default=str)
        row = evaluations.measure(key, lambda: applier(opts), timed=timed)
        trace[key] = {
            the_knob.name: value,
            **{k: round(v, 4) for k, v in row.items() if k not in NOT_QUALITY or k == "speedup"},
        }
        return row

    def holds(value) -> bool:
        row = measure(value)
        if goal.quality:
            ok = goal.met_by(row, assurance)
            say(
                f"{method} {the_knob.name}={_fmt(value)}: PSNR {row['psnr']:.2f} dB (lower {row['psnr_lo']:.2f}, "
                f"worst images {row['psnr_p5']:.2f}), "
                f"SSIM {row['ssim']:.3f}: {'holds' if ok else 'misses'}"
            )
        else:
            ok = row["speedup"] >= goal.value
            say(
                f"{method} {the_knob.name}={_fmt(value)}: {row['speedup']:.2f}x: {'holds' if ok else 'misses'}"
            )
        return ok

    # Quality falls as the knob grows more aggressive: find the boundary on the mild-to-aggressive axis.
    # Quality targets keep the last value that holds; speed targets the first.
    points = (
        the_knob.values()
        if the_knob.integer
        else [the_knob.at(i / (GRID_POINTS - 1)) for i in range(GRID_POINTS)]
    )
    try:
        default_knob = knob_of(method, None, fixed.get("preset"))[0]
    except DitscopeError:  # the method has no knob of its own
        default_knob = None
    if default_knob is None or default_knob.name != the_knob.name:
        # An option other than the method's knob has no known direction (ToCa's ratio is the fraction
        # recomputed: smaller is faster); the end that computes less is the aggressive one.
        if _work_done(
            pipe,
            method,
            fixed,
            the_knob.name,
            points[-1],
            measure,
            num_inference_steps,
            prompts[0],
            guidance_scale,
            layout,
        ) > _work_done(
            pipe,
            method,
            fixed,
            the_knob.name,
            points[0],
            measure,
            num_inference_steps,
            prompts[0],
            guidance_scale,
            layout,
        ):
            points = points[::-1]
    want_last = goal.quality
    best, boundary = None, None  # the chosen value; the neighbour on the other side of the boundary
    for i, value in enumerate(points):
        ok = holds(value)
        if want_last:
            if not ok:
                boundary = value
                break
            best = value
        elif ok:
            best, boundary = value, points[i - 1] if i else None
            break
    if best is None:
        row = measure(points[0] if want_last else points[-1])
        reach = (
            f"its mildest setting ({the_knob.name}={_fmt(points[0])}) reaches PSNR {row['psnr']:.2f} dB "
            f"(lower {row['psnr_lo']:.2f}), SSIM {row['ssim']:.3f}"
            if want_last
            else f"its most aggressive setting ({the_knob.name}={_fmt(points[-1])}) reaches {row['speedup']:.2f}x"
        )
        raise DitscopeError(f"{method} cannot reach {goal} on these prompts: {reach}; ask for less")
    if not the_knob.integer and boundary is not None:  # bisect between the value kept and its neighbour
        a, b = (best, boundary)
        for _ in range(max(0, iterations - len(trace))):
            mid = math.sqrt(a * b) if the_knob.log and a > 0 and b > 0 else (a + b) / 2
            if holds(mid):
                a = mid
                best = mid
            else:
                b = mid
    chosen = {**fixed, the_knob.name: best}
    final = measure(best)
    speed = final.get("speedup") or (
        evaluations.measure(
            json.dumps([method, chosen], sort_keys=True, default=str), lambda: applier(chosen), timed=True
        )["speedup"]
        if timed
        else None
    )
    meta.update(
        {
            "target": str(goal),
            "knob": the_knob.name,
            "value": best,
            "assurance": assurance,
            "pipeline": type(pipe).__name__,
            "model_signature": _signature(pipe),
            "num_inference_steps": num_inference_steps,
            "calibration": {
                "n_prompts": len(prompts),
                "seed": seed,
                "guidance_scale": guidance_scale,
                "batch_size": batch_size,
            },
            "quality": {k: round(v, 4) for k, v in final.items() if k not in NOT_QUALITY},
            "measured_speedup": round(speed, 3) if speed is not None else None,
            "evaluations": len(trace),
            "trace": list(trace.values()),
            "tuning_seconds": round(time.perf_counter() - started, 1),
        }
    )
    return Tuned(method, _plain(chosen), meta)


def _signature(model) -> dict:
    """The signature a plan also carries: the (first) transformer's class and a hash of its config."""
    from ..cache.layout import find_transformer
    from ..cache.schedule_data import model_signature

    return model_signature(find_transformer(model)[0])


def _fmt(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _plain(options: dict) -> dict:
    """Options as JSON keeps them (tuples as lists), so a saved and a returned Tuned agree."""
    return json.loads(json.dumps(options, default=str))


def _work_done(
    pipe, method: str, fixed: dict, name: str, value, measure, steps: int, prompt, guidance_scale, layout=None
) -> float:
    """How much a setting computes: ditscope's methods, executed FLOPs over uncached on one prompt (exact, no
    timing); a peer, the inverse of its measured speedup on the calibration prompts."""
    if method not in REGISTRY:
        return 1 / measure(value, timed=True)["speedup"]
    from ..cache import apply, config_from_options, option_strings

    with apply(
        pipe,
        config_from_options(method, option_strings({**fixed, name: value})),
        num_inference_steps=steps,
        count_flops=True,
        layout=layout,
    ) as handle:
        generate(pipe, [prompt], steps, 0, 1, guidance_scale)
    return from_first(handle.stats().flops_ratio)  # torchrun: one prompt runs on the first rank only


def _applier(pipe, method: str, steps: int, first_prompt, guidance_scale, layout=None, calibration=None):
    """opts -> remove(): applies `method` with `opts` to `pipe` (ditscope's through apply, a peer's through
    its adapter, which may run the pipeline once to check it runs or to calibrate). `calibration`: (prompts,
    seed, batch size) the peers that calibrate (SmoothCache) run uncached, the prompts the knob is fitted on."""
    if method in REGISTRY:
        from ..cache import apply, config_from_options, option_strings

        return lambda opts: (
            apply(
                pipe,
                config_from_options(method, option_strings(opts)),
                num_inference_steps=steps,
                layout=layout,
            ).remove
        )
    from .peers import PeerUnavailable, apply_peer

    def run_once():
        return Workload([first_prompt], steps, guidance_scale=guidance_scale).call(pipe, [0])

    calibrate = None
    if calibration is not None:
        prompts, seed, batch_size = calibration

        def calibrate():
            return generate(pipe, prompts, steps, seed, batch_size, guidance_scale)

        calibrate.key = json.dumps(["tune", [str(p) for p in prompts], seed, batch_size, guidance_scale])

    def applied(opts):
        try:
            return apply_peer(method, pipe, opts, steps, run_once, calibrate)
        except PeerUnavailable as e:
            raise DitscopeError(str(e)) from None

    return applied


def _reference(
    pipe, prompts, steps, seed, batch_size, guidance_scale, work: Path | None, say
) -> torch.Tensor:
    """The uncached images of the calibration prompts (kept in the work folder, with what made them)."""
    stamp = json.dumps(
        {
            "prompts": [str(p) for p in prompts],
            "steps": steps,
            "seed": seed,
            "batch_size": batch_size,
            "guidance_scale": guidance_scale,
            **pipeline_identity(pipe),
        }
    )
    if work is not None and (work / "reference.safetensors").exists() and (work / "reference.json").exists():
        if (work / "reference.json").read_text() == stamp:
            say("reference: resumed from the work folder")
            return load_images(work / "reference.safetensors")
    say(f"reference: {len(prompts)} prompts x {steps} steps, uncached")
    images = generate(pipe, prompts, steps, seed, batch_size, guidance_scale)
    if work is not None and writes():
        save_images(work / "reference.safetensors", images)
        write_text_atomic(work / "reference.json", stamp)
    return images


# ------------------------------------------------------------------------------- TeaCache's polynomial
def fit_teacache(
    pipe,
    prompts: list,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    guidance_scale=None,
    degree: int = 4,
    layout=None,
) -> dict:
    """Fit TeaCache's rescaling polynomial on the uncached model: x = relative L1 change of the first block's
    modulated input between consecutive steps, y = that of the block stack's output, per model row.

    Returns {"coefficients": [...] (highest degree first, numpy.polyval's order), "r2", "points",
    "x_range"}: what `TeaCacheConfig(coefficients=...)` takes, and how well it fits."""
    import numpy as np

    probe = TeaCacheProbe()
    with CacheHandle(pipe, probe, num_inference_steps=num_inference_steps, layout=layout):
        generate(pipe, prompts, num_inference_steps, seed, batch_size, guidance_scale)
    probe.pairs = [
        pair for part in gather(probe.pairs, data_parallel(pipe)[1]) for pair in part
    ]  # torchrun: all ranks'
    if len(probe.pairs) < degree + 2:
        raise DitscopeError(f"TeaCache fit: only {len(probe.pairs)} step pairs; use more prompts or steps")
    x, y = np.array([p[0] for p in probe.pairs]), np.array([p[1] for p in probe.pairs])
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    r2 = 1.0 - float((residual**2).sum()) / max(float(((y - y.mean()) ** 2).sum()), 1e-30)
    return {
        "coefficients": [float(c) for c in coefficients],
        "r2": round(r2, 4),
        "points": len(probe.pairs),
        "x_range": [round(float(x.min()), 5), round(float(x.max()), 5)],
    }
