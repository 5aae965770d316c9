"""The planner: calibration in the profile format, plan files, their errors, execution, and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import FAMILIES as TINY

import ditscope
from ditscope import DitscopeError, Schedule, zoo
from ditscope.cache.observe import Calibrator
from ditscope.errors import EveryRankError
from ditscope.planning import calibrate as calibration_module
from ditscope.planning.calibrate import calibrate
from ditscope.planning.planner import Target
from ditscope.planning.search import compile_schedule, costs_from, plan_row

STEPS = 8
PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("tiny-pixart")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def calibration(pipe):
    with torch.inference_mode():
        return calibrate(pipe, PROMPTS, STEPS, batch_size=2, max_lag=3, forecast_lag=2)


def test_calibration_is_a_profile_of_every_unit(calibration, tmp_path):
    cal, reference = calibration
    assert reference.shape[0] == len(PROMPTS)
    units = cal.meta["units"]
    assert "stack" in units and "transformer_blocks.0" in units and "transformer_blocks.0.attn1" in units
    assert set(cal.options("target")) >= {"reuse@1", "reuse@3", "forecast@1"}
    reuse1 = cal.grid("reuse@1", "all", "all", "inject")
    assert np.isfinite(reuse1).all() and (reuse1 >= 0).all()
    reuse3 = cal.grid("reuse@3", "all", "all", "inject")
    assert np.isnan(reuse3[:, :2]).all() and np.isfinite(reuse3[:, 2:]).all()  # lag 3 exists from step 3
    assert all(cal.meta["seconds"][u] > 0 for u in units)
    cal.save(tmp_path / "c.ditscope")  # the profile artifact, reloadable
    assert ditscope.Profile.load(tmp_path / "c.ditscope").keys == cal.keys


def test_the_search_trades_error_for_cost(calibration):
    cal, _ = calibration
    costs = costs_from(cal, None)
    cheap = compile_schedule(cal, costs, price=1e-9, mode="both", granularity="site")
    careful = compile_schedule(cal, costs, price=1e9, mode="both", granularity="site")
    assert costs.of(cheap, STEPS) < costs.of(careful, STEPS)
    assert set("".join(careful.rows.values())) == {"C"}  # error priced out: compute everything
    assert all(r[0] == "C" for r in cheap.rows.values())


def test_dp_row_is_the_cheapest_path():
    """Three steps, lag-1 error 1 and lag-2 error 10: with price 1 and cost 5, reuse once then compute."""
    reuse = np.full((4, 3), np.inf)
    reuse[1:, 1], reuse[2:, 2] = 1.0, 10.0
    assert plan_row({"R": reuse}, 5.0, 1.0, [True] * 4) == "CRCR"
    assert plan_row({"R": reuse}, 5.0, 100.0, [True] * 4) == "CCCC"
    # step 1 does not run (the stack skips it): step 2 is two steps from the compute, too costly to serve
    assert plan_row({"R": reuse}, 5.0, 1.0, [True, False, True, True]) == "CCCR"


def test_plan_meets_its_target_on_the_calibration_prompts(pipe, tmp_path):
    with torch.inference_mode():
        plan = ditscope.plan(
            pipe, PROMPTS, "psnr=28", STEPS, batch_size=2, max_checks=6, work_dir=tmp_path / "w"
        )
    assert plan.meta["quality"]["psnr"] >= 28
    assert plan.meta["model"]["class"] == "PixArtTransformer2DModel"
    # the finalists are on record: exactly one kept, with the plan's own prediction and timing
    kept = [f for f in plan.meta["finalists"] if f["kept"]]
    assert len(kept) == 1 and kept[0]["mode"] == plan.meta["mode"]
    assert kept[0]["measured_speedup"] == plan.meta["measured_speedup"]
    assert kept[0]["predicted_speedup"] == plan.meta["predicted_speedup"]
    path = plan.save(tmp_path / "p.plan.json")
    again = ditscope.Plan.load(path)
    assert again.rows == plan.rows and again.meta == json.loads(json.dumps(plan.meta))
    from ditscope.planning.show import summary_rows

    assert sum(key == "finalist (kept)" for key, _ in summary_rows(again)) == 1
    # the budgeted search is on record: checks within the budget, and the fitted model
    assert plan.meta["search"]["checks"] == plan.meta["evaluations"] <= plan.meta["search"]["max_checks"] == 6
    search = dict(summary_rows(again))["search"]
    assert (
        search.startswith(f"{plan.meta['search']['checks']} of at most 6 checks") and "psnr_lo = " in search
    )


def test_compute_everything_plan_is_bit_identical_and_remove_restores(pipe):
    from ditscope.cache.layout import layout_of

    _, blocks, sites, _ = layout_of(pipe.transformer)
    kwargs = {
        "num_inference_steps": STEPS,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(0),
    }
    reference = pipe(PROMPTS, **kwargs).images
    everything = Schedule({"stack": "C" * STEPS, **{s.name: "C" * STEPS for s in sites}})
    with ditscope.apply(pipe, ditscope.PlanConfig(everything)):
        kwargs["generator"] = torch.Generator().manual_seed(0)
        assert torch.equal(pipe(PROMPTS, **kwargs).images, reference)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(pipe(PROMPTS, **kwargs).images, reference)


@pytest.mark.parametrize(
    "config, rows",
    [
        (
            ditscope.FORAConfig(interval=3),
            {"transformer_blocks.0.attn1": "CRRCRRCR", "transformer_blocks.7.ff": "CRRCRRCR"},
        ),
        (ditscope.FORAConfig(interval=2, warmup=3, kinds=("mlp",)), {"transformer_blocks.2.ff": "CCCRCRCR"}),
        (
            ditscope.DeltaDiTConfig(
                interval=2, blocks=0.25, boundary=0.5
            ),  # early steps: the back 2 of 8 blocks
            {
                "transformer_blocks.7": "CRCRCCCC",
                "transformer_blocks.0": "CCCCCRCR",
                "transformer_blocks.3": "C" * STEPS,
            },
        ),
        (  # FORA's schedule with a second-order Taylor forecast: a plan's T
            ditscope.TaylorSeerConfig(interval=3, order=2, warmup=1),
            {"transformer_blocks.0.attn1": "CTTCTTCT", "transformer_blocks.7.ff": "CTTCTTCT"},
        ),
    ],
)
def test_static_methods_are_schedules_the_engine_looks_up(pipe, tmp_path, config, rows):
    """FORA, Delta-DiT and TaylorSeer are policies compiled to a Schedule: their table is readable, and running
    it as a plan is the method itself, image for image and count for count."""
    schedule = ditscope.schedule_of(pipe, config, STEPS)
    for unit, row in rows.items():
        assert schedule.rows[unit] == row
    if isinstance(config, ditscope.FORAConfig) and "self" not in config.kinds:
        assert "transformer_blocks.2.attn1" not in schedule.rows  # kinds it does not cache always compute
    counts = {
        ditscope.FORAConfig: ["computed", "reused"],
        ditscope.TaylorSeerConfig: ["computed", "predicted"],
    }.get(type(config), ["blocks_computed", "blocks_reused"])
    outputs = []
    for c in (config, ditscope.PlanConfig(Schedule.load(schedule.save(tmp_path / "p.plan.json")))):
        with ditscope.apply(pipe, c) as handle:
            images = pipe(
                PROMPTS,
                num_inference_steps=STEPS,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            ).images
        table = handle.stats().to_pandas()
        outputs.append((images, table[counts].values.tolist()))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert outputs[0][1] == outputs[1][1]


def test_the_planner_tries_fora_own_schedules(pipe, calibration):
    """The fixed-interval candidates include FORA's own schedule at each interval (its phase: one full step,
    then every n-th), not only the same interval after two full steps: on tiny-latte FORA's phase computed one
    step fewer and scored 2 dB better on unseen videos."""
    from ditscope.planning.planner import _interval_schedule

    cal, _ = calibration
    for n in (2, 3, 4):
        fora = ditscope.schedule_of(pipe, ditscope.FORAConfig(interval=n), STEPS).rows
        ours = _interval_schedule(cal, "sites", n, STEPS, warmup=1).rows
        assert {u: r for u, r in ours.items() if u in fora} == fora and set(fora) <= set(ours)


def test_methods_that_decide_at_run_time_have_no_schedule(pipe):
    with pytest.raises(DitscopeError, match="decides at run time"):
        ditscope.schedule_of(pipe, ditscope.ToCaConfig(), STEPS)


def test_calibration_records_the_adaptive_signal(calibration):
    cal, _ = calibration
    signal = cal.meta["signal"]
    assert len(signal) == len(PROMPTS) and all(len(row) == STEPS for row in signal)
    assert all(row[0] is None and all(v > 0 for v in row[1:]) for row in signal)


def test_adaptive_plan_between_static_and_uncached(pipe):
    """Tolerance infinite: exactly the static plan. Tolerance ~0: every served step computes, exactly the
    uncached images. In between, a row's images do not depend on its batch neighbour."""
    from ditscope.profiling.workload import generate

    plan = Schedule(
        {"stack": "CCRCRCRR", "transformer_blocks.2.attn1": "CRRCRRCR"},
        meta={"signal": [[None] + [0.05] * 7, [None] + [0.08] * 7]},
    )

    def run(config, prompts=PROMPTS):
        return generate(pipe, prompts, STEPS, batch_size=2) if config is None else _with(config, prompts)

    def _with(config, prompts):
        with ditscope.apply(pipe, config) as handle:
            images = generate(pipe, prompts, STEPS, batch_size=2)
        _with.summary = handle.stats().summary()
        return images

    with torch.inference_mode():
        uncached, static = run(None), run(ditscope.PlanConfig(plan))
        assert torch.equal(
            run(ditscope.PlanConfig(plan, adaptive=True, signal="input", tolerance=1e9)), static
        )
        assert _with.summary["rows_forced"] == 0
        assert torch.equal(
            run(ditscope.PlanConfig(plan, adaptive=True, signal="input", tolerance=1e-9)), uncached
        )
        assert _with.summary["rows_forced"] > 0 and _with.summary["reused"] == 0
        both = run(ditscope.PlanConfig(plan, adaptive=True, signal="input"))
        alone = run(ditscope.PlanConfig(plan, adaptive=True, signal="input"), PROMPTS[:1])
    assert (both[0] - alone[0]).abs().max() < 1e-4  # batch float noise only
    assert not torch.equal(both, static) and not torch.equal(both, uncached)
    with pytest.raises(DitscopeError, match="no calibrated signal"):
        ditscope.apply(pipe, ditscope.PlanConfig(Schedule({"stack": "CCR"}), adaptive=True))


