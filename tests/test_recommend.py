"""`ditscope recommend` (which cache to use for a quality target) and `ditscope generate --compare`.

Expected numbers are recomputed here with plain numpy from what the commands save (per-prompt values, the
images), not with ditscope's helpers; ditscope runs only what is under test (and the pipeline, to recompute
the per-prompt PSNR of the fewer-steps baseline)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from ditscope.errors import DitscopeError

SMALL = [
    "--steps",
    "4",
    "--n-prompts",
    "2",
    "--test-prompts",
    "3",
    "--candidates",
    "steps,fora",
    "--target",
    "psnr=20",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread, as under the suite's two workers: on a machine shared with other jobs two threads
    each made these runs several times slower."""
    yield


def _cli(*args):
    from typer.testing import CliRunner

    from ditscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------ oracles
def o_psnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.clip(np.asarray(a, np.float64), 0, 1), np.clip(np.asarray(b, np.float64), 0, 1)
    mse = float(np.mean((a - b) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(1 / mse))


def o_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Gaussian-window SSIM of (C, H, W) images (11 taps, sigma 1.5, reflect padding, k1 0.01, k2 0.03)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    taps = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    w = np.outer(taps, taps) / taps.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    h, wd = a.shape[1:]
    maps = []
    for c in range(a.shape[0]):
        pa, pb = np.pad(a[c], 5, mode="reflect"), np.pad(b[c], 5, mode="reflect")

        def filt(x):
            return sum(w[i, j] * x[i : i + h, j : j + wd] for i in range(11) for j in range(11))

        ma, mb = filt(pa), filt(pb)
        va, vb = np.maximum(filt(pa * pa) - ma**2, 0), np.maximum(filt(pb * pb) - mb**2, 0)
        cov = filt(pa * pb) - ma * mb
        maps.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(maps))


def o_percentile(values, q: float) -> float:
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def o_lower(values, n_resamples: int = 2000) -> float:
    """The lower end of the 95% percentile bootstrap of the mean with the draws the implementation makes
    (Generator(0).integers(0, n, (B, n))), each resample's mean by a plain sum."""
    x = [float(v) for v in values]
    if all(v == x[0] for v in x):
        return x[0]
    idx = np.random.default_rng(0).integers(0, len(x), (n_resamples, len(x)))
    means = [sum(x[j] for j in row) / len(x) for row in idx]
    return o_percentile(means, 2.5)


