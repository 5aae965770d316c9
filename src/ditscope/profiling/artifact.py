"""The profile file format lives in `ditscope.artifact` (below capture and profiling, which both write it);
this name stays for code that imports it from here."""

from ..artifact import *  # noqa: F403
from ..artifact import FORMAT, FORMAT_VERSION, RUN_FIELDS, Profile, checksum, sha256_of  # noqa: F401
