"""Run a bench: every setting on the same prompts and seeds, timed, FLOPs counted, quality scored.

For each setting: apply it (ditscope method, peer cache, or fewer steps), generate every prompt x seed
once (the images that are scored, their executed FLOPs counted with torch.utils.flop_counter; this pass
is also the warm-up), time `repeats` further passes (median), remove it. Quality is measured against the
uncached images of the same prompt and seed (PSNR, SSIM; LPIPS when its weights are here) and, for zoo
models, against the prompts (the zoo evaluator's attribute accuracy and Fréchet distance).

Every finished setting is appended to `results.jsonl` and its images saved, so a killed bench rerun
with the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache.plan import PlanConfig
from ..errors import DitscopeError
from ..files import load_images, save_images, write_text_atomic
from ..holds import hold
from ..profiling.workload import Workload, barrier, data_parallel, from_first, gather, writes
from ..stats.quality import as_frames, per_sample_psnr_ssim
from .grid import BASELINE, FEWER_STEPS, Setting, option_strings

ATTRIBUTES = ("shape", "color", "size", "position", "background", "motion")
RESULTS = "results.jsonl"
META = "bench.json"


@dataclass
class BenchInputs:
    """What every setting runs on."""

    model: str
    prompts: list  # strings, or class labels for class-conditional models
    seeds: list[int]
    steps: int
    guidance_scale: float | None
    batch_size: int
    repeats: int
    scenes: list | None = None  # zoo scenes behind the prompts (enables attribute accuracy / Fréchet)
    class_conditional: bool = False  # prompts are class labels: accuracy is per class (shape x colour)
    prompt_seed: int | None = None  # zoo models: the seed the prompts were drawn with (None: a prompt file)
    calibration: list | None = None  # prompts a plan is fitted on (never the bench's own)
    calibration_seed: int | None = None  # zoo models: the seed they were drawn with
    identity: dict | None = None  # the pipeline's weights, dtype and scheduler (calibrate.pipeline_identity)

    def meta(self) -> dict:
        meta = {
            "model": self.model,
            "prompts": [str(p) for p in self.prompts],
            "prompt_seed": self.prompt_seed,
            "seeds": self.seeds,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "identity": self.identity,
        }
        if self.calibration:
            meta.update(
                calibration=[str(p) for p in self.calibration], calibration_seed=self.calibration_seed
            )
        return meta

    def workload(self) -> Workload:
        """Every prompt x seed: sample (seed s, prompt i) draws its noise from one generator in every setting."""
        return Workload(self.prompts, self.steps, tuple(self.seeds), self.batch_size, self.guidance_scale)


# --------------------------------------------------------------------------------------- quality
def lpips_metric():
    """LPIPS when torchvision and its AlexNet weights are on this machine (never downloads), else a note."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None, "LPIPS skipped: torchvision is not installed"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return None, f"LPIPS skipped: AlexNet weights are not in {hub} (ditscope never downloads)"
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    # every image is on every rank: no torchrun gathering of the ranks' copies
    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, sync_on_compute=False), None


def prompt_quality(images: torch.Tensor, inputs: BenchInputs, evaluator_net) -> tuple[dict, dict]:
    """Attribute accuracy and Fréchet distance of zoo images (or videos) against the prompts' scenes, and
    per sample its part in the accuracy (their mean is the accuracy) and whether all were right (for paired
    intervals)."""
    import numpy as np

    from ..zoo import evaluator

    scenes = list(inputs.scenes) * len(inputs.seeds)
    acc = evaluator.score(evaluator_net, images, scenes, inputs.class_conditional)
    out = {k: acc[k] for k in (*ATTRIBUTES, "all") if k in acc}
    scored = [k for k in ATTRIBUTES if k in acc]
    out["accuracy"] = sum(acc[k] for k in scored) / len(scored)
    out["frechet"] = (
        evaluator.frechet_to_real(evaluator_net, images, scenes) if len(images) >= 2 else math.nan
    )
    hits = evaluator.sample_hits(evaluator_net, images, scenes, inputs.class_conditional)
    # a sample's part in `accuracy`: the attributes read per object (pooled over objects) count its share of them
    # right times its objects over the mean objects per sample, so that the mean over samples is `accuracy` itself
    # and the paired interval is of the drop the table reports (unweighted shares, on up to 2 objects per prompt,
    # gave per-sample drops averaging 40 points beside a reported drop of 48: tests/test_oracle_quality.py)
    objects = np.array([len(s.objects) for s in scenes], dtype=float)
    weight = objects / objects.mean()
    per_object = () if inputs.class_conditional else ("shape", "color", "size", "position")
    parts = [hits[k] * weight if k in per_object else hits[k] for k in scored]
    per_sample = {"accuracy": np.mean(parts, axis=0).tolist(), "all": hits["all"].tolist()}
    return out, per_sample


