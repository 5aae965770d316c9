"""The paper's experiments, one function each: profile what is missing, compare, write an HTML report.

Profiles live under `OUT/profiles/<model>/<variant>/profile.ditscope` and are made by the same code as
`ditscope profile` (resumable, shardable under torchrun); a rerun reuses every finished profile. Each
study writes `OUT/<study>/report.html` and `OUT/<study>/result.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..artifact import Profile
from ..errors import DitscopeError
from ..files import write_text_atomic
from ..profiling.job import profile_model
from ..runtime import progress_bar
from . import analysis
from .report import (
    curves_figure,
    figure_png,
    heatmap_figure,
    img,
    layers_figure,
    matrix_figure,
    table_html,
    write_report,
)

STABLE_COV = 0.20  # the paper calls 10-15% stable


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def ensure_profile(
    out: Path,
    model: str,
    variant: str,
    prompts: Path | None,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    log=print,
) -> Profile | None:
    """The profile of `model` under `variant`, computed only if not already saved (None on ranks > 0)."""
    # the folder names the arguments, so a study never reuses a profile made with other ones
    text = prompts.read_bytes() if prompts is not None and prompts.is_file() else b"builtin"
    args = json.dumps([steps, scheduler, seed, dtype, batch_size, hashlib.sha1(text).hexdigest()])
    folder = (
        out
        / "profiles"
        / Path(model).name.replace("/", "_")
        / f"{variant}-{hashlib.sha1(args.encode()).hexdigest()[:8]}"
    )
    final = folder / "profile.ditscope"
    if not final.exists():
        log(f"profiling {model} ({variant})")
        profile_model(
            model=model,
            prompts=prompts,
            steps=steps,
            scheduler=scheduler,
            seed=seed,
            out=folder,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            progress=lambda: progress_bar("steps"),
        )
    if rank() != 0:
        return None
    return Profile.load(final)


def _save(study_dir: Path, result: dict):
    write_text_atomic(study_dir / "result.json", json.dumps(result, indent=2, default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(type(x).__name__)


def _fmt_r(r: float) -> str:
    return "n/a" if not np.isfinite(r) else f"{r:.2f}"


# ------------------------------------------------------------------------------------------ prompts
def study_prompts(model: str, prompts: Path | None, out: Path, n_boot: int = 1000, **kw) -> dict | None:
    """The CoV over prompts per (layer, step, target), its mean per target with a bootstrap CI."""
    prof = ensure_profile(out, model, "default", prompts, **kw)
    if prof is None:
        return None
    if prof.n_prompts < 2:
        raise DitscopeError("the prompts study needs at least 2 prompts; give a longer --prompts file")
    cov = analysis.cov_over_prompts(prof, n_boot=n_boot)
    rows = [
        {"target": t.upper(), "mean CoV": c["cov"], "95% CI low": c["lo"], "95% CI high": c["hi"]}
        for t, c in cov.items()
    ]
    numbers = ", ".join(f"{t.upper()} {c['cov']:.1%} [{c['lo']:.1%}, {c['hi']:.1%}]" for t, c in cov.items())
    stable = [t.upper() for t, c in cov.items() if c["hi"] < STABLE_COV]
    unstable = [t.upper() for t, c in cov.items() if not c["hi"] < STABLE_COV]
    if not unstable:
        judged = f"Stable across prompts: every upper bound is below {STABLE_COV:.0%}"
    elif not stable:
        judged = f"Not stable across prompts: every upper bound reaches {STABLE_COV:.0%} or more"
    else:
        judged = (
            f"Stable across prompts for {' and '.join(stable)} (upper bound below {STABLE_COV:.0%}), "
            f"not for {' and '.join(unstable)}"
        )
    verdict = (
        f"{model}, {prof.n_prompts} prompts: mean CoV over prompts {numbers} (95% BCa bootstrap CI over "
        f"prompts). {judged} (the paper reports 10-15% on real models)."
    )
    study_dir = out / "prompts"
    study_dir.mkdir(parents=True, exist_ok=True)
    fig = heatmap_figure(
        {t: c["per_cell"] for t, c in cov.items()}, f"{model}: CoV over {prof.n_prompts} prompts"
    )
    write_report(
        study_dir / "report.html",
        f"Stability across prompts: {model}",
        verdict,
        [
            (
                "Mean CoV per target (the paper's Table 2), 95% BCa bootstrap CI over prompts",
                table_html(rows),
            ),
            (
                "CoV per layer and step (blank rows: layers whose tensor never changes, the text K and V "
                "of cross-attention)",
                img(figure_png(fig), "CoV heatmaps"),
            ),
        ],
        meta=_meta(prof),
        holds=not unstable,
    )
    result = {
        "study": "prompts",
        "model": model,
        "n_prompts": prof.n_prompts,
        "verdict": verdict,
        "cov": {t: {k: v for k, v in c.items() if k != "per_cell"} for t, c in cov.items()},
    }
    _save(study_dir, result)
    return result


# ------------------------------------------------------------------------------- steps / scheduler
def study_variants(
    kind: str, model: str, variants: dict[str, dict], prompts: Path | None, out: Path, **kw
) -> dict | None:
    """Profiles of one model under several step counts or schedulers, compared on the normalised axis."""
    profiles = {}
    for name, args in variants.items():
        profiles[name] = ensure_profile(out, model, f"{kind}-{name}", prompts, **{**kw, **args})
    if rank() != 0:
        return None
    cmp = analysis.compare(profiles)
    pair_rows = [
        {
            "profiles": f"{p['a']} vs {p['b']}",
            "target": p["target"].upper(),
            "overall r": p["overall_r"],
            "mean per-layer r": p["mean_layer_r"],
            "min per-layer r": float(np.nanmin(p["layer_r"])),
        }
        for p in cmp["pairs"]
    ]
    cp_rows = [
        {"profile": n, **{f"change point {t.upper()}": x for t, x in cps.items()}}
        for n, cps in cmp["change_points"].items()
    ]
    label = "step counts" if kind == "steps" else "schedulers"
    verdict = (
        f"Within-model stability across {label} ({', '.join(variants)}) for {model}: r = {_fmt_r(cmp['r'])} "
        f"(mean over pairs and targets of the correlation of log distance maps on the normalised step axis)."
    )
    maps = {n: ms["a"] for n, ms in cmp["maps"].items() if "a" in ms}
    # layers whose tensor never changes are NaN rows of the maps: average over the others
    curves = {n: {t: np.nanmean(m, axis=0) for t, m in ms.items()} for n, ms in cmp["maps"].items()}
    study_dir = out / kind / Path(model).name
    study_dir.mkdir(parents=True, exist_ok=True)
    write_report(
        study_dir / "report.html",
        f"Stability across {label}: {model}",
        verdict,
        [
            ("Correlation between profiles", table_html(pair_rows)),
            ("Largest change point (normalised step, mean over layers)", table_html(cp_rows, "{:.2f}")),
            ("Mean over layers", img(figure_png(curves_figure(curves, model)), "curves")),
            ("Per layer, attention output A", img(figure_png(layers_figure(maps, "a", model)), "layers")),
        ],
        meta=_meta_variants(profiles),
    )
    result = {
        "study": kind,
        "model": model,
        "variants": list(variants),
        "r": cmp["r"],
        "verdict": verdict,
        "pairs": cmp["pairs"],
        "change_points": cmp["change_points"],
    }
    _save(study_dir, result)
    return result


# ---------------------------------------------------------------------------------------- models
def study_models(models: list[str], prompts: Path | None, out: Path, **kw) -> dict | None:
    """Several models on the normalised axis: the cross-model correlation matrix, beside the within-model
    r of any steps / scheduler study already run under the same OUT."""
    if len(models) < 2:
        raise DitscopeError("the models study compares at least 2 models")
    profiles = {m: ensure_profile(out, m, "default", prompts, **kw) for m in models}
    if rank() != 0:
        return None
    cross = analysis.cross_model(profiles)
    within = []
    for m in models:
        row = {"model": m}
        for kind in ("steps", "scheduler"):
            f = out / kind / Path(m).name / "result.json"
            row[f"within r ({kind})"] = json.loads(f.read_text())["r"] if f.exists() else float("nan")
        within.append(row)
    within_rs = [v for r in within for k, v in r.items() if k != "model" and np.isfinite(v)]
    verdict = (
        f"Across models ({', '.join(models)}): r = {_fmt_r(cross['r'])} (mean off-diagonal correlation of "
        f"depth- and step-normalised log distance maps)"
        + (
            f"; within models: r = {_fmt_r(float(np.mean(within_rs)))} (steps and scheduler studies)."
            if within_rs
            else "; run the steps / scheduler studies with the same --out to set within-model r beside it."
        )
    )
    matrix_rows = [
        {"model": a, **{b: cross["matrix"][i, j] for j, b in enumerate(cross["names"])}}
        for i, a in enumerate(cross["names"])
    ]
    study_dir = out / "models"
    study_dir.mkdir(parents=True, exist_ok=True)
    write_report(
        study_dir / "report.html",
        "Redundancy across models",
        verdict,
        [
            ("Cross-model correlation", table_html(matrix_rows, "{:.2f}")),
            ("Within-model stability (from the steps and scheduler studies)", table_html(within, "{:.2f}")),
            (
                "Correlation matrix",
                img(figure_png(matrix_figure(cross["names"], cross["matrix"], "cross-model r")), "matrix"),
            ),
            ("Mean over depth", img(figure_png(curves_figure(cross["curves"], "models")), "curves")),
        ],
    )
    result = {
        "study": "models",
        "models": models,
        "r": cross["r"],
        "matrix": cross["matrix"],
        "within": within,
        "verdict": verdict,
    }
    _save(study_dir, result)
    return result


def _meta_variants(profiles: dict[str, Profile]) -> str:
    """What each compared profile was: its steps and scheduler (the variants differ exactly there)."""
    first = next(iter(profiles.values()))
    each = "; ".join(f"{name}: {p.n_steps} steps, {p.meta.get('scheduler')}" for name, p in profiles.items())
    return (
        f"model {first.meta.get('model')}; {each}; {first.n_prompts} prompts, seed {first.meta.get('seed')}, "
        f"ditscope {first.meta.get('ditscope_version')}"
    )


def _meta(p: Profile) -> str:
    m = p.meta
    return (
        f"model {m.get('model')}, scheduler {m.get('scheduler')}, "
        f"{p.n_steps} steps, {p.n_prompts} prompts, seed {m.get('seed')}, ditscope {m.get('ditscope_version')}"
    )
