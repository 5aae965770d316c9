"""The one loader of ditscope's versioned files (profiles, plans, tuned configs): where the file is, its format,
its version and its checksum, checked the same way for each, with the same messages (the kind of file named).

Each file says what it is (`format`), which version of that format it is, and carries a checksum of the rest
(SHA-256), so a damaged or foreign file is refused rather than run. A plan or a tuned config without a checksum
(hand-written, or older than checksums) loads unverified: deleting the line is how a hand-edited one is run.
A profile reads every older version (version 1 has no checksum); plans and tuned configs read their version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DitscopeError


@dataclass(frozen=True)
class FileFormat:
    """A versioned file format.

    Attributes:
        kind: what the messages call it ("plan file", "tuned config", "profile").
        format: the value of its `format` field.
        version: the version this ditscope writes (and reads).
        suffix: its file name's ending (a folder given instead: the hint names a file in it).
        writer: the command that writes one ("ditscope plan").
        again: how to make one again ("make it again with ditscope plan").
        edited: how to run a hand-edited one (a checksum that may be deleted), or "" where none may be.
        version_key: the field holding its version.
        reads_older: versions below `version` load too.
        checksum_from: the version from which a checksum must be present (None: checked where present).
        unversioned: the version of a file that names none (None: such a file is refused).
    """

    kind: str
    format: str
    version: int
    suffix: str
    writer: str
    again: str
    edited: str = ""
    version_key: str = "format_version"
    reads_older: bool = False
    checksum_from: int | None = None
    unversioned: int | None = None

    def existing(self, path) -> Path:
        """`path`, refused when it is not a path, a folder, or does not exist."""
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise DitscopeError(f"a {self.kind} is loaded from a file path, not {path!r}")
        path = Path(path)
        if path.is_dir():
            inside = sorted(path.glob(f"*{self.suffix}"))
            hint = f"pass {inside[0]}" if inside else f"pass a {self.suffix} file ({self.writer} writes one)"
            raise DitscopeError(f"{path} is a folder, not a {self.kind}; {hint}")
        if not path.is_file():
            raise DitscopeError(f"{self.kind} {path} does not exist")
        return path

    def read_json(self, path) -> tuple[Path, dict]:
        """(path, body) of a JSON file of this format: found, parsed, and its format, version and checksum checked
        (`check`); the checksum covers every field but itself (files.json_checksum)."""
        from .files import json_checksum

        path = self.existing(path)
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DitscopeError(
                f"{path} is not a {self.kind}: it is corrupt or truncated (not JSON: "
                f"{e.__class__.__name__}); {self.again}"
            ) from None
        except OSError as e:
            raise DitscopeError(f"cannot read {self.kind} {path}: {e.strerror or e}") from None
        if not isinstance(body, dict):
            raise self.foreign(path)
        self.check(path, body, lambda: json_checksum({k: v for k, v in body.items() if k != "checksum"}))
        return path, body

    def foreign(self, path) -> DitscopeError:
        noun = self.format.removeprefix("ditscope-")
        return DitscopeError(
            f"{path} is not a {self.kind} (not a ditscope {noun} file: {self.writer} writes those)"
        )

    def check(self, path, header: dict, checksum: Callable[[], str]) -> int:
        """Check a file's format, version and checksum (`checksum()` computes what it should be); its version."""
        if header.get("format") != self.format:
            raise self.foreign(path)
        raw = header.get(self.version_key, self.unversioned)
        try:
            version = (
                int(raw)
                if not isinstance(raw, bool) and (isinstance(raw, int) or str(raw).isdigit())
                else None
            )
        except ValueError:
            version = None
        if version is None:
            raise DitscopeError(f"{path} is corrupt: its format version ({raw!r}) is not a number")
        if version > self.version:
            raise DitscopeError(
                f"{path} has format version {version}: written by a newer ditscope (this one reads "
                f"version <= {self.version}); upgrade ditscope"
            )
        if version < self.version and not self.reads_older:
            raise DitscopeError(
                f"{path} has format version {version}; this ditscope reads version {self.version}: "
                f"{self.again}"
            )
        required = self.checksum_from is not None and version >= self.checksum_from
        if (required or "checksum" in header) and header.get("checksum") != checksum():
            edited = f" (or {self.edited})" if self.edited else ""
            raise DitscopeError(
                f"{path} does not match its checksum: it is damaged or was edited; {self.again}{edited}"
            )
        return version
