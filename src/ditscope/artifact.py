"""The profile artifact: per-prompt distances, streaming statistics over prompts, and metadata.

On disk it is one safetensors file (`*.ditscope`): arrays as tensors, everything else as JSON in the
header. Writes are atomic (temporary file + rename), so a crash never leaves a half-written profile.
Format 2 adds a SHA-256 checksum over every tensor (name, dtype, shape, bytes) and every header field;
`Profile.load` verifies it, so a damaged file is refused instead of shown as numbers. Format 1 files
(no checksum, written before it existed) still load, unverified.

Axes: values[prompt, key, column, metric], where a key is (layer, target, stream, branch), column c holds
sampling step s = c + 1 (the step axis: see `profile_column`), and metric is one of `METRICS`. `stats` holds count/mean/M2/min/max
over prompts with the same (key, column, metric) axes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DitscopeError
from .files import atomic_path
from .stats.distances import METRICS
from .stats.running import FIELDS, RunningStats
from .versioned import FileFormat

FORMAT = "ditscope-profile"
FORMAT_VERSION = 2  # 2: with a checksum (format 1 files have none and load unverified)


# The step axis, one convention for all of ditscope: sampling steps are numbered 0 .. T-1 in sampling order (the
# engine's clock, plans' rows, a calibration's measurements). A profile holds what changed into each step from
# steps before it, so step 0 has no entry: its T-1 columns are steps 1 .. T-1, and `profile_column` is the one
# conversion between the two (calibration writes with it, the planner's search reads with it).
def profile_column(step):
    """The column of a profile's step axis that holds sampling step `step` (1 .. T-1; an integer array too)."""
    return step - 1


PROFILE_FILE = FileFormat(
    "profile",
    FORMAT,
    FORMAT_VERSION,
    ".ditscope",
    "ditscope profile",
    "profile again or restore a copy",
    reads_older=True,
    checksum_from=2,
    unversioned=0,
)
TARGET_ORDER = ("q", "k", "v", "a", "out")
# Metadata that must agree for two profiles to be merged (everything that changes the numbers).
RUN_FIELDS = (
    "model",
    "model_config_hash",
    "scheduler",
    "scheduler_config_hash",
    "num_inference_steps",
    "dtype",
    "seed",
    "prompts_hash",
    "n_prompts_total",
    "guidance_scale",
    "batch_size",
    "targets",
    "storage_dtype",
    "outputs",
)


def _key_order(key):
    """Layer, then target (the capture targets in their order, then calibration targets such as
    `reuse@2` by name and lag), stream, branch."""
    layer, target, stream, branch = key
    if target in TARGET_ORDER:
        return (layer, TARGET_ORDER.index(target), "", 0, stream, branch)
    name, _, lag = target.partition("@")
    return (layer, len(TARGET_ORDER), name, int(lag) if lag.isdigit() else 0, stream, branch)


