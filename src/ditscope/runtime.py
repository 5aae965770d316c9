"""What every run shares, whoever starts it (the CLI, a study, Python): device, dtype, scheduler and shard
options, the output-folder check, the progress bar. Each check raises a DitscopeError that names the
problem and what to do; the CLI prints it as one line."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DitscopeError

SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "dpm-sde": "DPMSolverSDEScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------- validation
def resolve_scheduler_class(name: str):
    import diffusers

    cls_name = SCHEDULER_ALIASES.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise DitscopeError(
            f"unknown scheduler {name!r}; use a diffusers scheduler class name or one of: {', '.join(SCHEDULER_ALIASES)}"
        )
    return cls


def parse_scheduler(text: str):
    """`NAME` or `NAME:key=value;key=value` (config overrides, e.g. flow-euler:shift=3) -> (class, overrides)."""
    import json

    name, _, rest = text.partition(":")
    cls = resolve_scheduler_class(name)
    overrides = {}
    for item in filter(None, (x.strip() for x in rest.split(";"))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise DitscopeError(f"scheduler option {item!r} is not key=value (e.g. flow-euler:shift=3)")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    import inspect

    known = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise DitscopeError(
            f"{cls.__name__} has no option {unknown[0]!r}; its options: {', '.join(sorted(known))}"
        )
    return cls, overrides


def check_scheduler(spec: str) -> None:
    """`parse_scheduler`, and the option values tried on the scheduler's own defaults: a value it refuses is
    found before any model loads or any variant runs."""
    cls, overrides = parse_scheduler(spec)
    try:
        cls(**overrides).set_timesteps(10)
    except Exception as e:
        raise DitscopeError(f"scheduler {spec}: {_first_line(e)}") from None


def configure_scheduler(pipe, spec: str | None, steps: int) -> None:
    """Give `pipe` the scheduler `spec` (`NAME[:key=value;...]`, None: keep its own) and check, before
    anything runs, that it can sample `steps` steps: a bad option value, or a step count at or beyond the
    scheduler's training timesteps (where DDIM refuses and DPM-Solver repeats timesteps and turns
    non-finite), is a DitscopeError that says so."""
    import copy

    scheduler = pipe.scheduler
    if spec is not None:
        cls, overrides = parse_scheduler(spec)
        try:
            scheduler = cls.from_config(pipe.scheduler.config, **overrides)
        except Exception as e:
            raise DitscopeError(f"--scheduler {spec}: {_first_line(e)}") from None
    name = spec or type(scheduler).__name__
    trained = getattr(scheduler.config, "num_train_timesteps", None)
    if isinstance(trained, int) and steps >= trained:
        raise DitscopeError(
            f"--steps {steps} is at or beyond the {trained} timesteps {type(scheduler).__name__} was "
            f"trained with; use fewer than {trained} steps"
        )
    # a dry run on a copy; schedulers that shift by resolution need a shift (mu) to set timesteps at all
    dynamic = {"mu": 0.0} if getattr(scheduler.config, "use_dynamic_shifting", False) else {}
    try:
        copy.deepcopy(scheduler).set_timesteps(steps, **dynamic)
    except Exception as e:
        raise DitscopeError(f"scheduler {name} cannot sample {steps} steps: {_first_line(e)}") from None
    pipe.scheduler = scheduler


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200].rstrip(". ") if text else "") or type(e).__name__


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DitscopeError(f"--shard must look like i/n (e.g. 0/4), not {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise DitscopeError(f"--shard {text}: need 0 <= i < n")
    return i, n


PLAIN_INTERVAL = 10.0  # seconds between the plain progress lines written where stderr is not a terminal


def progress_bar(unit: str):
    """A rich progress bar on stderr: the task's description, done/total `unit`, time elapsed and left. Where
    stderr is not a terminal (a log file, a batch job) rich draws nothing until the end; there the same
    progress is a plain line every PLAIN_INTERVAL seconds and at the end (`PlainProgress`)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        return PlainProgress(unit)
    return quiet_on_error(Progress)(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def progress_status(description: str):
    """A spinner on stderr with a line of text that `update(text)` replaces (rich's status); where stderr
    is not a terminal, the latest text as a plain line every PLAIN_INTERVAL seconds."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        return PlainStatus(description)
    return console.status(description)


def _clock_text(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


class _Plain:
    """What the plain progress lines share: the clock, and a line when `interval` seconds have passed since
    the last one. `clock` and `interval` are arguments so that a test need not wait."""

    def __init__(self, interval: float | None = None, clock=None):
        import time

        self.interval = PLAIN_INTERVAL if interval is None else interval
        self.clock = clock or time.monotonic
        self.started = self.last = self.clock()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:  # the final state; after an error, the error is the last line
            self.write()
        return False

    def tick(self) -> None:
        if self.clock() - self.last >= self.interval:
            self.write()

    def write(self) -> None:
        import sys

        self.last = self.clock()
        for line in self.lines():
            print(line, file=sys.stderr, flush=True)

    def lines(self) -> list[str]:
        raise NotImplementedError


class PlainProgress(_Plain):
    """rich Progress's calls (`add_task`, `update`, `advance`) as lines such as
    `profiling: 12/40 steps, 1:23 elapsed, ETA 2:10`."""

    def __init__(self, unit: str, interval: float | None = None, clock=None):
        super().__init__(interval, clock)
        self.unit = unit
        self.tasks: list[dict] = []

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        self.tasks.append(
            {"description": description, "total": total, "completed": completed, "started": self.clock()}
        )
        return len(self.tasks) - 1

    def update(self, task: int, *, total=None, completed=None, advance=None, description=None, **_) -> None:
        t = self.tasks[task]
        for key, value in (("total", total), ("completed", completed), ("description", description)):
            if value is not None:
                t[key] = value
        t["completed"] += advance or 0
        self.tick()

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def lines(self) -> list[str]:
        out = []
        for t in self.tasks:
            done, total = int(t["completed"]), t["total"]
            elapsed = self.clock() - t["started"]
            line = (
                f"{t['description']}: {done}/{int(total) if total is not None else '?'} {self.unit}, "
                f"{_clock_text(elapsed)} elapsed"
            )
            if total is not None and 0 < done < total:
                line += f", ETA {_clock_text(elapsed * (total - done) / done)}"
            out.append(line)
        return out


class PlainStatus(_Plain):
    """rich's status (`update(text)`) as lines such as `planning: both: price 10^-1.00, 1:23 elapsed`."""

    def __init__(self, description: str, interval: float | None = None, clock=None):
        super().__init__(interval, clock)
        self.text = description

    def update(self, text: str) -> None:
        self.text = text
        self.tick()

    def lines(self) -> list[str]:
        return [f"{self.text}, {_clock_text(self.clock() - self.started)} elapsed"]


def quiet_on_error(progress_class):
    """`progress_class` (rich's Progress) whose bar disappears when the block raises, so an error (or an
    interruption) is the last and only line on stderr rather than following a frozen bar."""

    class Bar(progress_class):
        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                return super().__exit__(exc_type, exc, tb)
            self.live.transient = True
            self.live.stop()  # not Progress.stop, which ends with a blank line when stderr is not a terminal
            return False

    return Bar


def check_steps(steps: int | None, least: int = 1) -> None:
    """A --steps value: None (the model's default) or at least `least`."""
    if steps is not None and steps < least:
        raise DitscopeError(f"--steps must be at least {least}, not {steps}")


def check_guidance(value: float | None, option: str = "--guidance-scale") -> None:
    """A guidance scale is a finite number >= 0 (nan would turn guidance off without a word)."""
    import math

    if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
        raise DitscopeError(f"{option} must be a finite number >= 0, not {value!r}")


def check_writable_dir(out: Path, option: str = "--out") -> None:
    """Fail early if `out` cannot become a writable folder (creates nothing); the message names `option`,
    the command-line option the folder came from."""
    if out.exists() and not out.is_dir():
        raise DitscopeError(f"output folder {out} exists and is not a folder; choose another {option}")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DitscopeError(f"output folder {out} is not writable (at {probe}); choose another {option}")


def torch_dtype(name: str, device: str):
    import torch

    if name not in DTYPES:
        raise DitscopeError(f"unknown --dtype {name!r}; choose from {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DitscopeError("--device cuda asked for, but torch sees no CUDA device")
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise DitscopeError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise DitscopeError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return name


def synchronize() -> None:
    """Wait for queued GPU work, so that a clock read after it counts it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory(device) -> int | None:
    """Bytes free on `device` now: the GPU's free memory, or for the CPU this process's share of the machine's
    available memory (Linux' MemAvailable over the ranks torchrun started on this machine); None where that
    cannot be read."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