def test_rows_forced_to_compute_leave_what_the_plan_kept_as_it_was_computed(pipe, monkeypatch):
    """A kept output is labelled with the step it was computed at, and forecasts take their slope from those
    labels: an adaptive plan's forced rows must not rewrite a kept output under its old label (they once did,
    and the next forecast read a fresh row as an old one). Every kept entry, each time the plan reads it, must
    be the one first stored under that label."""
    from ditscope.cache.schedule import ScheduleMethod
    from ditscope.profiling.workload import generate

    plan = Schedule(
        {"stack": "CCFCFFCF", "transformer_blocks.1": "CCCCCCCC", "transformer_blocks.2.attn1": "CCFFCFFF"},
        meta={"signal": [[None] + [0.05] * 7, [None] + [0.08] * 7]},
    )
    first_seen: dict = {}
    checks = []

    def check(ctx):
        for kind in ("kept_outputs", "kept_residuals"):
            for unit, entries in ctx.state.get(kind, {}).items():
                for step, value in entries:
                    tensors = list(value.values()) if isinstance(value, dict) else [value]
                    tensors = [t for t in tensors if t is not None]
                    key = (kind, unit, step)
                    if key not in first_seen:
                        first_seen[key] = [t.clone() for t in tensors]
                    else:
                        checks.append(key)
                        assert all(torch.equal(a, b) for a, b in zip(first_seen[key], tensors)), key

    def spying(name):
        original = getattr(ScheduleMethod, name)

        def spy(self, ctx, *args):
            check(ctx)
            return original(self, ctx, *args)

        return spy

    monkeypatch.setattr(ScheduleMethod, "block", spying("block"))
    monkeypatch.setattr(ScheduleMethod, "module", spying("module"))
    with (
        torch.inference_mode(),
        ditscope.apply(
            pipe, ditscope.PlanConfig(plan, adaptive=True, signal="input", tolerance=0.5)
        ) as handle,
    ):
        generate(pipe, PROMPTS, STEPS, batch_size=2)  # one pipeline call: the labels are this call's steps
        forced = handle.stats().summary()["rows_forced"]
    assert forced > 0 and checks  # rows were forced, and kept entries were read again after it


def test_calibration_records_the_stack_change_an_output_signal_is_checked_against(calibration):
    from ditscope.planning.planner import stack_change

    cal, _ = calibration
    table = stack_change(cal)  # [step][lag - 1]: the largest over the calibration prompts
    assert len(table) == STEPS and all(len(row) == 3 for row in table)
    assert table[0] == [None] * 3 and table[1][1:] == [None, None] and table[2][2] is None
    ki = cal.keys.index((cal.layer_names.index("stack"), "reuse@2", "all", "all"))
    per_prompt = cal.values[:, ki, 5 - 1, cal.metrics.index("inject")]  # step 5 (the axis starts at step 1)
    assert table[5][1] == pytest.approx(float(per_prompt.max()), rel=1e-5)


def test_adaptive_plan_on_the_output_signal(pipe):
    """The stack's change between full steps decides for the served run that follows: tolerance infinite
    is the static plan; tolerance ~0 computes every run that follows a measured full step, which is the
    plan with those steps computed; a row does not depend on its batch neighbour."""
    from ditscope.profiling.workload import generate

    meta = {"stack_change": [[None, None]] + [[0.02, 0.04]] * 7}
    plan = Schedule({"stack": "CCRCRCRR"}, meta=meta)
    forced_plan = Schedule(
        {"stack": "CCCCCCCC"}
    )  # full steps 1, 3 and 5 each decide for the run that follows

    def run(config, prompts=PROMPTS):
        with ditscope.apply(pipe, config) as handle:
            images = generate(pipe, prompts, STEPS, batch_size=2)
        run.summary = handle.stats().summary()
        return images

    with torch.inference_mode():
        static = run(ditscope.PlanConfig(plan))
        assert torch.equal(
            run(ditscope.PlanConfig(plan, adaptive=True, signal="output", tolerance=1e9)), static
        )
        assert run.summary["rows_forced"] == 0
        eager = run(ditscope.PlanConfig(plan, adaptive=True, signal="output", tolerance=1e-9))
        assert run.summary["rows_forced"] > 0
        torch.testing.assert_close(eager, run(ditscope.PlanConfig(forced_plan)), rtol=0, atol=1e-5)
        both = run(ditscope.PlanConfig(plan, adaptive=True, signal="output"))
        alone = run(ditscope.PlanConfig(plan, adaptive=True, signal="output"), PROMPTS[:1])
    assert (both[0] - alone[0]).abs().max() < 1e-4
    with pytest.raises(DitscopeError, match="no calibrated signal for signal='output'"):
        ditscope.apply(
            pipe,
            ditscope.PlanConfig(
                Schedule({"stack": "CCR"}, meta={"signal": [[None, 1, 1]]}), adaptive=True, signal="output"
            ),
        )
    with pytest.raises(DitscopeError, match="unknown adaptive signal"):
        ditscope.apply(pipe, ditscope.PlanConfig(plan, adaptive=True, signal="noise"))


def test_adaptive_output_signal_on_a_joint_attention_model():
    """SD3's last block returns no text stream (context_pre_only): the output signal measures what each block
    returns and runs there; forcing every run after a measured full step computes everything (uncached)."""
    from ditscope.profiling.workload import generate

    mm = zoo.load("tiny-mmdit")
    mm.set_progress_bar_config(disable=True)
    plan = Schedule({"stack": "CCRCRR"}, meta={"stack_change": [[None, None]] + [[1e-9, 1e-9]] * 5})
    with torch.inference_mode():
        uncached = generate(mm, PROMPTS, 6, batch_size=2)
        with ditscope.apply(
            mm, ditscope.PlanConfig(plan, adaptive=True, signal="output", tolerance=1e-9)
        ) as handle:
            eager = generate(mm, PROMPTS, 6, batch_size=2)
            forced = handle.stats().summary()["rows_forced"]
    assert forced > 0
    torch.testing.assert_close(eager, uncached, rtol=0, atol=1e-5)


def test_guidance_branches_are_told_apart_by_their_shared_input():
    from ditscope.cache.plan import same_input_groups

    latents = torch.randn(3, 16, 8)
    assert same_input_groups(torch.cat([latents, latents]), 6).tolist() == [
        0,
        1,
        2,
        0,
        1,
        2,
    ]  # CFG: [uncond; cond]
    assert same_input_groups(latents, 3).tolist() == [0, 1, 2]
    frames = torch.randn(2, 4, 16, 8).flatten(0, 1)  # Latte-style: each sample's 4 frame rows fold onto it
    assert same_input_groups(torch.cat([frames, frames]), 4).tolist() == [0, 1, 0, 1]


