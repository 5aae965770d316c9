"""The profile file: round trip, tidy table, merge rules, and clear errors for bad files."""

import json

import numpy as np
import pytest

from ditscope import DitscopeError, Profile
from ditscope.capture.recorder import Sample

META = {"model": "m", "seed": 0, "num_inference_steps": 4}


def make(prompt_index, seed=0, meta=META):
    rng = np.random.default_rng(seed)
    keys = [(0, "k", "image", "cond"), (0, "a", "image", "cond"), (1, "k", "text", "cond")]
    n = len(prompt_index)
    sample = Sample({k: rng.random((n, 3, 3)).astype(np.float32) for k in keys}, [999.0, 700.0, 400.0, 100.0], n)
    return Profile.from_sample(sample, ["blocks.0.attn1", "blocks.0.attn2"], prompt_index, meta)


def test_save_load_round_trip(tmp_path):
    p = make([0, 1, 2])
    path = p.save(tmp_path / "p.ditscope")
    q = Profile.load(path)
    assert q.keys == p.keys and q.layer_names == p.layer_names and q.timesteps == p.timesteps
    np.testing.assert_array_equal(q.values, p.values)
    np.testing.assert_array_equal(q.stats.m2, p.stats.m2)
    assert q.meta == p.meta
    assert not list(tmp_path.glob("*.tmp"))


def test_to_pandas_is_tidy():
    df = make([0, 1]).to_pandas()
    assert list(df.columns) == ["layer", "layer_name", "step", "timestep", "target", "stream", "branch", "metric",
                                "mean", "std", "cov", "n"]
    assert len(df) == 3 * 3 * 3  # keys x steps x metrics
    assert set(df.step) == {1, 2, 3} and set(df.timestep) == {700.0, 400.0, 100.0}
    assert (df.n == 2).all()


def test_merge_equals_one_profile_of_all_prompts():
    a, b = make([0, 2], seed=1), make([1, 3], seed=2)
    merged = b.merge(a)
    assert merged.prompt_index.tolist() == [0, 1, 2, 3]
    direct = np.concatenate([a.values, b.values])
    np.testing.assert_allclose(merged.stats.mean, direct.mean(0), rtol=1e-6)
    np.testing.assert_allclose(merged.stats.std, direct.std(0), rtol=1e-5)


def test_merge_refuses_overlap_and_different_runs():
    with pytest.raises(DitscopeError, match="prompt 1 is in both"):
        make([0, 1]).merge(make([1, 2]))
    other = dict(META, num_inference_steps=8)
    with pytest.raises(DitscopeError, match="num_inference_steps"):
        make([0]).merge(make([1], meta=other))


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.ditscope"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DitscopeError, match="corrupt"):
        Profile.load(bad)
    truncated = tmp_path / "trunc.ditscope"
    data = make([0]).save(tmp_path / "ok.ditscope").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DitscopeError, match="corrupt"):
        Profile.load(truncated)
    with pytest.raises(DitscopeError, match="does not exist"):
        Profile.load(tmp_path / "missing.ditscope")


def test_newer_format_is_a_clear_error(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = make([0]).save(tmp_path / "p.ditscope")
    with safe_open(str(path), "np") as f:
        header = dict(f.metadata())
    header["format_version"] = "99"
    save_file(load_file(str(path)), str(path), metadata=header)
    with pytest.raises(DitscopeError, match="newer ditscope"):
        Profile.load(path)
    header["format"] = "something-else"
    header["format_version"] = "1"
    save_file(load_file(str(path)), str(path), metadata=header)
    with pytest.raises(DitscopeError, match="not a ditscope profile"):
        Profile.load(path)
    assert json.loads(header["meta"])["model"] == "m"


def test_atomic_write_leaves_the_old_file_or_the_new_one_never_a_part(tmp_path):
    from ditscope.files import atomic_path, write_text_atomic

    target = tmp_path / "result.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
