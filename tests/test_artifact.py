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
    sample = Sample(
        {k: rng.random((n, 3, 3)).astype(np.float32) for k in keys}, [999.0, 700.0, 400.0, 100.0], n
    )
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
    assert list(df.columns) == [
        "layer",
        "layer_name",
        "step",
        "timestep",
        "target",
        "stream",
        "branch",
        "metric",
        "mean",
        "std",
        "cov",
        "n",
    ]
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


def _rewrite(path, tensors=None, **fields):
    """Rewrite a profile file with header fields replaced (None removes one), its checksum recomputed."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from ditscope.profiling.artifact import checksum

    with safe_open(str(path), "np") as f:
        header = dict(f.metadata())
    tensors = tensors or load_file(str(path))
    header.update(fields)
    header = {k: v for k, v in header.items() if v is not None}
    if header.get("format_version") != "1":
        header["checksum"] = checksum(tensors, header)
    save_file(tensors, str(path), metadata=header)
    return path


def test_flipped_data_bytes_are_refused_by_the_checksum(tmp_path):
    path = make([0, 1]).save(tmp_path / "p.ditscope")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x40  # inside the tensors: safetensors itself cannot tell
    path.write_bytes(bytes(data))
    with pytest.raises(DitscopeError, match="does not match its checksum") as e:
        Profile.load(path)
    assert "\n" not in str(e.value)


def test_format_1_files_without_a_checksum_still_load(tmp_path):
    p = make([0, 1])
    path = _rewrite(p.save(tmp_path / "p.ditscope"), format_version="1", checksum=None)
    np.testing.assert_array_equal(Profile.load(path).values, p.values)
    # a format 2 file must carry its checksum
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    _rewrite(path, format_version="2")
    with safe_open(str(path), "np") as f:
        header = {k: v for k, v in f.metadata().items() if k != "checksum"}
    save_file(load_file(str(path)), str(path), metadata=header)
    with pytest.raises(DitscopeError, match="checksum"):
        Profile.load(path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("keys", '"k"'),
        ("keys", "[[0, 1, 2, 3]]"),
        ("keys", '[["0", "k", "image", "cond"]]'),
        ("keys", '[[7, "k", "image", "cond"]]'),
        ("layer_names", "{}"),
        ("layer_names", "[1, 2]"),
        ("metrics", "[]"),
        ("metrics", "3"),
        ("meta", "[1]"),
        ("meta", "not json"),
        ("keys", None),
        ("format_version", "two"),
    ],
)
def test_header_fields_of_the_wrong_type_are_one_line_errors(tmp_path, field, value):
    path = _rewrite(make([0]).save(tmp_path / "p.ditscope"), **{field: value})
    with pytest.raises(DitscopeError, match="corrupt") as e:
        Profile.load(path)
    assert "\n" not in str(e.value)


def test_tensors_of_the_wrong_type_are_one_line_errors(tmp_path):
    from safetensors.numpy import load_file

    path = make([0]).save(tmp_path / "p.ditscope")
    tensors = load_file(str(path))
    tensors["prompt_index"] = tensors["prompt_index"].astype(np.float32)
    _rewrite(path, tensors=tensors)
    with pytest.raises(DitscopeError, match="prompt_index"):
        Profile.load(path)


def test_saved_files_take_the_umask_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        assert make([0]).save(tmp_path / "p.ditscope").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert make([0]).save(tmp_path / "q.ditscope").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