def test_plans_resample_to_other_step_counts_or_refuse_when_strict():
    plan = Schedule({"stack": "CCRCRRCR"})
    assert plan.at(4).rows["stack"][0] == "C" and len(plan.at(4).rows["stack"]) == 4
    assert plan.at(16).steps == 16
    # to fewer steps a merged step computes if any of its planned steps did: a periodic plan does not alias
    # onto its served steps (every other step computed, halved, computes every step)
    assert Schedule({"stack": "CR" * 10}).at(10).rows["stack"] == "C" * 10
    assert Schedule({"stack": "CRRRRR" * 4}).at(12).rows["stack"].count("C") == 4
    assert Schedule({"x.attn1": "CFRR" * 4}).at(8).rows["x.attn1"] == "CFCFCRCR"
    build, inputs = TINY["PixArtTransformer2DModel"]
    model = build()
    with ditscope.apply(model, ditscope.PlanConfig(plan, strict=True), num_inference_steps=4):
        with pytest.raises(DitscopeError, match="made for 8 steps"), torch.no_grad():
            model(**inputs(1, 0), return_dict=False)
    with ditscope.apply(model, ditscope.PlanConfig(plan), num_inference_steps=4):
        with pytest.warns(UserWarning, match="resampled to 4; .*plan again at 4 steps"), torch.no_grad():
            model(**inputs(1, 0), return_dict=False)
    with ditscope.apply(model, ditscope.PlanConfig(plan), num_inference_steps=16):
        with pytest.warns(UserWarning, match="resampled to 16$"), torch.no_grad():  # more steps: transfers
            model(**inputs(1, 0), return_dict=False)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "corrupt or truncated"),
        ('{"format": "ditscope-plan", "format_version": 99, "rows": {}}', "format version 99"),
        ('{"format": "other"}', "not a ditscope plan"),
        ('{"format": "ditscope-plan", "format_version": 1, "rows": {"stack": "CX"}}', "unknown actions"),
        # fields of the wrong type
        (
            '{"format": "ditscope-plan", "format_version": 1, "rows": {"stack": "CR"}, "meta": {"model": "x"}}',
            "must be objects",
        ),
        (
            '{"format": "ditscope-plan", "format_version": 1, "rows": {"stack": "CR"}, "meta": []}',
            "must be objects",
        ),
        ('{"format": "ditscope-plan", "format_version": 1, "steps": 5, "rows": {"stack": "CR"}}', "'steps'"),
        ('{"format": "ditscope-plan", "format_version": 1, "rows": ["CR"]}', "'rows'"),
    ],
)
def test_bad_plan_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.plan.json"
    path.write_text(text)
    with pytest.raises(DitscopeError, match=message):
        Schedule.load(path)


def test_a_damaged_plan_is_refused_by_its_checksum_and_one_without_loads(tmp_path):
    import json

    path = Schedule({"stack": "CCRCR", "transformer_blocks.0.attn1": "CRRCC"}, {"target": "psnr=30"}).save(
        tmp_path / "p.plan.json"
    )
    assert Schedule.load(path).rows["stack"] == "CCRCR"
    path.write_text(path.read_text().replace('"CCRCR"', '"CRRRR"'))  # a flipped action: still a valid plan
    with pytest.raises(DitscopeError, match="does not match its checksum"):
        Schedule.load(path)
    raw = json.loads(path.read_text())
    del raw["checksum"]  # what a person who edits a plan by hand does: it loads, unverified
    path.write_text(json.dumps(raw))
    assert Schedule.load(path).rows["stack"] == "CRRRR"


def test_a_plan_for_another_model_is_refused():
    build, _ = TINY["PixArtTransformer2DModel"]
    other, _ = TINY["DiTTransformer2DModel"]
    from ditscope.cache.schedule_data import model_signature

    plan = Schedule({"stack": "CCR"}, meta={"model": model_signature(other())})
    with pytest.raises(DitscopeError, match="another model"):
        ditscope.apply(build(), ditscope.PlanConfig(plan), num_inference_steps=3)
    with pytest.raises(DitscopeError, match="does not have"):
        ditscope.apply(
            build(), ditscope.PlanConfig(Schedule({"blocks.99.attn": "CR"})), num_inference_steps=2
        )


@pytest.mark.parametrize("text", ["psnr", "psnr=abc", "lpips=3", "psnr=120", "speedup=0.5", "ssim=2"])
def test_bad_targets(text):
    with pytest.raises(DitscopeError):
        Target.parse(text)