# ---------------------------------------------------------------------------------------- apply
# how a plan runs (every PlanConfig option but the plan itself), not how it is made
RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(PlanConfig) if f.name not in ("plan", "path"))


def plan_setting(setting: Setting) -> Setting:
    """The setting that makes the plan `setting` runs: settings that differ only in how it runs share it."""
    return Setting(
        setting.system, setting.method, {k: v for k, v in setting.options.items() if k not in RUN_OPTIONS}
    )


def planned(pipe, setting: Setting, inputs: BenchInputs, out: Path | None):
    """The plan of a `plan target=...` setting, fitted on the calibration prompts (kept in OUT/plans/; settings
    that differ only in how the plan runs, e.g. adaptive, share it)."""
    from ..cache.schedule_data import Schedule
    from ..planning.planner import plan

    if not inputs.calibration:
        raise DitscopeError("the plan method needs calibration prompts apart from the bench's")
    making = plan_setting(setting)
    path = out / "plans" / f"{making.key}.plan.json" if out is not None else None
    if _saved(path):
        return Schedule.load(path)
    opts = {k: v for k, v in making.options.items() if k != "target"}
    schedule = plan(
        pipe,
        inputs.calibration,
        making.options["target"],
        inputs.steps,
        batch_size=inputs.batch_size,
        guidance_scale=inputs.guidance_scale,
        work_dir=path.with_suffix(".work") if path else None,
        **opts,
    )
    if path is not None and writes():
        import shutil

        schedule.save(path)
        shutil.rmtree(path.with_suffix(".work"), ignore_errors=True)
    barrier()
    return schedule


def tuned(pipe, setting: Setting, inputs: BenchInputs, out: Path | None):
    """The fitted options of a `METHOD tune=TARGET` setting, fitted on the calibration prompts (kept in
    OUT/tuned/)."""
    import shutil

    from .tune import Tuned, tune

    if not inputs.calibration:
        raise DitscopeError("a tune= setting needs calibration prompts apart from the bench's")
    path = out / "tuned" / f"{setting.key}.json" if out is not None else None
    if _saved(path):
        return Tuned.load(path)
    failed = path.with_suffix(".failed") if path is not None else None
    if _saved(failed):  # a target this method cannot reach: not searched again
        raise DitscopeError(f"{failed.read_text().strip()} (recorded in {failed}; delete it to search again)")
    fixed = {k: v for k, v in setting.options.items() if k != "tune"}
    try:
        result = tune(
            pipe,
            setting.method,
            inputs.calibration,
            setting.options["tune"],
            inputs.steps,
            batch_size=inputs.batch_size,
            guidance_scale=inputs.guidance_scale,
            options=fixed,
            work_dir=path.with_suffix(".work") if path else None,
        )
    except DitscopeError as e:
        if failed is not None and writes():  # the search may fail before it made OUT/tuned/
            failed.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(failed, str(e))
            shutil.rmtree(path.with_suffix(".work"), ignore_errors=True)
        barrier()
        raise
    if path is not None and writes():
        result.save(path)
        shutil.rmtree(path.with_suffix(".work"), ignore_errors=True)
    barrier()
    return result


def samples_file(out: Path, key: str) -> Path:
    """Where a bench in `out` keeps the samples of the setting `key` (files.save_images)."""
    return Path(out) / "images" / f"{key}.safetensors"