@dataclass
class Profile:
    keys: list[tuple[int, str, str, str]]
    layer_names: list[str]
    timesteps: list[float]
    prompt_index: np.ndarray  # (P,) global index of each prompt in the prompt list
    values: np.ndarray  # (P, K, T-1, M) float32
    stats: RunningStats  # (K, T-1, M)
    meta: dict = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_sample(cls, sample, layer_names, prompt_index, meta=None) -> Profile:
        keys = sorted(sample.values, key=_key_order)
        values = np.stack([sample.values[k] for k in keys], axis=1)  # (P, K, S, M)
        return cls(
            keys=keys,
            layer_names=list(layer_names),
            timesteps=list(sample.timesteps),
            prompt_index=np.asarray(prompt_index, np.int64),
            values=values.astype(np.float32),
            stats=RunningStats.of(values),
            meta=dict(meta or {}),
        )

    @property
    def n_prompts(self) -> int:
        return int(self.prompt_index.shape[0])

    @property
    def n_steps(self) -> int:
        """Number of sampling steps T (distances exist for steps 1..T-1)."""
        return len(self.timesteps)

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    def run_fields(self) -> dict:
        return {k: self.meta.get(k) for k in RUN_FIELDS}

    # ------------------------------------------------------------------------------------- merge
    def merge(self, other: Profile) -> Profile:
        """Combine profiles of disjoint prompts of the same run (shards, or resumed parts)."""
        if self.run_fields() != other.run_fields():
            diff = [k for k in RUN_FIELDS if self.meta.get(k) != other.meta.get(k)]
            raise DitscopeError(
                f"cannot merge profiles of different runs (they differ in: {', '.join(diff)})"
            )
        if self.keys != other.keys or self.layer_names != other.layer_names:
            raise DitscopeError("cannot merge profiles with different layers, targets, streams or branches")
        if len(self.timesteps) != len(other.timesteps) or not np.allclose(self.timesteps, other.timesteps):
            raise DitscopeError("cannot merge profiles with different timesteps")
        overlap = np.intersect1d(self.prompt_index, other.prompt_index)
        if overlap.size:
            raise DitscopeError(
                f"cannot merge: prompt {int(overlap[0])} is in both profiles (same shard twice?)"
            )
        index = np.concatenate([self.prompt_index, other.prompt_index])
        order = np.argsort(index, kind="stable")
        meta = dict(self.meta)
        meta.pop("shard", None)
        return Profile(
            keys=list(self.keys),
            layer_names=list(self.layer_names),
            timesteps=list(self.timesteps),
            prompt_index=index[order],
            values=np.concatenate([self.values, other.values])[order],
            stats=self.stats.merge(other.stats),
            meta=meta,
            metrics=self.metrics,
        )

    # ------------------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write atomically: a reader sees the old file or the new one, never a partial one."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = {
            "values": np.ascontiguousarray(self.values, np.float32),
            "prompt_index": np.ascontiguousarray(self.prompt_index, np.int64),
            "timesteps": np.asarray(self.timesteps, np.float64),
        }
        for name, arr in self.stats.as_dict().items():
            tensors[f"stats.{name}"] = np.ascontiguousarray(arr)
        header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "keys": json.dumps([list(k) for k in self.keys]),
            "layer_names": json.dumps(self.layer_names),
            "metrics": json.dumps(list(self.metrics)),
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
        }
        header["checksum"] = checksum(tensors, header)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, fsync=True) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path) -> Profile:
        from safetensors import safe_open

        path = PROFILE_FILE.existing(path)
        try:
            with safe_open(str(path), framework="np") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises several types for damaged files
            raise DitscopeError(f"{path} is corrupt or not a ditscope profile ({type(e).__name__})") from None
        PROFILE_FILE.check(path, header, lambda: checksum(tensors, header))
        try:
            fields = _parse_header(header, tensors)
        except (KeyError, ValueError, TypeError) as e:
            raise DitscopeError(f"{path} is corrupt: missing or malformed field {e}") from None
        prof = cls(**fields)
        expected = (prof.n_prompts, len(prof.keys), prof.n_steps - 1, len(prof.metrics))
        if prof.values.shape != expected or any(
            a.shape != expected[1:] for a in prof.stats.as_dict().values()
        ):
            raise DitscopeError(f"{path} is corrupt: array shapes do not match its header")
        return prof

    # ----------------------------------------------------------------------------------- tables
    def to_pandas(self):
        """Tidy table: one row per (layer, step, target, stream, branch, metric)."""
        import pandas as pd

        K, S, M = self.stats.shape
        k_idx, s_idx, m_idx = (
            a.ravel() for a in np.meshgrid(np.arange(K), np.arange(S), np.arange(M), indexing="ij")
        )
        keys = np.array(self.keys, dtype=object)
        layers = keys[:, 0].astype(int)
        return pd.DataFrame(
            {
                "layer": layers[k_idx],
                "layer_name": np.array(self.layer_names, dtype=object)[layers[k_idx]],
                "step": s_idx + 1,
                "timestep": np.asarray(self.timesteps)[s_idx + 1],
                "target": keys[k_idx, 1],
                "stream": keys[k_idx, 2],
                "branch": keys[k_idx, 3],
                "metric": np.array(self.metrics, dtype=object)[m_idx],
                "mean": self.stats.mean.ravel(),
                "std": self.stats.std.ravel(),
                "cov": self.stats.cov.ravel(),
                "n": self.stats.count.ravel(),
            }
        )

    def options(self, field: str) -> list[str]:
        """Distinct values of 'target', 'stream' or 'branch' present in the profile."""
        pos = {"target": 1, "stream": 2, "branch": 3}[field]
        seen = []
        for k in self.keys:
            if k[pos] not in seen:
                seen.append(k[pos])
        return seen

    def default_view(self) -> dict:
        """The view figures and summaries use by default: image tokens, the cond branch."""
        streams, branches = self.options("stream"), self.options("branch")
        return {
            "stream": "auto" if "image" in streams else streams[0],
            "branch": "cond" if "cond" in branches else branches[0],
        }

    def key_rows(self, target: str, stream: str, branch: str) -> dict[int, int]:
        """layer -> index into `keys` of that layer's (target, stream, branch) key.

        `stream="auto"` takes each layer's image stream, or its text stream where it has no image
        stream for this target (K and V of cross-attention layers).
        """
        rows = {}
        for i, (layer, t, s, b) in sorted(enumerate(self.keys), key=lambda item: item[1][2] != "image"):
            wanted = (s == "image" or layer not in rows) if stream == "auto" else s == stream
            if t == target and b == branch and wanted:
                rows[layer] = i
        return rows

    def grid(
        self, target: str, stream: str, branch: str, metric: str = "l1", stat: str = "mean"
    ) -> np.ndarray:
        """(layers, steps-1) array of a statistic; NaN where a layer has no such key (see `key_rows`)."""
        m = self.metrics.index(metric)
        arr = self.stats.cov if stat == "cov" else self.stats.std if stat == "std" else self.stats.mean
        out = np.full((self.n_layers, self.n_steps - 1), np.nan)
        for layer, i in self.key_rows(target, stream, branch).items():
            out[layer] = arr[i, :, m]
        return out

    def cov_table(self, metric: str = "l1"):
        """The paper's Table 2: mean over layers and steps of the CoV over prompts, per target."""
        import pandas as pd

        rows = []
        for stream in self.options("stream"):
            for branch in self.options("branch"):
                row = {"stream": stream, "branch": branch}
                for target in self.options("target"):
                    g = self.grid(target, stream, branch, metric, stat="cov")
                    row[target.upper()] = float(np.nanmean(g)) if np.isfinite(g).any() else np.nan
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, out_dir, formats=("png", "svg")) -> list[Path]:
        from .plots import plot_profile

        return plot_profile(self, out_dir, formats=formats)

    def __repr__(self) -> str:
        return (
            f"Profile(model={self.meta.get('model')!r}, layers={self.n_layers}, steps={self.n_steps}, "
            f"prompts={self.n_prompts}, targets={self.options('target')}, streams={self.options('stream')}, "
            f"branches={self.options('branch')})"
        )


