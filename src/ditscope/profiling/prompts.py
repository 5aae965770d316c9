"""Reading prompt files: .txt (one prompt a line), .jsonl (one object or string a line), .csv (a column)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import DitscopeError

DEFAULT_COLUMNS = ("prompt", "caption", "text")


def load_prompts(path, column: str | None = None) -> list[str]:
    """Prompts from a file, in order, empty lines skipped. Errors name the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise DitscopeError(f"prompts file {path} is a folder; give a .txt, .jsonl or .csv file")
    if not path.is_file():
        raise DitscopeError(f"prompts file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DitscopeError(f"cannot read prompts file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DitscopeError(
            f"prompts file {path} is not UTF-8 (bad byte at offset {e.start}); re-save it as UTF-8"
        ) from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _jsonl(text, path, column)
    elif suffix == ".csv":
        prompts = _csv(text, path, column)
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DitscopeError(f"prompts file {path} has no prompts")
    return prompts


def _pick(record: dict, column: str | None, where: str) -> str:
    names = (column,) if column else DEFAULT_COLUMNS
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise DitscopeError(f"{where}: {name!r} is {json.dumps(value)}, not a prompt (a string)")
            return str(value).strip()
    raise DitscopeError(
        f"{where} has no column {' or '.join(repr(n) for n in names)}; choose one with --column"
    )


def _jsonl(text: str, path: Path, column: str | None) -> list[str]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DitscopeError(f"{path} line {n} is not valid JSON") from None
        if not isinstance(item, (str, dict)):
            raise DitscopeError(
                f"{path} line {n} is {type(item).__name__} {line.strip()[:40]}, not a prompt: "
                "write a string or an object with a prompt field"
            )
        prompts.append(item.strip() if isinstance(item, str) else _pick(item, column, f"{path} line {n}"))
    return prompts


def _csv(text: str, path: Path, column: str | None) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise DitscopeError(f"prompts file {path} has no header row")
    return [_pick(row, column, str(path)) for row in reader]


# ------------------------------------------------------------------- prompts as a pipeline takes them
def pipeline_prompt_kwargs(pipe, prompts: list[str]) -> dict:
    """How a pipeline takes a batch of prompts. DiT is class-conditional: its "prompts" are labels."""
    if type(pipe).__name__ == "DiTPipeline":
        return {"class_labels": [_dit_label(pipe, p) for p in prompts]}
    return {"prompt": list(prompts)}


def _dit_label(pipe, prompt: str) -> int:
    text = prompt.strip()
    if text.isdigit():
        return int(text)
    labels = getattr(pipe, "labels", None) or {}
    if text in labels:
        return int(labels[text])
    raise DitscopeError(
        f"DiT prompt {text!r} is neither a class index nor a known label name; "
        "use integers 0..999 or names from pipe.labels"
    )