def _saved(path: Path | None) -> bool:
    """Whether `path` was saved by an earlier run, as the first rank sees it (under torchrun every rank must
    take the same branch, and a rank that looks after the first rank wrote it would not)."""
    return from_first(path is not None and path.exists())


def applied(pipe, setting: Setting, inputs: BenchInputs, out: Path | None = None):
    """Apply `setting` to `pipe`; returns (steps to run, remove function)."""
    if setting.method in (BASELINE, FEWER_STEPS):
        return (setting.steps or inputs.steps), (lambda: None)
    if setting.system == "ditscope" and setting.method == "plan" and "target" in setting.options:
        from ..cache import PlanConfig, apply

        run = {k: v for k, v in setting.options.items() if k in RUN_OPTIONS}
        handle = apply(pipe, PlanConfig(planned(pipe, setting, inputs, out), **run))
        return inputs.steps, handle.remove
    options = dict(setting.options)
    if "tune" in options:  # fitted on the calibration prompts first
        options = tuned(pipe, setting, inputs, out).options
    if setting.system == "ditscope":
        from ..cache import apply, config_from_options

        handle = apply(pipe, config_from_options(setting.method, option_strings(options)))
        return inputs.steps, handle.remove
    from .peers import apply_peer

    def run_once():
        return inputs.workload().call(pipe, [0])

    return inputs.steps, apply_peer(
        setting.method, pipe, options, inputs.steps, run_once, calibration_run(pipe, inputs)
    )


def calibration_run(pipe, inputs: BenchInputs):
    """The uncached run over the calibration prompts that peers calibrating a schedule (SmoothCache) fit on,
    as plans and tune= settings do (None when the bench has none: they then fit on one bench prompt)."""
    if not inputs.calibration:
        return None
    from ..profiling.workload import generate

    def calibrate():
        return generate(pipe, inputs.calibration, inputs.steps, 0, inputs.batch_size, inputs.guidance_scale)

    calibrate.key = json.dumps(
        [
            "bench",
            [str(p) for p in inputs.calibration],
            inputs.steps,
            inputs.batch_size,
            inputs.guidance_scale,
        ]
    )
    return calibrate


# ------------------------------------------------------------------------------------------ run
def run_bench(
    pipe,
    settings: list[Setting],
    inputs: BenchInputs,
    out: Path,
    evaluator_net=None,
    progress=None,
    log=print,
) -> list[dict]:
    """Run every setting not already in `out/results.jsonl`; return all rows (old and new).

    Under torchrun the ranks share the samples of every setting (profiling/workload.py) and the first rank
    scores and writes them; every rank returns the same rows."""
    problem = from_first(_start(out, inputs) if writes() else None)
    if problem:
        raise DitscopeError(problem)
    rows = from_first({r["key"]: r for r in read_rows(out)} if writes() else None)
    kept = sum(s.key in rows for s in settings)
    if kept:
        log(f"resuming {out}: {kept} of {len(settings)} settings already measured")
    lpips, lpips_note = lpips_metric()
    reference = None
    for setting in settings:
        path = samples_file(out, setting.key)
        if setting.key in rows and _saved(path):
            if setting.method == BASELINE:
                reference = from_first(load_images(path) if writes() else None)
            if progress:
                progress(setting, rows[setting.key])
            continue
        try:
            row = run_setting(pipe, setting, inputs, reference, evaluator_net, lpips, lpips_note, out)
        except _Skip as skip:
            log(f"skipped {setting.label}: {skip}")
            row = {"note": str(skip), "skipped": True}
            images = None
        else:
            images = row.pop("_images")
        row.update(
            key=setting.key,
            system=setting.system,
            method=setting.method,
            label=setting.label,
            options=json.dumps(setting.options, sort_keys=True),
            steps=setting.steps or inputs.steps,
        )
        if images is not None:
            if writes():
                save_images(path, images)
            if setting.method == BASELINE:
                reference = images
        append_row(out, row)
        rows[setting.key] = row
        if progress:
            progress(setting, row)
    _retime_baseline(pipe, settings, inputs, out, rows)
    return [rows[s.key] for s in settings if s.key in rows]


