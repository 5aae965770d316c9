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
SHARD_LOCAL = {"toca", "duca"}  # rank tokens within each rank's shard, and say so


@pytest.mark.parametrize("family", ["flux", "wan"])  # joint attention split at the model; cross-attention, split at the first block
def test_every_method_under_context_parallelism_decides_alike_on_every_rank(family, tmp_path):
    out = tmp_path / family
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:  # a hang (ranks deciding differently) fails here instead of stalling CI
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(HERE / "cp_worker.py"), str(out), family], env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-rank run did not finish in 300 s (a collective waiting on a rank that skipped?): {e.stdout}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]) == set(REGISTRY) - {"plan"}
    for name in ranks[0]:
        a, b = ranks[0][name], ranks[1][name]
        assert a["decisions"] == b["decisions"], f"{name}: the ranks took different decisions"
        assert a["cached_vs_uncached"] > 1e-3, f"{name}: the cache changed nothing: the test shows nothing"
        if name in SHARD_LOCAL:
            assert any("shard" in text for text in a["notes"].values()), f"{name} does not say it ranks per shard"
            continue
        assert a["decisions"] == a["one_process_decisions"], f"{name}: decided otherwise than one process"
        assert a["max_diff"] < 1e-4 and b["max_diff"] < 1e-4, (name, a["max_diff"], b["max_diff"])


@pytest.mark.parametrize("name", ["fora", "fbcache", "teacache", "toca"])
def test_a_compiled_transformer_is_cached_like_the_eager_one(name):
    import tiny

    steps = 5

    def run(model):
        with ditscope.apply(model, REGISTRY[name].config(), num_inference_steps=steps) as handle:
            with torch.no_grad():
                outs = [model(**tiny.inputs_pixart(2, s), return_dict=False)[0] for s in range(steps)]
        return torch.stack(outs), handle.stats().summary()

    torch._dynamo.reset()
    eager, compiled = tiny.build_pixart(), torch.compile(tiny.build_pixart(), backend="eager")  # dynamo's tracing, no codegen
    (a, stats_a), (b, stats_b) = run(eager), run(compiled)
    assert stats_a == stats_b and stats_a["reused"] + stats_a["blocks_reused"] > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert "forward" not in vars(compiled._orig_mod)  # removed: the compiled model is as before
