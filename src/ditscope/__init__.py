"""ditscope: measure where a diffusion transformer repeats itself across denoising steps.

profile = ditscope.profile(pipe, prompts, num_inference_steps=20, seed=0)
profile.to_pandas(); profile.plot("figures/"); profile.save("p.ditscope")

with ditscope.record(model, attention="MyAttention") as rec:   # any model that calls SDPA
    for prompt in prompts:
        my_sampling_loop(model, prompt)
        rec.next_sample()
profile = rec.profile()

handle = ditscope.apply(pipe, ditscope.ToCaConfig())   # token-wise caching, and seven more methods
image = pipe(prompt).images[0]; print(handle.stats()); handle.remove()
"""

from . import zoo  # noqa: E402  (ditscope.zoo.load(...) with a plain `import ditscope`)
from .artifact import Profile  # noqa: E402
from .cache import (  # noqa: E402
    DeltaDiTConfig,
    DuCaConfig,
    FBCacheConfig,
    FORAConfig,
    PABConfig,
    PlanConfig,
    Schedule,
    TaylorSeerConfig,
    TeaCacheConfig,
    ToCaConfig,
    apply,
    schedule_of,
)
from .capture.recorder import Recorder  # noqa: E402
from .errors import DitscopeError  # noqa: E402
from .families import Blocks, Child  # noqa: E402  (a declared block layout: ditscope.apply(model, c, layout=...))
from .profiling.runner import profile  # noqa: E402
from .version import __version__  # noqa: E402

Plan = Schedule  # what `ditscope.plan` returns: Plan.load("x.plan.json"), plan.save(...)


def plan(pipe, prompts, target: str = "psnr=35", num_inference_steps: int = 20, **kwargs) -> Schedule:
    """Plan the cache of `pipe` from its measured redundancy on calibration `prompts` so that `target`
    (psnr=, ssim=, speedup=, flops=) holds; see `ditscope.planning.planner.plan`."""
    from .planning.planner import plan as _plan

    return _plan(pipe, prompts, target, num_inference_steps, **kwargs)


def tune(pipe, method: str, prompts, target: str = "psnr=35", num_inference_steps: int = 20, **kwargs):
    """Fit `method`'s knob (a threshold, ratio or interval) on calibration `prompts` so that `target`
    (psnr=, ssim=, speedup=) holds; returns a `Tuned` (`.config()` for `apply`, `.save(path)`). See
    `ditscope.bench.tune.tune`."""
    from .bench.tune import tune as _tune

    return _tune(pipe, method, prompts, target, num_inference_steps, **kwargs)


def __getattr__(name):
    if name == "Tuned":  # a fitted config: Tuned.load("x.json").config()
        from .bench.tune import Tuned

        return Tuned
    raise AttributeError(f"module 'ditscope' has no attribute {name!r}")


def record(model, attention=None, **kwargs) -> Recorder:
    """Record attention redundancy of `model` while it runs; each forward is one step.

    `attention` names the attention modules: a class name, a glob or regex on module names, or a list
    (default: every module with a `.processor`, i.e. diffusers attention). See `Recorder` for options.
    """
    return Recorder(model, attention=attention, **kwargs)


__all__ = [
    "Blocks",
    "Child",
    "DeltaDiTConfig",
    "DitscopeError",
    "DuCaConfig",
    "FBCacheConfig",
    "FORAConfig",
    "PABConfig",
    "Plan",
    "PlanConfig",
    "Profile",
    "Recorder",
    "Schedule",
    "schedule_of",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "ToCaConfig",
    "Tuned",
    "__version__",
    "apply",
    "profile",
    "record",
    "tune",
    "zoo",
]