def _table(stdout: str) -> dict:
    """name -> printed numbers of the scored rows."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(
            r"\s*\d+\s+(\S+)\s+.*?\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
            r"(holds|misses)$",
            line,
        )
        if m:
            keys = ("speedup", "psnr", "psnr_lo", "psnr_p5", "ssim", "ssim_lo")
            rows[m[1]] = {**dict(zip(keys, map(float, m.groups()[1:7]))), "holds": m[8] == "holds"}
    return rows


# ------------------------------------------------------------------------------------------- tests
def test_recommend_table_is_recomputed_from_the_saved_values_and_the_line_names_the_fastest_that_holds(
    tmp_path, monkeypatch
):
    import torch

    monkeypatch.chdir(tmp_path)
    r = _cli("recommend", "tiny-pixart", *SMALL, "--out", "rec")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "rec" / "tiny-pixart.recommend.json").read_text())
    printed = _table(r.stdout)
    scored = [c for c in saved["candidates"] if c["status"] == "scored"]
    assert {c["name"] for c in scored} == set(printed) and scored
    want = {}
    for c in scored:
        psnr, ssim = c["per_sample"]["psnr"], c["per_sample"]["ssim"]
        assert len(psnr) == len(ssim) == 3
        want[c["name"]] = w = {
            "speedup": saved["reference_flops"] / c["flops"],
            "psnr": sum(psnr) / 3,
            "psnr_lo": o_lower(psnr),
            "psnr_p5": o_percentile(psnr, 5),
            "ssim": sum(ssim) / 3,
            "ssim_lo": o_lower(ssim),
        }
        got = printed[c["name"]]
        for key, digits in (
            ("speedup", 2),
            ("psnr", 1),
            ("psnr_lo", 1),
            ("psnr_p5", 1),
            ("ssim", 3),
            ("ssim_lo", 3),
        ):
            assert got[key] == pytest.approx(w[key], abs=0.5 * 10**-digits + 1e-9), (c["name"], key)
        assert got["holds"] == (w["psnr_lo"] >= 20)
    # the choice: the fastest candidate whose held-out lower end reaches the target
    held = [n for n in want if want[n]["psnr_lo"] >= 20]
    best = max(held, key=lambda n: want[n]["speedup"]) if held else None
    assert saved["chosen"] == best
    use = r.stdout.strip().splitlines()[-1]
    assert use == saved["use"] and use.startswith("use: ")
    if best == "fora":
        assert use.startswith("use: --cache rec/tiny-pixart.fora.json --steps 4 ")
        g = _cli(
            "generate",
            "tiny-pixart",
            "--prompt",
            "a red circle",
            "--steps",
            "4",
            "--out",
            "g.png",
            "--cache",
            "rec/tiny-pixart.fora.json",
        )
        assert g.exit_code == 0, g.output
    if best is not None:
        w = want[best]
        assert use.endswith(
            f"{w['speedup']:.2f}x FLOPs, {w['psnr']:.1f} dB (lower {w['psnr_lo']:.1f}) on 3 held-out prompts"
        )
    # the per-prompt PSNR of the fewer-steps baseline is that of its images against the full-step ones
    steps = next(c for c in saved["candidates"] if c["name"] == "steps")
    if steps["status"] == "scored":
        from ditscope import zoo
        from ditscope.profiling.workload import generate

        pipe = zoo.load_pipeline("tiny-pixart")
        pipe.set_progress_bar_config(disable=True)
        prompts, g = saved["test"]["prompts"], zoo.ZOO["tiny-pixart"].guidance_scale
        with torch.inference_mode():
            full = generate(pipe, prompts, 4, guidance_scale=g).numpy()
            fewer = generate(pipe, prompts, steps["steps"], guidance_scale=g).numpy()
        ours = [o_psnr(fewer[i], full[i]) for i in range(3)]
        assert steps["per_sample"]["psnr"] == pytest.approx(ours, abs=1e-3)
    assert not any(
        p.name.startswith(".") for p in (tmp_path / "rec").iterdir()
    )  # finished: no work folder left


def test_the_choice_rule_on_constructed_rows():
    from ditscope.bench.recommend import Recommendation, choose, ranked
    from ditscope.planning.planner import Target

    psnr35 = Target.parse("psnr=35")

    def row(name, speedup, lo, status="scored", ssim_lo=0.9):
        return {
            "name": name,
            "status": status,
            "speedup": speedup,
            "psnr_lo": lo,
            "ssim_lo": ssim_lo,
            "holds": lo >= 35,
            "note": "",
        }

    rows = [
        row("slow", 1.5, 40),
        row("fast-miss", 4.0, 34.9),
        row("fast", 2.8, 35.0),
        row("mid", 2.2, 38),
        {"name": "toca", "status": "unreachable", "note": "x"},
        {"name": "pab", "status": "skipped", "note": "y"},
    ]
    assert (
        choose(rows, psnr35)["name"] == "fast"
    )  # the fastest that holds; a faster one that misses is not chosen
    assert [r["name"] for r in ranked(rows, psnr35)] == ["fast", "mid", "slow", "fast-miss", "toca", "pab"]
    # equal speed: the higher lower end wins
    assert choose([row("a", 2.0, 36), row("b", 2.0, 37)], psnr35)["name"] == "b"
    # none holds: no cache, said so
    none = [row("x", 3.0, 30), {"name": "y", "status": "unreachable", "note": ""}]
    assert choose(none, psnr35) is None
    rec = Recommendation(psnr35, 20, none, [], 1.0, 8, 16, None)
    assert (
        rec.use_line(None, False)
        == "use: no cache (no candidate that saves work held psnr=35 on the 16 held-out prompts)"
    )
    # one that holds by computing everything (1.00x FLOPs) is no cache either; a faster one that holds wins
    assert choose([row("everything", 1.0, 100)], psnr35) is None
    assert choose([row("everything", 1.0, 100), row("some", 1.01, 36)], psnr35)["name"] == "some"
    # fewer steps wins as a step count, with no config file
    fewer = {**row("steps", 2.5, 36), "psnr": 37.04, "ssim": 0.95}
    rec = Recommendation(psnr35, 20, [fewer], [{"name": "steps", "steps": 8}], 1.0, 8, 16, fewer)
    assert (
        rec.use_line(None, False)
        == "use: --steps 8 (no cache)   2.50x FLOPs, 37.0 dB (lower 36.0) on 16 held-out prompts"
    )
    # an SSIM target decides on the SSIM lower end
    ssim = Target.parse("ssim=0.95")
    assert choose([row("a", 3.0, 50, ssim_lo=0.94), row("b", 2.0, 30, ssim_lo=0.96)], ssim)["name"] == "b"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "psnr"], "unknown target"),
        (["--target", "speedup=2"], "recommend keeps a quality target"),
        (["--target", "psnr=500"], "unreachable"),
        (["--budget", "0"], "longer than 0"),
        (["--budget", "ten minutes"], "use a duration such as 10m"),
        (["--budget", "-5m"], "use a duration such as 10m"),
        (["--candidates", "fora,bogus"], "unknown candidate 'bogus'"),
        (["--candidates", "fora,fora"], "listed twice"),
        (["--steps", "1"], "--steps must be at least 2"),
        (["--test-seed", "7000"], "must differ from --prompt-seed"),
    ],
)
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, monkeypatch, args, message):
    from ditscope import zoo

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(zoo, "load_pipeline", no_load)
    monkeypatch.chdir(tmp_path)
    r = _cli("recommend", "tiny-pixart", *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr
    assert not list(tmp_path.iterdir())


def test_budget_parsing():
    from ditscope.bench.recommend import parse_budget

    assert [parse_budget(t) for t in ("10m", "90s", "1h", "600", "1.5m", " 2M ")] == [
        600,
        90,
        3600,
        600,
        90,
        120,
    ]
    with pytest.raises(DitscopeError):
        parse_budget("10 minutes")


def test_an_interrupted_run_resumes_and_other_arguments_start_fresh(tmp_path, monkeypatch):
    from ditscope.bench import recommend as rec

    real, fitted = rec._fit, []

    def counting(pipe, name, *a, **k):
        fitted.append(name)
        return real(pipe, name, *a, **k)

    def killed_at_fora(pipe, name, *a, **k):
        if name == "fora":
            raise KeyboardInterrupt
        return counting(pipe, name, *a, **k)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rec, "_fit", killed_at_fora)
    r = _cli("recommend", "tiny-pixart", *SMALL, "--out", "rec")
    assert r.exit_code == 130 and "interrupted: 1 of 2 candidates are kept" in r.stderr, r.output
    assert fitted == ["steps"] and not (tmp_path / "rec" / "tiny-pixart.recommend.json").exists()
    monkeypatch.setattr(rec, "_fit", counting)
    r = _cli("recommend", "tiny-pixart", *SMALL, "--out", "rec")
    assert r.exit_code == 0, r.output
    assert fitted == ["steps", "fora"]  # the finished candidate was not fitted again
    first = json.loads((tmp_path / "rec" / "tiny-pixart.recommend.json").read_text())
    assert {c["name"] for c in first["candidates"]} == {"steps", "fora"}
    # another argument (fewer held-out prompts) does not reuse the old work
    r = _cli("recommend", "tiny-pixart", *SMALL[:5], "2", *SMALL[6:], "--out", "rec")
    assert r.exit_code == 0, r.output
    assert fitted == ["steps", "fora", "steps", "fora"]
    assert json.loads((tmp_path / "rec" / "tiny-pixart.recommend.json").read_text())["n_test"] == 2


def test_a_closed_time_box_names_what_it_skipped_and_keeps_the_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _cli("recommend", "tiny-pixart", *SMALL, "--budget", "0.01s", "--out", "rec")
    assert r.exit_code == 0, r.output
    assert "not finished in the time box (0.01s): steps, fora; run the same command again" in r.stdout
    assert (
        r.stdout.strip().splitlines()[-1]
        == "use: no cache (no candidate that saves work held psnr=20 on the 3 held-out prompts)"
    )
    work = [p for p in (tmp_path / "rec").iterdir() if p.name.endswith(".work")]
    assert len(work) == 1 and (work[0] / "test_reference.json").exists()  # kept for the rerun


def test_generate_compare_prints_the_psnr_and_ssim_of_the_two_saved_images(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    r = _cli(
        "generate",
        "tiny-pixart",
        "--prompt",
        "a large red circle on the left on a grey background",
        "--steps",
        "4",
        "--cache",
        "fora",
        "--compare",
        "--out",
        "x.png",
    )
    assert r.exit_code == 0, r.output
    line = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"fora: ([\d.]+) s against ([\d.]+) s uncached \(([\d.]+)x\), PSNR ([\d.]+) dB, "
        r"SSIM ([\d.]+) against the uncached image",
        line,
    )
    assert m, line
    cached, uncached = (
        np.asarray(Image.open(tmp_path / f).convert("RGB"), np.float64).transpose(2, 0, 1) / 255
        for f in ("x.png", "x.uncached.png")
    )
    assert float(m[4]) == pytest.approx(o_psnr(cached, uncached), abs=0.05 + 1e-9)
    assert float(m[5]) == pytest.approx(o_ssim(cached, uncached), abs=0.0005 + 1e-6)
    # the seconds are printed rounded: the speedup lies between the ratios their rounding allows
    half = [0.5 * 10 ** -len(m[i].partition(".")[2]) for i in (1, 2)]
    low = (float(m[2]) - half[1]) / (float(m[1]) + half[0])
    high = (float(m[2]) + half[1]) / max(float(m[1]) - half[0], 1e-9)
    assert low - 0.01 <= float(m[3]) <= high + 0.01
    assert o_psnr(cached, uncached) < 100  # FORA changed the image: the comparison is not vacuous


def test_generate_compare_needs_a_cache(tmp_path, monkeypatch):
    from ditscope import zoo

    monkeypatch.setattr(zoo, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.chdir(tmp_path)
    r = _cli("generate", "tiny-pixart", "--prompt", "a red circle", "--compare", "--out", "x.png")
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: --compare needs --cache METHOD: it compares a cached run with the uncached one"
    )
    assert not list(tmp_path.iterdir())
