"""benchmarks/gpu/run.sh end to end at --size tiny on the CPU, so that the GPU script does not rot between
GPU windows. Checks what the run must produce (rows per architecture, the captured layer counts, cache
rows or the error a method raised), never timings."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# attention layers of the tiny configs in benchmarks/gpu/configs.py: (all captured, self-attention)
TINY_LAYERS = {
    "pixart": (4, 2),
    "flux": (4, 4),
    "sd3": (2, 2),
    "latte": (6, 4),
    "cogvideox": (2, 2),
    "mochi": (2, 2),
    "wan": (4, 2),
}
CACHEABLE = ("pixart", "flux", "sd3", "latte", "cogvideox")


def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    from configs import ARCHS

    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu" / "run.sh"),
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--tiny-steps",
            "3",
            "--repeats",
            "1",
            "--compile-archs",
            "pixart,flux",
            "--compile-backend",
            "eager",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run.log").exists() and (tmp_path / "env.txt").exists()
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {}
    for r in rows:
        by.setdefault(r["arch"], {})[r["measure"]] = r
    assert list(by) == [a.name for a in ARCHS]  # every architecture, in value order
    for name, measures in by.items():
        assert "error" not in measures, measures.get("error")
        assert "profiling_error" not in measures, measures["profiling_error"]["note"]
        everything, selfs = TINY_LAYERS[name]
        assert int(measures["attention_layers_captured"]["value"]) == everything, name
        assert int(measures["self_attention_layers_captured"]["value"]) == selfs, name
        assert float(measures["profiling_time_ratio"]["value"]) > 0
        assert int(measures["kept_bytes_one_step"]["value"]) > 0
        for method in ("toca", "fora", "plan"):
            if name in CACHEABLE:
                assert f"{method}_error" not in measures, measures[f"{method}_error"]["note"]
                assert float(measures[f"{method}_flops_speedup"]["value"]) >= 1.0, (name, method)
            else:  # caching of Mochi and Wan comes from another branch: a row either way
                assert f"{method}_error" in measures or f"{method}_flops_speedup" in measures, (name, method)
        assert "arch_seconds" in measures
        if name in ("pixart", "flux"):  # compiled per block (dynamo only, on a CPU): FORA as it runs eager
            assert "compiled_error" not in measures, measures["compiled_error"]["note"]
            assert float(measures["compiled_fora_max_diff"]["value"]) < 1e-5
            assert float(measures["compiled_fora_wall_speedup"]["value"]) > 0
        else:
            assert not any(m.startswith("compiled") for m in measures), name


def test_gpu_script_budget_skips_the_rest(tmp_path):
    """A spent time budget writes a 'skipped' row for every architecture not started."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import measure

    measure.main(
        [
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--archs",
            "pixart,sd3",
            "--budget-s",
            "0",
        ]
    )
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["arch"], r["measure"]) for r in rows] == [("pixart", "skipped"), ("sd3", "skipped")]


# published parameter counts of the transformers (billions), to keep the full-size configs honest
PUBLISHED_PARAMS = {
    "pixart": 0.61,
    "flux": 11.9,
    "sd3": 2.03,
    "latte": 1.06,
    "cogvideox": 5.57,
    "mochi": 10.0,
    "wan": 1.42,
}


def test_full_size_configs_build_and_run_on_the_meta_device():
    """Every full-size config builds with its published parameter count, and one forward on the meta device
    (shapes only, no memory) turns its full-size inputs into an output the sampling loop can use."""
    import diffusers
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    from configs import ARCHS

    diffusers.utils.logging.set_verbosity_error()
    for arch in ARCHS:
        with torch.device("meta"):
            model = getattr(diffusers, arch.cls)(**arch.full).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters()) / 1e9
        assert abs(params - PUBLISHED_PARAMS[arch.name]) < 0.02 * PUBLISHED_PARAMS[arch.name], (
            arch.name,
            params,
        )
        inputs = arch.make_inputs(dict(model.config), "full", "meta", torch.bfloat16)
        if arch.name == "mochi":  # its RoPE runs under torch.autocast, which has no meta device
            continue
        out = model(inputs.x0, timestep=inputs.timestep(0, arch.steps), **inputs.kwargs, return_dict=False)[0]
        assert inputs.update(inputs.x0, out).shape == inputs.x0.shape, arch.name