def sha256_of(obj) -> str:
    """Stable hash of JSON-able data (configs, prompt lists)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checksum(tensors: dict, header: dict) -> str:
    """SHA-256 over the tensors (name, dtype, shape and bytes, by name) and the header's other fields."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
        h.update(memoryview(arr).cast("B") if arr.size else b"")
    h.update(json.dumps({k: v for k, v in header.items() if k != "checksum"}, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def _parse_header(header: dict, tensors: dict) -> dict:
    """The Profile fields from a file's header and tensors, each checked for its type (a ValueError,
    TypeError or KeyError names the field that is not what a profile holds)."""

    def parsed(name, check, what):
        value = json.loads(header[name])
        if not check(value):
            raise ValueError(f"{name!r} (not {what})")
        return value

    def strings(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def is_key(k):
        return (
            isinstance(k, list)
            and len(k) == 4
            and isinstance(k[0], int)
            and not isinstance(k[0], bool)
            and all(isinstance(x, str) for x in k[1:])
        )

    layer_names = parsed("layer_names", strings, "a list of names")
    keys = parsed(
        "keys",
        lambda v: isinstance(v, list) and all(is_key(k) and 0 <= k[0] < len(layer_names) for k in v),
        "a list of [layer, target, stream, branch]",
    )
    metrics = parsed("metrics", lambda v: strings(v) and len(v) > 0, "a list of metric names")
    meta = parsed("meta", lambda v: isinstance(v, dict), "an object")
    kinds = {"values": "f", "prompt_index": "iu", "timesteps": "fiu", **{f"stats.{n}": "fiu" for n in FIELDS}}
    for name, kind in kinds.items():
        if tensors[name].dtype.kind not in kind:
            raise TypeError(f"{name!r} (a {tensors[name].dtype} tensor)")
    if tensors["prompt_index"].ndim != 1 or tensors["timesteps"].ndim != 1:
        raise ValueError("'prompt_index' or 'timesteps' (not a vector)")
    return dict(
        keys=[tuple(k) for k in keys],
        layer_names=layer_names,
        timesteps=[float(t) for t in tensors["timesteps"]],
        prompt_index=tensors["prompt_index"].astype(np.int64, copy=False),
        values=tensors["values"],
        stats=RunningStats(**{n: tensors[f"stats.{n}"] for n in FIELDS}),
        meta=meta,
        metrics=tuple(metrics),
    )