def _start(out: Path, inputs: BenchInputs) -> str | None:
    """Make `out` (its bench.json names the inputs) or check that it holds a bench of the same inputs: the
    reason it cannot be used, or None."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    if not meta_path.exists():
        write_text_atomic(meta_path, json.dumps(inputs.meta(), indent=2))
        return None
    saved, meta = json.loads(meta_path.read_text()), inputs.meta()
    if saved == meta:
        return None
    changed = sorted(k for k in saved.keys() | meta.keys() if saved.get(k) != meta.get(k))
    # the identity is what no argument sets: the weights (their fingerprint), dtype and scheduler
    named = [k if k != "identity" else "identity (weights, dtype or scheduler)" for k in changed]
    return f"{out} holds a bench with other {', '.join(named)}; use another --out or the same arguments"


def _retime_baseline(pipe, settings, inputs: BenchInputs, out: Path, rows: dict):
    """Time the uncached run again at the end, so that its median spans the whole bench: a machine that
    drifts (load, clocks) would otherwise bias every speedup against the one early baseline."""
    base = next((s for s in settings if s.method == BASELINE), None)
    row = rows.get(base.key) if base else None
    if row is None or row.get("retimed") or len(settings) < 3 or not inputs.repeats:
        return
    row["seconds_all"] += inputs.workload().seconds(pipe, inputs.repeats)
    row["seconds"] = from_first(statistics.median(row["seconds_all"]))
    row["retimed"] = True
    append_row(out, row)


class _Skip(Exception):
    pass


def run_setting(
    pipe,
    setting: Setting,
    inputs: BenchInputs,
    reference,
    evaluator_net,
    lpips,
    lpips_note,
    out: Path | None = None,
) -> dict:
    from .peers import PeerUnavailable

    try:
        steps, remove = applied(pipe, setting, inputs, out)
    except PeerUnavailable as e:
        raise _Skip(str(e).splitlines()[0]) from None
    except DitscopeError as e:
        if "tune" not in setting.options and setting.method != "plan":
            raise
        # a target the method cannot reach, or a plan that cannot run as asked (one made before it carried an
        # adaptive signal), is a row saying so, not the end of a bench hours long
        raise _Skip(str(e)) from None
    notes = [lpips_note] if lpips_note else []
    if "tune" in setting.options and out is not None:
        fitted = tuned(pipe, setting, inputs, out)  # read back from OUT/tuned/
        notes.append(f"fitted {fitted.meta['knob']}={fitted.meta['value']:.4g}")
    try:
        from ..cache.flops import flop_counter

        work = inputs.workload()
        with flop_counter() as counter:  # the scored images, their FLOPs, and the warm-up
            images = work.run(pipe, steps)
        flops = float(
            sum(gather(counter.get_total_flops(), data_parallel(pipe)[1]))
        )  # torchrun: every rank's share
        times = from_first(work.seconds(pipe, inputs.repeats, steps))
    finally:
        remove()
    row = {
        "seconds": statistics.median(times) if times else None,
        "seconds_all": times,
        "flops": flops,
        "n_images": len(images),
        "video": images.dim() == 5,
        "_images": images,
    }
    if setting.method == BASELINE:
        reference = images
    per_sample = {}  # the values behind every quality mean, for the report's paired intervals
    if reference is not None:
        per_sample["psnr"], per_sample["ssim"] = per_sample_psnr_ssim(images, reference)
        row["psnr"], row["ssim"] = statistics.fmean(per_sample["psnr"]), statistics.fmean(per_sample["ssim"])
        if lpips is not None:
            row["lpips"] = float(lpips(as_frames(images), as_frames(reference)))
    if inputs.scenes is not None and evaluator_net is not None:
        scores, hits = prompt_quality(images, inputs, evaluator_net)
        row.update(scores)
        per_sample.update(hits)
    row["per_sample"] = per_sample
    row["note"] = "; ".join(notes)
    return row


def append_row(out: Path, row: dict):
    """One line per setting: a kill loses at most the current one; a later line of a key wins when read.
    Under torchrun the first rank writes."""
    if writes():
        with open(out / RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        hold("bench row saved")
    barrier()


def read_rows(out: Path) -> list[dict]:
    path = out / RESULTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that setting reruns
            continue
    return rows