def test_cli_plan_errors_are_one_line_and_leave_nothing(tmp_path):
    for args in (["--target", "psnr=500"], ["--target", "nonsense"], ["--granularity", "block"]):
        out = tmp_path / "x.plan.json"
        r = subprocess.run(
            [sys.executable, "-m", "ditscope", "plan", "tiny-pixart", *args, "--out", str(out)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
        assert not out.exists()
    bad = tmp_path / "t.plan.json"
    bad.write_text('{"format": "ditscope-plan"')
    r = subprocess.run([sys.executable, "-m", "ditscope", "show", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "corrupt" in r.stderr


def test_speed_targets_and_unreachable_ones(pipe, tmp_path):
    with torch.inference_mode():
        fast = ditscope.plan(pipe, PROMPTS, "speedup=1.5", STEPS, batch_size=2, iterations=4)
        assert fast.meta["predicted_speedup"] >= 1.5
        with pytest.raises(DitscopeError, match="no plan reaches speedup=50"):
            ditscope.plan(pipe, PROMPTS, "speedup=50", STEPS, batch_size=2, iterations=4)
        # a quality no cached plan reaches: the plan that computes everything holds it, but is no plan; the
        # search says so, or that its checks ran out with plans left that it could not rule out
        for max_checks in (1, 4):
            with pytest.raises(
                DitscopeError, match="no plan (that saves any work reaches|held) psnr=99"
            ) as e:
                ditscope.plan(
                    pipe, PROMPTS, "psnr=99", STEPS, batch_size=2, max_checks=max_checks, modes=("stack",)
                )
            assert "\n" not in str(e.value)
            if "held" in str(e.value):
                assert "raise --max-checks" in str(e.value)
        for bad in (0, -1, 2.5, True):
            with pytest.raises(DitscopeError, match="max_checks >= 1"):
                ditscope.plan(pipe, PROMPTS, "psnr=30", STEPS, batch_size=2, max_checks=bad)


def test_damaged_calibration_files_in_the_work_folder_are_computed_again(pipe, tmp_path, one_thread):
    from ditscope.planning.planner import _calibration

    said = []
    with torch.inference_mode():
        first, reference, was_resumed = _calibration(
            pipe, pipe.transformer, PROMPTS, 4, 0, 2, None, tmp_path, said.append
        )
        data = bytearray((tmp_path / "calibration.ditscope").read_bytes())
        data[-4] ^= 0x01
        (tmp_path / "calibration.ditscope").write_bytes(bytes(data))
        again, reference_again, was_resumed_again = _calibration(
            pipe, pipe.transformer, PROMPTS, 4, 0, 2, None, tmp_path, said.append
        )
        resumed, _, was_resumed_last = _calibration(
            pipe, pipe.transformer, PROMPTS, 4, 0, 2, None, tmp_path, said.append
        )
    assert "calibration: the work folder's files are damaged; computing them again" in said
    assert said[-1] == "calibration: resumed from the work folder"
    assert (was_resumed, was_resumed_again, was_resumed_last) == (False, False, True)
    np.testing.assert_array_equal(again.values, first.values)
    np.testing.assert_array_equal(resumed.values, first.values)
    assert torch.equal(reference_again, reference)


def test_plan_on_a_declared_layout_model_from_python():
    """`ditscope.plan` on a plain PyTorch DiT driven by the user's own sampling loop (tests/opensora_like.py)."""
    import opensora_like

    from ditscope.cache.layout import layout_of
    from ditscope.profiling.workload import generate
    from ditscope.stats.quality import per_sample_psnr_ssim

    sampler = opensora_like.Sampler(opensora_like.build())
    plan = ditscope.plan(
        sampler,
        PROMPTS,
        target="psnr=25",
        num_inference_steps=6,
        batch_size=2,
        max_checks=6,
        layout=opensora_like.LAYOUT,
    )
    assert plan.meta["quality"]["psnr_lo"] >= 25 and plan.meta["predicted_speedup"] > 1
    _, blocks, sites, _ = layout_of(sampler.transformer, opensora_like.LAYOUT)
    assert set(plan.rows) <= {"stack"} | {b.name for b in blocks} | {s.name for s in sites}
    reference = generate(sampler, PROMPTS, 6, batch_size=2)
    with ditscope.apply(sampler, ditscope.PlanConfig(plan), layout=opensora_like.LAYOUT) as handle:
        planned = generate(sampler, PROMPTS, 6, batch_size=2)
        assert handle.stats().steps == 6
    assert min(per_sample_psnr_ssim(planned, reference)[0]) >= 25
    with pytest.raises(DitscopeError, match="layout="):
        ditscope.apply(sampler, ditscope.PlanConfig(plan))


def test_a_plan_warns_under_another_scheduler_and_strict_refuses(pipe):
    import warnings

    from diffusers import DDIMScheduler

    plan = Schedule({"stack": "CCR"}, meta={"scheduler": type(pipe.scheduler).__name__})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ditscope.apply(pipe, ditscope.PlanConfig(plan)).remove()  # its own scheduler: no word
    other = Schedule({"stack": "CCR"}, meta={"scheduler": DDIMScheduler.__name__})
    with pytest.warns(UserWarning, match="runs under"):
        ditscope.apply(pipe, ditscope.PlanConfig(other)).remove()
    with pytest.raises(DitscopeError, match="made under DDIMScheduler"):
        ditscope.apply(pipe, ditscope.PlanConfig(other, strict=True))


def test_a_flops_cost_model_chooses_between_finalists_by_its_prediction_not_by_timings():
    """On a busy machine timings lie: with cost="flops" they must not change the plan; with "time" they decide."""
    from ditscope.planning.planner import Target, _choose

    fast, slow = Schedule({"stack": "CRRC"}), Schedule({"stack": "CRCC"})
    candidates = [("stack", fast, {"psnr": 30.0}), ("sites", slow, {"psnr": 31.0})]
    predicted = {id(fast): 3.0, id(slow): 1.5}
    for lie in ((9.0, 1.0), (1.0, 9.0)):  # timings favouring one finalist, then the other

        def timed(schedules, lie=lie):
            return [lie[[id(c[1]) for c in candidates].index(id(s))] for s in schedules]

        by_flops = _choose(
            candidates, Target.parse("psnr=25"), "flops", lambda s: predicted[id(s)], timed, print
        )
        by_time = _choose(
            candidates, Target.parse("psnr=25"), "time", lambda s: predicted[id(s)], timed, print
        )
        assert (
            by_flops[1] is fast and by_flops[3] == lie[0]
        )  # chosen by prediction, still timed for the record
        assert by_time[1] is (fast if lie[0] > lie[1] else slow)
    # timings within the noise of each other are a tie, and the tie goes to the better finalist
    tie = _choose(
        candidates, Target.parse("psnr=25"), "time", lambda s: predicted[id(s)], lambda ss: [2.0, 1.97], print
    )
    assert tie[1] is slow and tie[3] == 1.97
    # a speed target: the best quality among the finalists, whatever the timings
    assert (
        _choose(candidates, Target.parse("speedup=1.2"), "time", lambda s: 0, lambda ss: [1.0], print)[1]
        is slow
    )


def _fake_problem(noise: float = 0.0):
    """Candidates whose measured quality is known: per group, schedules from careful (slow, little predicted error)
    to fast, quality = 40 + the group's offset - 15 log10(predicted error) (+ a deterministic wobble: quality is
    not monotone in the predicted error)."""
    import math

    from ditscope.planning.budget import Candidate

    offsets = {"stack": 0.0, "stack fixed": 3.0, "sites": 8.0, "both": -1.0}
    candidates, truth = [], {}
    for group, offset in offsets.items():
        mode, _, fixed = group.partition(" ")
        n = 10 if fixed else 30
        for i in range(n):
            error = 10 ** (-0.5 + 2.0 * i / (n - 1))
            speedup = 1.2 + 3.0 * i / (n - 1) + (0.1 if group == "both" else 0.0)
            quality = 40 + offset - 15 * math.log10(error) + noise * math.sin(7 * i + len(group))
            key = f"{group}/{i}"
            candidates.append(Candidate(mode, Schedule({"stack": "C"}), speedup, error, key, fixed or None))
            truth[key] = quality
    return candidates, truth


def test_the_budgeted_search_checks_at_most_max_checks_and_no_plan_slower_than_one_held_in_its_group():
    """End-to-end checks cost a run of the calibration prompts each: the search runs at most max_checks of them,
    and once a plan of a group held it checks no plan of that group predicted slower (only its fastest counts)."""
    from ditscope.planning.budget import budgeted_search

    for max_checks in (1, 2, 5, 10, 25):
        candidates, truth = _fake_problem(noise=1.5)
        checked = []

        def check(c, checked=checked, truth=truth):
            checked.append(c)
            return truth[c.key] >= 30, truth[c.key], {}

        outcome = budgeted_search(candidates, check, 30.0, max_checks, lambda text: None)
        assert len(checked) == outcome.checks <= max_checks
        assert len({c.key for c in checked}) == len(checked)  # no schedule twice
        for i, c in enumerate(checked):  # nothing checked after a plan of its group at least as fast held
            earlier = [d for d in checked[:i] if d.group == c.group and truth[d.key] >= 30]
            assert all(c.speedup > d.speedup for d in earlier)


def test_the_budgeted_search_keeps_the_plan_a_full_search_keeps_on_a_fake_problem():
    """Where the truth is known, 10 checks find the fastest plan that holds, in the same group as checking every
    candidate does, among 100 candidates; and with a wobble of 1.5 dB on the quality, one as fast within 10%."""
    from ditscope.planning.budget import budgeted_search

    for noise, slack in ((0.0, 1.0), (1.5, 0.9)):
        candidates, truth = _fake_problem(noise)
        best = max((c for c in candidates if truth[c.key] >= 30), key=lambda c: c.speedup)
        outcome = budgeted_search(
            candidates, lambda c, truth=truth: (truth[c.key] >= 30, truth[c.key], {}), 30.0, 10, print
        )
        found = max((c for c, _ in outcome.held), key=lambda c: c.speedup)
        assert outcome.checks <= 10 and truth[found.key] >= 30
        assert found.speedup >= slack * best.speedup
        if not noise:
            assert found.key == best.key


def test_the_budgeted_search_learns_that_forecasts_are_over_rated_and_keeps_a_reusing_plan():
    """Where the calibrated errors over-rate the forecasts (tiny-pixart: a forecasting schedule's predicted error a
    third of the reusing one's at the same speed, its measured quality 3 dB lower), the forecasting candidates
    are a group of their own: its checks fail, and 10 checks still find the fastest reusing plan that holds."""
    import math

    from ditscope.planning.budget import Candidate, budgeted_search

    candidates, truth = [], {}
    for forecast in (False, True):
        for i in range(30):
            error = 10 ** (-0.5 + 2.0 * i / 29)
            quality = 40 - 15 * math.log10(error) - (3.0 if forecast else 0.0)
            row = "CCFRF" if forecast else "CCRRR"
            c = Candidate(
                "stack",
                Schedule({"stack": row}),
                1.2 + 3.0 * i / 29,
                error / 3 if forecast else error,
                f"{row}/{i}",
            )
            candidates.append(c)
            truth[c.key] = quality
    assert {c.group for c in candidates} == {"stack", "stack forecast"}
    best = max((c for c in candidates if truth[c.key] >= 30), key=lambda c: c.speedup)
    assert best.group == "stack"
    outcome = budgeted_search(
        candidates, lambda c: (truth[c.key] >= 30, truth[c.key], {}), 30.0, 10, lambda text: None
    )
    found = max((c for c, _ in outcome.held), key=lambda c: c.speedup)
    assert outcome.checks <= 10 and found.key == best.key
    assert outcome.fit.offsets["stack forecast"] < outcome.fit.offsets["stack"]


def test_the_quality_model_is_the_least_squares_fit_recomputed_by_hand():
    """The model of the measured quality on the predicted error: the penalised least squares of the checks
    (quality = intercept + offset[group] + slope * log10(error), the priors as pseudo-observations) has a zero
    gradient at the recorded coefficients, the gradient written out here term by term with plain loops; and its
    spread is the pooled RMS of the residuals, recomputed the same way."""
    import math

    from ditscope.planning import budget

    points = [
        ("stack", 2.4, 35.1),
        ("stack", 4.8, 28.1),
        ("stack", 3.7, 31.1),
        ("sites fixed", 40.0, 30.6),
        ("sites fixed", 35.5, 28.2),
        ("both", 4.8, 30.1),
    ]
    cases = [(n, prior) for n in range(len(points) + 1) for prior in (budget.PRIOR_INTERCEPT, 20.0)]
    for n, prior in cases:  # the intercept's prior: PSNR's, or SSIM's
        fit = budget.fit_quality(points[:n], prior)
        a, b = fit.intercept, fit.slope
        grad_a = budget.WEIGHT_INTERCEPT * (a - prior)
        grad_b = budget.WEIGHT_SLOPE * (b - budget.PRIOR_SLOPE)
        grad_o = {g: budget.WEIGHT_OFFSET * (o - budget.PRIOR_OFFSETS[g]) for g, o in fit.offsets.items()}
        squares = 0.0
        for group, error, quality in points[:n]:
            x = math.log10(error)
            residual = a + fit.offsets[group] + b * x - quality
            grad_a += residual
            grad_b += residual * x
            grad_o[group] += residual
            squares += residual**2
        assert abs(grad_a) < 1e-7 and abs(grad_b) < 1e-7, n
        assert all(abs(v) < 1e-7 for v in grad_o.values()), n
        assert set(fit.offsets) == {g for g, _, _ in points[:n]}
        pooled = math.sqrt(
            (budget.WEIGHT_SPREAD * budget.PRIOR_SPREAD**2 + squares) / (budget.WEIGHT_SPREAD + n)
        )
        assert fit.spread == pytest.approx(max(budget.SPREAD_FLOOR, pooled), rel=1e-9)
    # the coefficients themselves, recomputed by coordinate descent on the same penalised sum of squares: each
    # parameter in turn set to the value that minimises it with the others held (a convex quadratic: this
    # converges to its one minimum)
    groups = sorted({g for g, _, _ in points})
    a, b = 0.0, 0.0
    o = {g: 0.0 for g in groups}
    xs = [(g, math.log10(e), q) for g, e, q in points]
    for _ in range(20000):
        num = budget.WEIGHT_INTERCEPT * budget.PRIOR_INTERCEPT + sum(q - o[g] - b * x for g, x, q in xs)
        a = num / (budget.WEIGHT_INTERCEPT + len(xs))
        num = budget.WEIGHT_SLOPE * budget.PRIOR_SLOPE + sum((q - a - o[g]) * x for g, x, q in xs)
        b = num / (budget.WEIGHT_SLOPE + sum(x * x for _, x, _ in xs))
        for h in groups:
            mine = [(x, q) for g, x, q in xs if g == h]
            num = budget.WEIGHT_OFFSET * budget.PRIOR_OFFSETS[h] + sum(q - a - b * x for x, q in mine)
            o[h] = num / (budget.WEIGHT_OFFSET + len(mine))
    fit = budget.fit_quality(points)
    assert fit.intercept == pytest.approx(a, abs=1e-6) and fit.slope == pytest.approx(b, abs=1e-6)
    assert all(fit.offsets[h] == pytest.approx(o[h], abs=1e-6) for h in groups)
    # no check yet: the priors
    empty = budget.fit_quality([])
    assert (empty.intercept, empty.slope) == pytest.approx((budget.PRIOR_INTERCEPT, budget.PRIOR_SLOPE))


def test_a_speed_target_scans_every_price_of_its_grid():
    """A speed target holds by the cost model's prediction: every plan on the grid fast enough is a choice (the
    best measured quality among them wins), so the scan checks them all."""
    from ditscope.planning.planner import scan_prices

    grid = [0.0, 1.0, 2.0, 3.0, 4.0]
    checked = []
    held = scan_prices(
        grid, lambda p: p, lambda p: 10.0 - p, lambda p: checked.append(p) or p < 3, "t", print
    )
    assert checked == grid and [h[1] for h in held] == [0.0, 1.0, 2.0]


def test_kept_evaluations_count_only_for_the_run_that_made_them(pipe, tmp_path):
    """A work folder left by a run on other prompts (or seeds, steps, guidance) held evaluations keyed by the
    schedule alone, and a rerun took their quality for its own: a plan claiming 26.5 dB that did not hold."""
    from ditscope.planning.planner import Evaluations
    from ditscope.profiling.workload import generate

    path = tmp_path / "evaluations.jsonl"
    with torch.inference_mode():
        reference = generate(pipe, PROMPTS, 4, 0, 2)
        other = generate(pipe, ["a green triangle", "a blue square on the left"], 4, 0, 2)
        first = Evaluations(pipe, PROMPTS, 4, 0, 2, None, reference, path)
        row = first.measure("s", lambda: lambda: None)  # nothing applied: the uncached images again
        assert row["psnr"] == 100.0 and first.runs == 1
        again = Evaluations(pipe, PROMPTS, 4, 0, 2, None, reference, path)
        assert again.measure("s", lambda: lambda: None) == row and again.runs == 0  # resumed
        for changed in (
            dict(prompts=["a green triangle", "a blue square on the left"], reference=other),
            dict(seed=1),
            dict(steps=5),
            dict(guidance_scale=2.0),
            dict(batch_size=1),
        ):
            args = {
                "prompts": PROMPTS,
                "steps": 4,
                "seed": 0,
                "batch_size": 2,
                "guidance_scale": None,
                "reference": reference,
                **changed,
            }
            stale = Evaluations(
                pipe,
                args["prompts"],
                args["steps"],
                args["seed"],
                args["batch_size"],
                args["guidance_scale"],
                args["reference"],
                path,
            )
            assert stale.done == {}, changed


def test_the_model_signature_holds_wherever_the_model_was_loaded_from():
    """The signature hashed the config's `_name_or_path` (the checkout's folder): the shipped plans were refused
    in every other clone, and a plan made on one machine on every other."""
    from ditscope.cache.schedule_data import model_signature

    model = TINY["PixArtTransformer2DModel"][0]()
    here = model_signature(model)
    model.register_to_config(_name_or_path="/somewhere/else/transformer", _diffusers_version="0.0.1")
    assert model_signature(model) == here
    model.register_to_config(num_layers=model.config.num_layers + 1)  # a public entry still counts
    assert model_signature(model) != here


def test_a_worst_image_target_holds_on_the_5th_percentile_recomputed_by_hand(pipe):
    """psnr_p5=DB plans for the worst images: the plan's calibration images are made again, their PSNR against
    the uncached ones computed with plain loops; their 5th percentile (linear between the two nearest ranks)
    is the plan's recorded one, and its lower bound (five images: the worst) reaches the target."""
    import math

    from ditscope.planning.planner import Target
    from ditscope.profiling.workload import generate

    prompts = [*PROMPTS, "a green triangle at the top", "a small yellow circle", "a large blue square"]
    with torch.inference_mode():
        plan = ditscope.plan(pipe, prompts, "psnr_p5=24", STEPS, batch_size=2, max_checks=6, cost="flops")
        reference = generate(pipe, prompts, STEPS, batch_size=2)
        with ditscope.apply(pipe, ditscope.PlanConfig(plan)):
            cached = generate(pipe, prompts, STEPS, batch_size=2)
    psnrs = []
    for i in range(len(prompts)):  # per image: 10 log10(1 / mean squared error), images in [0, 1]
        err, count = 0.0, 0
        for a, b in zip(cached[i].flatten().tolist(), reference[i].flatten().tolist(), strict=True):
            err, count = err + (a - b) ** 2, count + 1
        psnrs.append(10 * math.log10(1 / (err / count)))
    ranked = sorted(psnrs)
    at = 0.05 * (len(ranked) - 1)
    p5 = ranked[int(at)] + (at - int(at)) * (ranked[int(at) + 1] - ranked[int(at)])
    assert abs(plan.meta["quality"]["psnr_p5"] - p5) < 0.05
    # the default assurance checks the 5th percentile's 95% lower bound: with fewer than 59 images, the worst
    worst = ranked[0]
    assert abs(plan.meta["quality"]["psnr_p5_lo"] - worst) < 0.05
    assert worst >= 24 and Target.parse("psnr_p5=24").met_by({"psnr_p5_lo": worst})
    assert not Target.parse("psnr_p5=24").met_by(
        {"psnr_p5_lo": 23.9, "psnr_p5": 30, "psnr_lo": 30, "psnr": 40}
    )
    assert Target.parse("psnr_p5=24").met_by({"psnr_p5_lo": 23.9, "psnr_p5": 24.5}, assurance="mean")


def test_the_predicted_error_of_a_schedule_recomputed_from_the_calibration_by_hand(calibration):
    """A schedule's predicted error: the calibrated error of every served step, read here straight from the
    profile's table (column t - 1 holds step t) with plain loops; a module does not run on a step the stack
    serves, and that step counts towards its lag."""
    from ditscope.planning.search import predicted_error

    cal, _ = calibration
    metric = cal.metrics.index("inject")
    site = "transformer_blocks.0.attn1"
    rows = {"stack": "CCRCCRCC", site: "CRCCRRCC"}  # 8 steps; the site's step 5 is served by the stack

    def table(unit, kind, t, k):
        for i, (layer, target, _, _) in enumerate(cal.keys):
            if cal.layer_names[layer] == unit and target == f"{kind}@{k}":
                found = float(cal.stats.mean[i, t - 1, metric])
        return found

    expected = table("stack", "reuse", 2, 1) + table("stack", "reuse", 5, 1)  # each from the step before
    expected += table(site, "reuse", 1, 1) + table(
        site, "reuse", 4, 1
    )  # from steps 0 and 3; 2 and 5 do not run
    assert predicted_error(cal, ditscope.Plan(rows)) == pytest.approx(expected, rel=1e-9)


def test_a_plan_records_how_well_its_calibrated_errors_ranked_its_checks(pipe, tmp_path):
    """Spearman's rank correlation between the checks' predicted errors and their measured PSNR, recomputed
    by hand from the pairs the plan records (average ranks for ties, then the Pearson correlation of ranks)."""
    with torch.inference_mode():
        plan = ditscope.plan(
            pipe, PROMPTS, "psnr=28", STEPS, batch_size=2, cost="flops", assurance="mean", max_checks=6
        )
    checks = plan.meta["checks"]
    pairs = checks["predicted_error_and_psnr"]
    assert checks["count"] == len(pairs) == plan.meta["evaluations"] == plan.meta["search"]["checks"]
    assert 3 <= len(pairs) <= 6
    # the quality model was fitted on these checks (a schedule two modes share is a point of each group)
    fit = plan.meta["search"]["fit"]
    assert {(round(e, 3), round(q, 2)) for _, e, q in fit["points"]} == {
        (round(e, 3), round(q, 2)) for e, q in pairs
    }
    assert fit["count"] == len(fit["points"]) and fit["slope"] < 0

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2 + 1
            i = j + 1
        return out

    a, b = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    rho = cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    assert checks["rank_correlation"] == pytest.approx(rho, abs=1e-4)
    assert checks["rank_correlation"] < 0  # more predicted error, less PSNR
    # the model's own ranking of the checks, each predicted by the model fitted on the others
    from ditscope.planning.budget import fit_quality

    points = [tuple(p) for p in fit["points"]]
    prior = fit["prior_intercept"]
    held_out = [
        fit_quality(points[:i] + points[i + 1 :], prior).value(g, e) for i, (g, e, _) in enumerate(points)
    ]
    a, b = ranks(held_out), ranks([q for _, _, q in points])
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    rho = cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    assert fit["held_out_rank_correlation"] == pytest.approx(rho, abs=2e-3)


def transformer_copy(pipe):
    import copy

    return copy.deepcopy(pipe.transformer)


def test_the_weights_fingerprint_does_not_depend_on_the_thread_count(one_thread):
    """Kept work is matched to the weights by their fingerprint; on two threads a float64 sum of three of
    tiny-pixart's tensors differed in its last digit from one thread's, so a bench resumed on another thread
    count refused its own folder. The integer sums agree."""
    from ditscope.cache.schedule_data import weights_fingerprint

    transformer = ditscope.zoo.load("tiny-pixart").transformer
    one = weights_fingerprint(transformer)
    torch.set_num_threads(2)
    assert weights_fingerprint(transformer) == one


def test_kept_work_is_not_reused_for_other_weights_a_dtype_or_a_scheduler(pipe, tmp_path, one_thread):
    """A work folder left by a run holds for a rerun only on the same weights, dtype and scheduler: a changed
    checkpoint, dtype or scheduler config computes the calibration (plan) and the reference (tune) again."""
    from ditscope.bench.tune import _reference
    from ditscope.planning.planner import _calibration

    def resumed_after(change, undo):
        said = []
        with torch.inference_mode():
            _calibration(pipe, pipe.transformer, PROMPTS, 4, 0, 2, None, tmp_path / "plan", said.append)
            _reference(pipe, PROMPTS, 4, 0, 2, None, tmp_path / "tune", said.append)
            change()
            try:
                _calibration(pipe, pipe.transformer, PROMPTS, 4, 0, 2, None, tmp_path / "plan", said.append)
                _reference(pipe, PROMPTS, 4, 0, 2, None, tmp_path / "tune", said.append)
            finally:
                undo()
        return [s for s in said if "resumed" in s]

    (tmp_path / "plan").mkdir()
    (tmp_path / "tune").mkdir()
    weight = next(pipe.transformer.parameters())
    with torch.no_grad():
        saved = weight.clone()
        assert resumed_after(lambda: weight.add_(1e-3), lambda: weight.copy_(saved)) == []
    from ditscope.cache.schedule_data import (
        weights_fingerprint,  # a dtype: the same weights, another fingerprint
    )

    double = transformer_copy(pipe).to(torch.float64)
    assert weights_fingerprint(double) != weights_fingerprint(pipe.transformer)
    shift = pipe.scheduler.config.get("num_train_timesteps")
    pipe.scheduler.register_to_config(num_train_timesteps=shift + 1)
    try:
        said = []
        with torch.inference_mode():
            _calibration(pipe, pipe.transformer, PROMPTS, 4, 0, 2, None, tmp_path / "plan", said.append)
        kept = [s for s in said if "resumed" in s]
    finally:
        pipe.scheduler.register_to_config(num_train_timesteps=shift)
    assert kept == []
    said = []  # the same run twice: the second resumes
    with torch.inference_mode():
        for _ in range(2):
            _calibration(pipe, pipe.transformer, PROMPTS, 4, 0, 2, None, tmp_path / "plan", said.append)
            _reference(pipe, PROMPTS, 4, 0, 2, None, tmp_path / "tune", said.append)
    assert said[-2:] == [
        "calibration: resumed from the work folder",
        "reference: resumed from the work folder",
    ]


def test_the_calibrated_forecasts_and_the_fitted_one_recomputed_from_the_raw_outputs(pipe):
    """Each predictor's calibrated error at one module (mean absolute error per prompt, the mean over its
    guidance branches) recomputed from the module's outputs captured at every step: reuse, the linear and the
    second-order forecast by their formulas (the Taylor terms scaled by 0 / 1 / 1, 1); the fitted forecast's
    weights (its scales of the two terms) by least squares over every
    prompt, and its error from the weights fitted on the other prompts, scaled from the nearest measured
    predictor by the root of their squared errors' ratio (calibrate.py). Three prompts, 7 steps, two
    branches, and a module output of 256 tokens x 128 features: no two axes alike."""
    prompts = [*PROMPTS, "a green triangle at the top"]
    steps, n = 7, len(prompts)
    module = pipe.transformer.transformer_blocks[0].attn1
    outputs = []
    hook = module.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().double().clone()))
    try:
        with torch.inference_mode():
            cal, _ = calibrate(pipe, prompts, steps, batch_size=3, max_lag=2, forecast_lag=1)
    finally:
        hook.remove()
    assert len(outputs) == steps and outputs[0].shape[0] == 2 * n  # one call per step, both branches batched
    site, metric = "transformer_blocks.0.attn1", cal.metrics.index("l1")

    def calibrated(target, p, t):
        for i, (layer, tgt, _, _) in enumerate(cal.keys):
            if cal.layer_names[layer] == site and tgt == target:
                return float(cal.values[p, i, t - 1, metric])
        raise KeyError(target)

    def rows_of(p):  # the model rows of prompt p: its guidance branches
        return [r for r in range(2 * n) if r % n == p]

    def dot(a, b):
        return float((a * b).sum())

    for t in range(3, steps):  # three computes one step apart exist from step 3
        y, y1, y2, y3 = (outputs[t - j] for j in range(4))
        parts = {}  # prompt -> (r, d1, d2) per branch row
        for p in range(n):
            # what reuse gets wrong, and the Taylor terms k d1 and k^2/2 d2 at computes one step apart
            parts[p] = [(y[r] - y1[r], y1[r] - y2[r], (y1[r] - 2 * y2[r] + y3[r]) / 2) for r in rows_of(p)]

        def fit(ps, parts=parts):
            g11 = sum(dot(d1, d1) for p in ps for _, d1, _ in parts[p])
            g12 = sum(dot(d1, d2) for p in ps for _, d1, d2 in parts[p])
            g22 = sum(dot(d2, d2) for p in ps for _, _, d2 in parts[p])
            b1 = sum(dot(r, d1) for p in ps for r, d1, _ in parts[p])
            b2 = sum(dot(r, d2) for p in ps for r, _, d2 in parts[p])
            det = g11 * g22 - g12 * g12
            return ((b1 * g22 - b2 * g12) / det, (b2 * g11 - b1 * g12) / det)

        w = fit(range(n))
        assert cal.meta["fitted_weights"][site][str(t)]["1"] == pytest.approx(list(w), rel=1e-4, abs=1e-6)
        for p in range(n):
            mae = {}
            sse = {}
            for name, (w1, w2) in {"reuse": (0, 0), "forecast": (1, 0), "taylor2": (1, 1)}.items():
                errs = [(r - w1 * d1 - w2 * d2) for r, d1, d2 in parts[p]]
                mae[name] = sum(float(e.abs().mean()) for e in errs) / len(errs)
                sse[name] = sum(float((e * e).sum()) for e in errs)
                assert calibrated(f"{name}@1", p, t) == pytest.approx(mae[name], rel=1e-4)
            w1, w2 = fit([q for q in range(n) if q != p])
            own = sum(float(((r - w1 * d1 - w2 * d2) ** 2).sum()) for r, d1, d2 in parts[p])
            nearest = min(sse, key=sse.get)
            expected = mae[nearest] * (own / sse[nearest]) ** 0.5
            assert calibrated("fitted@1", p, t) == pytest.approx(expected, rel=1e-3)


def test_the_search_chooses_among_the_allowed_predictors_and_carries_the_fitted_weights(calibration):
    """Per served step the search takes the allowed predictor of least calibrated error; a schedule whose
    modules take the fitted forecast carries, for each such step, the calibration's weights at the lag the
    step is served from (counted here by hand from the rows: steps the stack serves count, the module does
    not run there)."""
    from ditscope.planning.search import error_tables, price_scale

    cal, _ = calibration
    costs = costs_from(cal, None)
    tables = error_tables(cal)
    price = price_scale(cal, costs) * 0.3
    for allowed in ("R", "RF", "RFTL"):
        s = compile_schedule(cal, costs, price=price, mode="sites", granularity="site", predictors=allowed)
        used = set("".join(r for u, r in s.rows.items() if u != "stack")) - {"C"}
        assert used and used <= set(allowed)
        assert ("weights" in s.meta) == ("L" in used)
    s = compile_schedule(cal, costs, price=price, mode="sites", granularity="site", predictors="RFTL")
    fitted = cal.meta["fitted_weights"]
    for unit, row in s.rows.items():
        last = 0
        for t, action in enumerate(row):
            if action == "C":
                last = t
                continue
            k = t - last
            # the action is the least calibrated error among those measured at (t, k), forecasts needing
            # two computes (F) or three (T, L) before t
            options = {"R": tables[unit]["R"][t, k]}
            if last >= 1:
                options["F"] = tables[unit]["F"][t, k]
            if last >= 2:
                options.update(T=tables[unit]["T"][t, k], L=tables[unit]["L"][t, k])
            finite = {a: v for a, v in options.items() if np.isfinite(v)}
            assert finite[action] == min(finite.values())
            if action == "L":
                assert s.meta["weights"][unit][str(t)] == fitted[unit][str(t)][str(k)]


def test_a_calibration_whose_kept_outputs_would_not_fit_runs_in_smaller_batches_and_measures_the_same(
    pipe, monkeypatch
):
    """The measuring keeps every unit's outputs of the last steps, per prompt of the batch; past the memory
    budget the calibration runs again in the batch that fits, and measures what one batch of all measures.
    The bytes one step keeps are recomputed from the unit modules' outputs (forward hooks): the block residuals
    and module outputs, plus the first block's input (the adaptive signal). Five prompts, 5 steps."""
    prompts = [*PROMPTS, "a green triangle at the top", "a yellow circle", "a blue triangle on the right"]
    steps, n, max_lag, forecast_lag = 5, len(prompts), 2, 1
    with torch.inference_mode():
        whole, images = calibrate(
            pipe, prompts, steps, batch_size=n, max_lag=max_lag, forecast_lag=forecast_lag
        )
    assert whole.meta["calibration_batch"] == n
    units = [u for u, v in whole.meta["units"].items() if v["kind"] != "stack"]
    kept: dict[str, int] = {}

    def keep(name):
        def hook(mod, args, out):
            if name not in kept:  # the first call: step 0, both guidance branches of all prompts in one call
                kept[name] = out.numel() * out.element_size()
                if name == "transformer_blocks.0":
                    kept["signal"] = args[0].numel() * args[0].element_size()

        return hook

    hooks = [pipe.transformer.get_submodule(u).register_forward_hook(keep(u)) for u in units]
    try:
        with torch.inference_mode():
            pipe(prompts, num_inference_steps=1, output_type="pt", guidance_scale=4.5)
    finally:
        for h in hooks:
            h.remove()
    per_prompt_step = sum(kept.values()) / n
    steps_kept = min(max(max_lag, 3 * forecast_lag) + 1, steps)  # kept lags, plus the step being measured
    budget = per_prompt_step * steps_kept * 2.5  # room for two prompts, not three
    observers = []

    class Recorded(Calibrator):
        def __init__(self, *args):
            super().__init__(*args)
            observers.append(self)

    monkeypatch.setattr(calibration_module, "Calibrator", Recorded)
    with torch.inference_mode():
        small, small_images = calibrate(
            pipe,
            prompts,
            steps,
            batch_size=n,
            max_lag=max_lag,
            forecast_lag=forecast_lag,
            memory_budget=budget,
        )
    # the units are timed on the first batch only (batches of 2, 2, 1: another size would mix into the
    # median), one call per step, less the first call each module spends counting its FLOPs
    assert len(observers) == 2
    assert len(observers[-1].seconds["transformer_blocks.0.attn1"]) == steps - 1
    assert len(observers[-1].seconds["stack"]) == steps
    assert small.meta["calibration_batch"] == 2 and small.meta["batch_size"] == n
    assert torch.allclose(small_images, images, atol=1e-4)
    measured = np.isfinite(whole.values)
    assert (np.isfinite(small.values) == measured).all()
    assert np.allclose(small.values[measured], whole.values[measured], rtol=1e-3, atol=1e-7)


def test_the_memory_a_calibration_may_keep_is_the_machines_available_memory_shared_by_its_ranks(monkeypatch):
    """free_memory('cpu') against /proc/meminfo read here by hand (MemAvailable, in kB), halved when torchrun
    started two ranks on this machine; the two reads are apart in time, so within 2%."""
    from ditscope.runtime import free_memory

    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo on this system")

    def available():
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, value = line.split(":")
            if name == "MemAvailable":
                return int(value.strip().split(" ")[0]) * 1024
        raise AssertionError("no MemAvailable line")

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert free_memory("cpu") == pytest.approx(available(), rel=0.02)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert free_memory("cpu") == pytest.approx(available() / 2, rel=0.02)


def _no_timing_rounds(plain, runs, rounds=2):
    raise AssertionError("timing rounds ran although every finalist's check was timed")


def test_a_check_times_its_first_batch_alone(pipe, monkeypatch):
    """An end-to-end check records the seconds of its first batch (2 of 3 prompts here), on a clock that the
    pipeline advances by 10 per image it makes: 20, not the 30 of the whole run."""
    from ditscope.planning import planner
    from ditscope.profiling.workload import generate

    prompts = [*PROMPTS, "a green triangle"]
    with torch.inference_mode():
        reference = generate(pipe, prompts, STEPS, batch_size=2)
    clock = [100.0]
    monkeypatch.setattr(planner.time, "perf_counter", lambda: clock[0])
    call = type(pipe).__call__

    def advancing(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        clock[0] += 10.0 * len(out.images)
        return out

    monkeypatch.setattr(type(pipe), "__call__", advancing)
    evaluate = planner.Evaluations(pipe, prompts, STEPS, 0, 2, None, reference, None)
    with torch.inference_mode():
        row = evaluate(Schedule({"stack": "CCRCCRCC"}))
    assert row["first_batch_seconds"] == 20.0
    assert "first_batch_seconds" not in {k for k in row if k not in planner.NOT_QUALITY}


def test_finalists_are_timed_by_their_checks_or_in_rounds_when_the_checks_were_not_timed(
    pipe, tmp_path, monkeypatch
):
    """With the measured-time cost model the finalists' speedups are the plain first batch's seconds over each
    one's check's first batch (no timing rounds); rows from a work folder that kept no timing are timed in
    rounds instead."""
    from ditscope.planning import planner

    monkeypatch.setattr(planner, "_speedups", _no_timing_rounds)

    def planned():
        with torch.inference_mode():
            return ditscope.plan(
                pipe,
                PROMPTS,
                "psnr=28",
                STEPS,
                batch_size=2,
                cost="time",
                assurance="mean",
                max_checks=6,
                work_dir=tmp_path,
            )

    plan = planned()
    saved = tmp_path / "evaluations.jsonl"
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    rows = {row["key"]: row for row in lines}
    plain = plan.meta["plain_seconds"]
    kept = rows[planner.Evaluations.key(plan)]
    # recorded rounded to 3 decimals, the plain seconds to 6 digits
    assert plan.meta["measured_speedup"] == pytest.approx(plain / kept["first_batch_seconds"], abs=6e-4)
    for finalist in plan.meta["finalists"]:  # each one's check: the row of its PSNR
        checks = [r for r in rows.values() if round(r["psnr"], 4) == finalist["psnr"]]
        assert any(
            finalist["measured_speedup"] == pytest.approx(plain / r["first_batch_seconds"], abs=6e-4)
            for r in checks
        ), finalist
    # the same plan from a work folder whose rows kept no timing: the finalists are timed in rounds
    saved.write_text(
        "".join(
            json.dumps(
                {k: v for k, v in r.items() if k not in ("first_batch_seconds", "first_batch_prompts")}
            )
            + "\n"
            for r in lines
        )
    )
    rounds = []

    def recorded(plain, runs, rounds_=2):
        rounds.append(len(runs))
        return [2.0] * len(runs)

    monkeypatch.setattr(planner, "_speedups", recorded)
    again = planned()
    assert rounds == [len(again.meta["finalists"])] and again.meta["measured_speedup"] == 2.0


@pytest.mark.parametrize("model, count", [("tiny-latte", 8), ("tiny-dit", 24)])
def test_plan_and_tune_fit_on_the_zoo_models_own_count_of_calibration_prompts(model, count, tmp_path):
    """Without --n-prompts the zoo's row says how many prompts to draw: 8 videos for tiny-latte, 24 images for
    the image models; --n-prompts still decides when given."""
    from ditscope.cli.plan import calibration_run

    def drawn(n_prompts):
        _, prompts, _, _ = calibration_run(
            model,
            tmp_path / "x.plan.json",
            "x.plan.json",
            None,
            n_prompts,
            7000,
            2,
            None,
            "cpu",
            "float32",
            distributed=False,
        )
        return len(prompts)

    assert drawn(None) == zoo.ZOO[model].calibration_prompts == count
    assert drawn(3) == 3


def test_a_plan_whose_calibration_ran_in_smaller_batches_checks_and_times_in_those_batches(pipe, monkeypatch):
    """A calibration that had to run in batches of one (no memory to spare) makes every later pass of the
    planning run in batches of one too: the checks, and the plain pass they are timed against, so that the
    finalists need no timing rounds of their own."""
    from ditscope.planning import planner

    monkeypatch.setattr(calibration_module, "free_memory", lambda device: 1.0)

    monkeypatch.setattr(planner, "_speedups", _no_timing_rounds)
    sizes = []
    call = type(pipe).__call__

    def counting(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        sizes.append(len(out.images))
        return out

    monkeypatch.setattr(type(pipe), "__call__", counting)
    with torch.inference_mode():
        plan = ditscope.plan(
            pipe, PROMPTS, "psnr=28", STEPS, batch_size=2, cost="time", assurance="mean", max_checks=6
        )
    assert plan.meta["calibration"]["calibration_batch"] == 1
    assert plan.meta["calibration"]["batch_size"] == 2
    assert sizes and set(sizes) == {1}


def test_generating_some_prompts_makes_the_samples_a_run_of_every_prompt_makes(pipe):
    """`generate(items=...)` runs only those prompts, each with its own seed: the same samples as the run of
    every prompt at those indices (within float noise: the batches differ)."""
    from ditscope.profiling.workload import generate

    prompts = [*PROMPTS, "a green triangle", "a yellow star"]
    with torch.inference_mode():
        every = generate(pipe, prompts, STEPS, seed=5, batch_size=1)
        some = generate(pipe, prompts, STEPS, seed=5, batch_size=2, items=[3, 1])
    assert some.shape[0] == 2
    torch.testing.assert_close(some[0], every[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(some[1], every[1], atol=1e-5, rtol=0)


def test_checks_after_the_first_run_on_the_prompts_it_found_hardest_recomputed_by_hand(
    pipe, tmp_path, monkeypatch
):
    """With `check_prompts` the first check runs on every calibration prompt and the later ones on the ones it
    found hardest: the plan records which, every check's statistics are over them, and the plan's quality is
    the mean PSNR over them of its images against the uncached ones, computed here image by image from the
    pixels. A rerun resumes the narrowing from the work folder."""
    from ditscope.planning import planner
    from ditscope.profiling.workload import generate

    prompts = [*PROMPTS, "a green triangle", "a small yellow star"]
    calls = []
    call = type(pipe).__call__

    def counting(self, prompt, *args, **kwargs):
        calls.append(list(prompt))
        return call(self, prompt, *args, **kwargs)

    def planned():
        with torch.inference_mode():
            return ditscope.plan(
                pipe,
                prompts,
                "psnr=22",  # on the two hardest of four: CI's float noise left 28 dB out of reach in 4 checks
                STEPS,
                batch_size=4,
                assurance="mean",
                max_checks=6,
                check_prompts=2,
                work_dir=tmp_path,
            )

    rounds = []

    def in_rounds(plain, runs, rounds_=2):  # only a check whose timed batch was not the plain pass's
        rounds.append(len(runs))
        return [7.0] * len(runs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    monkeypatch.setattr(planner, "_speedups", in_rounds)
    plan = planned()
    monkeypatch.setattr(type(pipe), "__call__", call)
    rows = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    first, later = rows[0], rows[1:]
    assert first["ran_on"] is None and len(first["psnr_each"]) == 4 and later
    # the first check timed a batch of all four, the later ones of their two: the plain pass ran on two, and the
    # finalists are timed against it by their checks, the first check's in rounds
    assert first["first_batch_prompts"] == 4 and {r["first_batch_prompts"] for r in later} == {2}
    for finalist in plan.meta["finalists"]:
        if finalist["measured_speedup"] is None:
            continue
        own = [r for r in rows if round(r["psnr"], 4) == finalist["psnr"]]
        by_check = [plan.meta["plain_seconds"] / r["first_batch_seconds"] for r in own if r is not first]
        assert any(finalist["measured_speedup"] == pytest.approx(x, abs=6e-4) for x in by_check) or (
            first in own and finalist["measured_speedup"] == 7.0
        ), finalist
    assert sum(rounds) <= 1
    # the two of lowest PSNR in the first check, by a plain scan
    lowest = []
    for _ in range(2):
        best = None
        for i, v in enumerate(first["psnr_each"]):
            if i not in lowest and (best is None or v < first["psnr_each"][best]):
                best = i
        lowest.append(best)
    checked = plan.meta["calibration"]["check_prompts"]
    assert checked == sorted(lowest)
    # calls: the calibration, the plain timing pass on as many prompts as the later checks run (the first two),
    # the first check on all four, then only the two
    assert calls[:3] == [prompts, prompts[:2], prompts]
    assert all(c == [prompts[i] for i in checked] for c in calls[3:])
    assert first["psnr"] == pytest.approx(sum(first["psnr_each"][i] for i in checked) / 2, abs=1e-4)
    for row in later:
        assert row["ran_on"] == checked and row["psnr"] == pytest.approx(sum(row["psnr_each"]) / 2, abs=1e-4)
    with torch.inference_mode():
        plain = generate(pipe, prompts, STEPS, batch_size=4)
        with ditscope.apply(pipe, ditscope.PlanConfig(plan)):
            cached = generate(pipe, prompts, STEPS, batch_size=4)
    psnrs = []
    for i in checked:
        squared = 0.0
        a, b = plain[i].double(), cached[i].double()
        for c in range(a.shape[0]):
            squared += float(((a[c] - b[c]) ** 2).sum())
        psnrs.append(10 * np.log10(1.0 / (squared / a.numel())))
    assert plan.meta["quality"]["psnr"] == pytest.approx(sum(psnrs) / len(psnrs), abs=0.05)
    # the same run again: every check and the plain pass's seconds are read from the work folder, narrowed as
    # before, and nothing runs
    calls.clear()
    monkeypatch.setattr(type(pipe), "__call__", counting)
    again = planned()
    assert again.rows == plan.rows and again.meta["calibration"]["check_prompts"] == checked
    assert calls == [] and again.meta["plain_seconds"] == plan.meta["plain_seconds"]


def test_the_zoo_decides_how_many_prompts_the_checks_run_on_unless_told(tmp_path):
    """tiny-latte checks on the 4 hardest of its 8 videos; fewer calibration prompts than that, or a model
    without a count, check on every one; a count given is used, and one outside 1..N is refused."""
    from ditscope.cli.plan import zoo_count

    assert zoo.ZOO["tiny-latte"].check_prompts == 4
    assert zoo_count("tiny-latte", "check_prompts", None, 8) == 4
    assert zoo_count("tiny-latte", "check_prompts", None, 4) is None
    assert zoo_count("tiny-pixart", "check_prompts", None, 24) is None
    assert zoo_count("tiny-pixart", "check_prompts", 6, 24) == 6
    assert zoo_count("tiny-latte", "measure_prompts", None, 8) == 4
    assert zoo_count("tiny-mmdit", "measure_prompts", None, 24) is None
    with pytest.raises(
        EveryRankError, match=r"check_prompts \(--check-prompts\) must be between 1 and the 2"
    ):
        ditscope.plan(zoo.load("tiny-pixart"), PROMPTS, "psnr=30", STEPS, check_prompts=3)
    with pytest.raises(
        EveryRankError, match=r"measure_prompts \(--measure-prompts\) must be between 1 and the 2"
    ):
        ditscope.plan(zoo.load("tiny-pixart"), PROMPTS, "psnr=30", STEPS, measure_prompts=0)


def test_a_calibration_measuring_some_prompts_measures_them_alone_and_times_the_others_first_batch(
    pipe, monkeypatch
):
    """`measure=2` of 5 prompts: the profile is the calibration of the first two alone (same batches, so equal to
    the digit); the other three run once uncached, their images those of a run of every prompt, and the first
    batch of them (2 of 3, at the calibration's batch) is timed on a clock the pipeline advances by 10 per image
    it makes: 20, not the 30 of the three."""
    from ditscope.planning import planner
    from ditscope.profiling.workload import generate

    prompts = [*PROMPTS, "a green triangle at the top", "a yellow circle", "a blue triangle on the right"]
    with torch.inference_mode():
        alone, alone_images = calibrate(pipe, prompts[:2], STEPS, batch_size=2, max_lag=3, forecast_lag=2)
        every = generate(pipe, prompts, STEPS, batch_size=2)
    clock = [100.0]
    call = type(pipe).__call__
    calls = []

    def advancing(self, prompt, *args, **kwargs):
        out = call(self, prompt, *args, **kwargs)
        calls.append(list(prompt))
        clock[0] += 10.0 * len(out.images)
        return out

    monkeypatch.setattr(type(pipe), "__call__", advancing)
    monkeypatch.setattr(planner.time, "perf_counter", lambda: clock[0])
    with torch.inference_mode():
        some, images = calibrate(pipe, prompts, STEPS, batch_size=2, max_lag=3, forecast_lag=2, measure=2)
    assert calls == [prompts[:2], prompts[2:4], prompts[4:]]
    assert some.n_prompts == 2 and some.keys == alone.keys
    assert np.array_equal(some.values, alone.values, equal_nan=True)
    assert some.meta["measured_prompts"] == 2 and some.meta["n_prompts_total"] == 5
    assert some.meta["plain_batch_prompts"] == 2 and some.meta["plain_batch_seconds"] == 20.0
    assert some.meta["signal"] == alone.meta["signal"]  # the adaptive plan's signal: the measured prompts
    assert images.shape[0] == 5 and torch.equal(images[:2], alone_images)
    torch.testing.assert_close(images, every, atol=1e-5, rtol=0)
    with pytest.raises(DitscopeError, match="measures between 1 and 5 prompts, not 6"):
        calibrate(pipe, prompts, STEPS, measure=6)


def _prompts_called(pipe, monkeypatch) -> list:
    """The prompts of every pipeline call from now on (this test's), one list per call."""
    calls = []
    call = type(pipe).__call__

    def counting(self, prompt, *args, **kwargs):
        calls.append(list(prompt))
        return call(self, prompt, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    return calls


def test_a_plan_measuring_some_prompts_times_no_plain_pass_of_its_own_and_checks_on_every_prompt(
    pipe, tmp_path, monkeypatch
):
    """`measure_prompts=2` of 4 with the checks narrowed to 2: the calibration measures the first two and runs
    the other two uncached, whose first batch (2 prompts, as the later checks') is the plain seconds the plan
    records: no other plain pass runs. The first check runs on all four; the plan says on how many the errors
    were measured, and its summary says so."""
    from ditscope.planning import planner
    from ditscope.planning.show import summary_rows

    prompts = [*PROMPTS, "a green triangle", "a small yellow star"]
    calls = _prompts_called(pipe, monkeypatch)
    monkeypatch.setattr(planner, "_speedups", _no_timing_rounds)
    with torch.inference_mode():
        plan = ditscope.plan(
            pipe,
            prompts,
            "psnr=22",
            STEPS,
            batch_size=2,
            assurance="mean",
            max_checks=4,
            check_prompts=2,
            measure_prompts=2,
            work_dir=tmp_path,
        )
    cal = ditscope.Profile.load(tmp_path / "calibration.ditscope")
    assert cal.n_prompts == 2 and cal.meta["plain_batch_prompts"] == 2
    assert plan.meta["plain_seconds"] == pytest.approx(cal.meta["plain_batch_seconds"], rel=1e-5)
    # the calibration's two runs, then the first check on all four (in two batches): no plain pass between
    assert calls[:4] == [prompts[:2], prompts[2:], prompts[:2], prompts[2:]]
    assert plan.meta["calibration"]["measured_prompts"] == 2 and plan.meta["calibration"]["n_prompts"] == 4
    assert "errors measured on the first 2" in dict(summary_rows(plan))["calibration prompts"]
