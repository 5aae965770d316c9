"""Caching under context parallelism (2 CPU ranks, gloo, diffusers' Ulysses) and on a compiled transformer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditscope
from ditscope.cache import REGISTRY

HERE = Path(__file__).parent


@pytest.mark.parametrize(
    "split_by", ["ulysses", "ring"]
)  # ring: tests/cp_worker.py's attention op gives the LSE
@pytest.mark.parametrize(
    "family", ["flux", "wan"]
)  # joint attention split at the model; cross-attention, split at the first block
def test_every_method_under_context_parallelism_decides_alike_on_every_rank(family, split_by, tmp_path):
    out = tmp_path / family
    done = _torchrun([str(HERE / "cp_worker.py"), str(out), family, split_by])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]) == set(REGISTRY) - {"plan"}
    for name in ranks[0]:
        a, b = ranks[0][name], ranks[1][name]
        assert a["decisions"] == b["decisions"], f"{name}: the ranks took different decisions"
        assert a["cached_vs_uncached"] > 1e-3, f"{name}: the cache changed nothing: the test shows nothing"
        if name in (
            "toca",
            "duca",
        ):  # token counts: each rank's modules saw half the sequence (the split is real)
            assert a["tokens"] * 2 == a["one_process_tokens"] and b["tokens"] == a["tokens"]
        assert a["decisions"] == a["one_process_decisions"], f"{name}: decided otherwise than one process"
        assert a["max_diff"] < 1e-4 and b["max_diff"] < 1e-4, (name, a["max_diff"], b["max_diff"])


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_profiling_a_model_split_by_ulysses_measures_what_one_process_measures(family, tmp_path):
    """Each rank's recorder sums its part (its heads of every token in attention, its tokens elsewhere); the
    sums added over the ranks give the one-process distances, for every layer, target and token stream. The
    same for what a plan's calibration measures (a text every rank holds whole, Wan's, is not added up)."""
    out = tmp_path / family
    done = _torchrun([str(HERE / "cp_worker.py"), str(out), family, "ulysses", "profile"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for r in (0, 1):
        found = json.loads(Path(f"{out}.rank{r}.json").read_text())
        one, split = found["one"], found["split"]
        assert (
            sorted(one) == sorted(split)
            and any("/text/" in k for k in one)
            and any("/out/" in k for k in one)
        )
        for key in one:
            a, b = torch.tensor(one[key]), torch.tensor(split[key])
            assert a.shape == b.shape, key
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=key)
        moved = [k for k in one if torch.tensor(one[k]).abs().max() > 0]  # (a text that never changes: 0)
        assert len(moved) > len(one) // 2
        assert found["ring"].startswith("profiling a transformer split by ring attention is not supported")
        # a plan's calibration: every unit's errors of serving it from earlier steps, by row and step
        one, split = found["calibration_one"], found["calibration_split"]
        assert sorted(one) == sorted(split) and len(one) > 100 and any("/gram@" in k for k in one)
        for key in one:
            torch.testing.assert_close(
                torch.tensor(split[key]), torch.tensor(one[key]), rtol=1e-4, atol=1e-6, msg=key
            )


@pytest.mark.parametrize("how", ["whole", "regional"])
@pytest.mark.parametrize("name", ["fora", "fbcache", "teacache", "toca"])
def test_a_compiled_transformer_is_cached_like_the_eager_one(name, how):
    import tiny

    steps = 5

    def run(model):
        with ditscope.apply(model, REGISTRY[name].config(), num_inference_steps=steps) as handle:
            with torch.no_grad():
                outs = [model(**tiny.inputs_pixart(2, s), return_dict=False)[0] for s in range(steps)]
        return torch.stack(outs), handle.stats().summary()

    torch._dynamo.reset()
    eager, compiled = tiny.build_pixart(), tiny.build_pixart()
    if how == "whole":
        compiled = torch.compile(compiled, backend="eager")  # dynamo's tracing, no code generation
    else:
        for block in compiled.transformer_blocks:
            block.compile(backend="eager")
    (a, stats_a), (b, stats_b) = run(eager), run(compiled)
    assert stats_a == stats_b and stats_a["reused"] + stats_a["blocks_reused"] > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    inner = getattr(compiled, "_orig_mod", compiled)
    assert "forward" not in vars(inner) and all("forward" not in vars(b) for b in inner.transformer_blocks)


def test_a_plan_made_on_two_ranks_is_the_plan_one_process_makes(tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m ditscope plan` shares the calibration prompts over the ranks (each a share,
    the images gathered) and writes the plan one process writes, with the layout it was made in; its checks
    run on the same hardest prompts, shared over the ranks too. The errors are measured on the first two of
    four prompts (one per rank), the other two run uncached, one per rank, and time the plain pass."""
    from typer.testing import CliRunner

    from ditscope.cli.main import app

    monkeypatch.chdir(tmp_path)
    args = [
        "plan",
        "tiny-pixart",
        "--target",
        "psnr=25",
        "--steps",
        "6",
        "--n-prompts",
        "4",
        "--cost",
        "flops",
        "--iterations",
        "3",
        "--check-prompts",
        "2",
        "--measure-prompts",
        "2",
    ]
    one = CliRunner().invoke(app, [*args, "--out", "one.plan.json"])
    assert one.exit_code == 0, one.output
    two = _torchrun(["-m", "ditscope", *args, "--out", "two.plan.json"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = (json.loads(Path(f).read_text()) for f in ("one.plan.json", "two.plan.json"))
    assert a["rows"] == b["rows"] and a["meta"]["predicted_speedup"] > 1.2  # a plan that saves work
    assert len(a["meta"]["calibration"]["check_prompts"]) == 2
    assert a["meta"]["calibration"]["check_prompts"] == b["meta"]["calibration"]["check_prompts"]
    assert a["meta"]["layout"]["world_size"] == 1 and b["meta"]["layout"]["world_size"] == 2
    assert a["meta"]["calibration"]["measured_prompts"] == b["meta"]["calibration"]["measured_prompts"] == 2
    for key in ("psnr", "ssim"):
        assert abs(a["meta"]["quality"][key] - b["meta"]["quality"][key]) < 1e-3
    assert two.stdout.count("wrote two.plan.json") == 1  # the first rank writes and reports


def test_a_plan_run_in_another_layout_warns_or_is_refused():
    import warnings

    import tiny

    from ditscope.cache.schedule import schedule_of
    from ditscope.errors import DitscopeError, DitscopeWarning

    model = tiny.build_pixart()
    plan = schedule_of(model, ditscope.FORAConfig(), 4)
    plan.meta["layout"] = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "compiled": "no"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # made on 2 data-parallel ranks: the model ran as it runs here
        ditscope.apply(model, ditscope.PlanConfig(plan), num_inference_steps=4).remove()
    plan.meta["layout"]["ulysses_degree"] = 2
    with pytest.warns(
        DitscopeWarning, match="ulysses degree 2, ring degree 1, compiled no runs with ulysses degree 1"
    ):
        ditscope.apply(model, ditscope.PlanConfig(plan), num_inference_steps=4).remove()
    with pytest.raises(DitscopeError, match="strict=True"):
        ditscope.apply(model, ditscope.PlanConfig(plan, strict=True), num_inference_steps=4)
    plan.meta["layout"]["ulysses_degree"] = 1
    with pytest.warns(DitscopeWarning, match="compiled whole"):
        ditscope.apply(
            torch.compile(model, backend="eager"), ditscope.PlanConfig(plan), num_inference_steps=4
        ).remove()


def test_bad_input_under_torchrun_is_one_line_on_every_rank_and_no_rank_waits(tmp_path):
    """Fewer calibration prompts than ranks: each rank refuses before any work (exit 2 each), no rank is left
    waiting in a collective, nothing is written."""
    args = ["plan", "tiny-pixart", "--n-prompts", "1", "--steps", "4", "--out", str(tmp_path / "p.plan.json")]
    done = _two_ranks(args, tmp_path, timeout=240)
    message = "error: 2 ranks share 1 calibration prompts: give at least one per rank"
    # every rank refuses on its own, and waits for the others' lines before exiting (torchrun stops the other
    # ranks as soon as one exits: without the wait a loaded CI run saw 1 line of 2)
    assert done.stderr.count(message) == 2, done.stderr[-3000:]
    assert (
        done.stderr.count("exitcode: 2") == 2 or done.returncode != 0
    )  # torchrun reports each rank's exit 2
    assert (
        "/ditscope/" not in done.stderr
    )  # no ditscope frame in any traceback: the launcher's report is its own
    assert list(tmp_path.iterdir()) == []


def _torchrun(program: list[str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 PROGRAM` on CPU ranks; a hang (a rank left waiting in a
    collective) fails the test instead of stalling CI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    try:
        return subprocess.run(
            [*launcher, *program], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2 ranks did not finish {program[:3]} in {timeout} s (a rank left waiting?): {e.stdout}")


def _two_ranks(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m ditscope ARGS`."""
    return _torchrun(["-m", "ditscope", *args], cwd, timeout)


def _one_process(args: list[str]):
    from typer.testing import CliRunner

    from ditscope.cli.main import app

    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    return done


def test_a_bench_on_two_ranks_is_the_bench_one_process_runs(tmp_path, monkeypatch):
    """Each rank runs a share of every setting's samples; the first rank scores and writes the same rows."""
    monkeypatch.chdir(tmp_path)
    args = [
        "bench",
        "tiny-pixart",
        "--methods",
        "toca",
        "--grid",
        "quick",
        "--prompts",
        "3",
        "--seeds",
        "1",
        "--steps",
        "4",
        "--repeats",
        "1",
        "--batch-size",
        "2",
    ]
    _one_process([*args, "--out", "one"])
    two = _two_ranks([*args, "--out", "two"], tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("wrote two/results.csv") == 1  # the first rank reports and writes
    from ditscope.bench.runner import read_rows

    a, b = read_rows(tmp_path / "one"), read_rows(tmp_path / "two")
    assert [r["key"] for r in a] == [r["key"] for r in b]  # one line per setting: no rank wrote twice
    for x, y in zip(a, b, strict=True):
        assert x["n_images"] == y["n_images"] == 3
        assert abs(x["flops"] - y["flops"]) <= 1e-6 * x["flops"]  # the ranks' shares add up to the whole
        for key in ("psnr", "ssim", "accuracy"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-3, (x["label"], key)
        assert len(y["seconds_all"]) == len(x["seconds_all"]) >= 1  # the baseline is timed again at the end


def test_an_evaluation_on_two_ranks_is_the_evaluation_one_process_makes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "tiny-pixart", "--samples", "5", "--steps", "4", "--state-dir", "state"]
    _one_process([*args, "--json", "one.json"])
    two = _two_ranks([*args, "--json", "two.json"], tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a.keys() == b.keys() and a["n"] == b["n"] == 5
    for key in a:
        assert abs(a[key] - b[key]) < 1e-3, key
    assert not (tmp_path / "state").exists()  # every rank's state file is gone once the evaluation is done


def test_tune_on_two_ranks_fits_what_one_process_fits(tmp_path, monkeypatch):
    """(A study on two ranks is its profiles on two ranks: tests/test_cli.py's torchrun profile test.)"""
    monkeypatch.chdir(tmp_path)
    args = [
        "tune",
        "tiny-pixart",
        "--method",
        "fora",
        "--target",
        "psnr=24",
        "--n-prompts",
        "2",
        "--steps",
        "8",
    ]
    _one_process([*args, "--out", "one.json"])
    two = _two_ranks([*args, "--out", "two.json"], tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["options"] == b["options"] and a["meta"]["value"] == b["meta"]["value"]


def test_more_ranks_than_samples_is_one_line_on_every_rank(tmp_path):
    done = _two_ranks(
        [
            "bench",
            "tiny-pixart",
            "--methods",
            "fora",
            "--prompts",
            "1",
            "--seeds",
            "1",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "o"),
        ],
        tmp_path,
        timeout=240,
    )
    assert (
        done.stderr.count("error: 2 ranks share 1 samples (prompts x seeds): give at least one per rank") == 2
    ), done.stderr[-3000:]
    assert "/ditscope/" not in done.stderr
    assert list(tmp_path.iterdir()) == []
