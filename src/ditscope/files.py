"""Writing files so that a reader never sees half of one: write beside it, then rename over it.

A kill mid-write leaves the old file (or none) and at most a hidden temporary, never a truncated file
under the real name; resumable runs rely on that. The file gets the mode a plain `open` would give it
(0666 less the umask), not the temporary's private 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; renamed onto `path` when the block succeeds,
    removed when it raises. `fsync` flushes it to disk first (for files a crash must not lose)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8) that a kill cannot leave half-written."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_checksum(body: dict) -> str:
    """SHA-256 of a JSON file's fields (all but its checksum), in a canonical form: plan and tuned files."""
    import hashlib
    import json

    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def missing_folders(path: str | Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first: what a run that fails should remove."""
    found, p = [], Path(path)
    while not p.exists():
        found.append(p)
        p = p.parent
    return found


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def save_images(path: str | Path, images) -> None:
    """Samples (a tensor: images or videos) as a safetensors file under the key "images", written atomically:
    the uncached reference of a plan, tune or recommend run and a bench setting's samples."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous()}, str(tmp))


def load_images(path: str | Path):
    """The samples `save_images` wrote to `path`."""
    from safetensors.torch import load_file

    return load_file(str(path))["images"]
