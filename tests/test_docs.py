"""Every command the README and docs/ show runs as written, at small sizes.

The fenced `bash` and `python` blocks of README.md and docs/**/*.md are extracted and run, one block after
another in a scratch folder per document (later blocks use what earlier ones wrote, as a reader's would).
What changes between the page and the run is in the tables below, and only that: placeholders a reader fills
in (MODEL, coco.txt, a hub id) become a zoo model and small files, and options are appended that make a run
small (fewer steps and prompts; the last value of an option wins). A `torchrun` line runs its ditscope command
in this process (its launch on two ranks is tests/test_parallel.py's). A command that matches no rule fails the
test, so a README that drifts, or a new command nobody made runnable, fails CI.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ditscope
from ditscope.cli.main import app

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))]

# Commands shown but not run here, with why: the words joined by spaces (quotes and comments removed).
NOT_RUN = {
    "pip install torch==2.13.0 -e .[test]": "the install: CI runs it (.ci/run)",
    "python -m pytest": "this is the test suite",
    "ditscope profile": "the main job: tests/test_cli.py runs it as written (no arguments) and checks its files",
}

# Placeholders a reader replaces -> what the test uses (whole words only).
PLACEHOLDERS = {
    "MODEL": "tiny-pixart",
    "PixArt-alpha/PixArt-XL-2-1024-MS": "tiny-pixart",
    "cuda": "cpu",
    "bfloat16": "float32",  # CPU bfloat16 kernels are slow; the option parsing is the same
}

# Options appended per command (its words after `ditscope`, longest match first) to make it small.
SMALL = {
    ("profile",): ["--steps", "3"],
    ("recommend",): ["--steps", "4", "--n-prompts", "2", "--test-prompts", "2", "--budget", "3m"],
    ("generate",): ["--steps", "4"],
    ("tune",): ["--steps", "4", "--n-prompts", "2"],
    ("tune", "tiny-dit"): [
        "--steps",
        "12",
        "--n-prompts",
        "2",
    ],  # ToCa reaches the README's 1.2x with room at 12 steps
    ("plan",): [
        "--steps",
        "10",
        "--n-prompts",
        "2",
        "--iterations",
        "3",
    ],  # fewer steps: no plan that saves work holds psnr=30
    ("bench",): [
        "--steps",
        "4",
        "--prompts",
        "2",
        "--seeds",
        "1",
        "--repeats",
        "0",
        "--calibration-prompts",
        "2",
    ],
    ("eval",): ["--samples", "4", "--steps", "4"],
    ("zoo", "prompts"): ["--n", "6"],
    ("zoo", "grid"): ["--n", "2"],
    ("zoo", "train"): ["--steps", "2", "--batch", "2", "--out", "train"],
    ("zoo", "train", "tiny-latte"): [
        "--steps",
        "2",
        "--batch",
        "2",
        "--out",
        "train-latte",
    ],  # apart from tiny-pixart's
    ("study", "prompts"): ["--steps", "3", "--bootstrap", "50"],
    ("study", "steps"): ["--steps", "3,4,6", "--prompts", "small.txt"],
    ("study", "scheduler"): ["--steps", "3", "--prompts", "small.txt"],
    ("study", "models"): ["--steps", "3", "--prompts", "small.txt"],
    ("show",): [],
    ("plot",): [],
    ("merge",): [],
    ("zoo", "list"): [],  # they read files: nothing to make small
}

# The same for the benchmark scripts the docs show (by script name).
SCRIPT_SMALL = {
    "prompts_study_check.py": [],
    "signal_predictiveness.py": ["--test-prompts", "2", "--out", "signal.md", "--work", "signal-work"],
}

# Files a reader brings (named in the docs) -> what the test writes for them.
SMALL_PROMPTS = [
    "a large red circle on the left on a grey background",
    "a small blue square at the top right on a white background",
]
GRID = {"toca": {"ratio": [0.3], "interval": [3, 4]}, "steps": [2, 3]}  # the README's grid, at --steps 4
INPUT_FILES = {
    "coco.txt": SMALL_PROMPTS * 2,
    "p.txt": SMALL_PROMPTS,
    "small.txt": SMALL_PROMPTS,
}  # 4: --shard 0/4

# Python blocks: the names a reader has already (a pipeline, prompts, their own model and sampling loop).
PY_SUBSTITUTIONS = {
    # at 4 steps no plan that saves work holds psnr=30 (it is refused): the plan's target is lowered with them
    'target="psnr=30", num_inference_steps=20': 'target="psnr=20", num_inference_steps=4',
    "num_inference_steps=20": "num_inference_steps=4",
    "steps=30": "steps=4",
    "num_inference_steps=30": "num_inference_steps=4",
    '"MyAttention"': '"Attention"',  # the class name of the stand-in model's attention (tests/opensora_like.py)
}


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of each fenced block."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if lang is None and line.startswith("```"):
            lang, start, lines = line[3:].strip(), number + 1, []
        elif lang is not None and line.startswith("```"):
            blocks.append((lang, start, "\n".join(lines)))
            lang = None if line.strip() == "```" else line[3:].strip()
            start, lines = number + 1, []
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"{path}: a fenced block is not closed"
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """A bash block -> its commands as words (continuations joined, comments dropped, `&&` split)."""
    commands = []
    for line in text.replace("\\\n", "").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1 :]
    return commands


def small(words: list[str]) -> list[str]:
    """A ditscope command's words (after `ditscope`) with placeholders filled in and small options added."""
    words = [PLACEHOLDERS.get(w, w) for w in words]
    for key in sorted(SMALL, key=len, reverse=True):
        if tuple(words[: len(key)]) == key:
            return words + SMALL[key]
    raise AssertionError(f"no rule makes `ditscope {' '.join(words)}` small: add one to SMALL in {__file__}")


def expand(words: list[str]) -> list[str]:
    """The shell's glob expansion, for the words that have a match."""
    out = []
    for w in words:
        matches = sorted(glob.glob(w)) if any(c in w for c in "*?[") else []
        out += matches or [w]
    return out


def environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO / "tests")}


def run_ditscope(words: list[str], where: str) -> None:
    started = time.perf_counter()
    result = CliRunner().invoke(app, expand(words), catch_exceptions=False)
    print(f"  {time.perf_counter() - started:.1f} s", flush=True)
    assert result.exit_code == 0, (
        f"{where}: `ditscope {' '.join(words)}` exit {result.exit_code}:\n{result.output}"
    )


def run_process(words: list[str], where: str, timeout: float) -> None:
    proc = subprocess.run(words, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{where}: `{' '.join(words)}` exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    )


def run_command(words: list[str], where: str) -> None:
    text = " ".join(words)
    print(f"{where}: {text}", flush=True)
    if text in NOT_RUN:
        return
    if words[0] == "ditscope":
        words = small(words[1:])
        shard = next((w for w in words if re.fullmatch(r"\d+/\d+", w)), None)
        if "--shard" in words and shard:  # by hand means every shard: the reader runs them all
            count = int(shard.split("/")[1])
            for i in range(count):
                run_ditscope([w if w != shard else f"{i}/{count}" for w in words], where)
        else:
            run_ditscope(words, where)
    elif words[0] == "torchrun":
        # torchrun's own parser reads the line (it refuses, e.g., `--n` after the module as ambiguous with its
        # options), and the ditscope command runs here in one process: the same commands launched on two CPU
        # ranks (gloo) are tests/test_parallel.py's and tests/test_cli.py's, which also check that two ranks
        # give what one process gives
        from torch.distributed.run import get_args_parser

        try:
            launch = get_args_parser().parse_args(words[1:])
        except SystemExit:
            raise AssertionError(f"{where}: torchrun refuses `{text}`") from None
        assert launch.module and launch.training_script == "ditscope", (
            f"{where}: `{text}` does not run ditscope"
        )
        run_ditscope(small(launch.training_script_args), where)
    elif words[0] == "python" and words[1].startswith("benchmarks/"):
        script = REPO / words[1]
        args = [
            re.sub(r"(?<![\w/])benchmarks/", f"{REPO}/benchmarks/", w) for w in words[2:]
        ]  # shipped files
        run_process([sys.executable, str(script), *args, *SCRIPT_SMALL[script.name]], where, timeout=300)
    else:
        raise AssertionError(
            f"{where}: `{text}` is neither ditscope, torchrun nor a benchmark script: add a rule"
        )


def python_namespace() -> dict:
    """What a reader of a Python block has: a pipeline and prompts, and their own model and sampling loop."""
    import opensora_like
    import torch

    model = opensora_like.build()
    sampler = opensora_like.Sampler(model)

    def my_sampling_loop(model, prompt, steps=4):
        return opensora_like.Sampler(model)(
            [prompt], num_inference_steps=steps, generator=torch.Generator().manual_seed(0)
        )

    return {
        "ditscope": ditscope,
        "torch": torch,
        "pipe": ditscope.zoo.load("tiny-pixart"),
        "prompts": SMALL_PROMPTS,
        "calib_prompts": SMALL_PROMPTS,
        "prompt": SMALL_PROMPTS[0],
        "model": model,
        "my_sampling_loop": my_sampling_loop,
        "my_pipeline_like": sampler,
    }


def run_python(text: str, namespace: dict, where: str) -> None:
    for old, new in PY_SUBSTITUTIONS.items():
        text = text.replace(old, new)
    try:
        exec(compile(text, where, "exec"), namespace)
    except Exception as e:  # noqa: BLE001 (any failure of a shown block fails the test, with its place)
        raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e


def test_extraction_and_rules_on_a_made_up_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```bash\nditscope profile MODEL --steps 9   # a comment\n"
        "ditscope zoo prompts --n 3 \\\n    --out x.txt && ditscope show a.ditscope\n```\n"
        "```python\nx = 1\n```\n```\nnot a block to run\n```\n",
        encoding="utf-8",
    )
    blocks = fenced_blocks(page)
    assert [(lang, start) for lang, start, _ in blocks] == [("bash", 3), ("python", 8), ("", 11)]
    assert shell_commands(blocks[0][2]) == [
        ["ditscope", "profile", "MODEL", "--steps", "9"],
        ["ditscope", "zoo", "prompts", "--n", "3", "--out", "x.txt"],
        ["ditscope", "show", "a.ditscope"],
    ]
    assert small(["profile", "MODEL", "--steps", "9"]) == [
        "profile",
        "tiny-pixart",
        "--steps",
        "9",
        "--steps",
        "3",
    ]
    with pytest.raises(AssertionError, match="no rule"):
        small(["frobnicate", "x"])
    with pytest.raises(AssertionError, match="add a rule"):
        run_command(["curl", "x"], "page.md:3")
    # torchrun's parser reads a shown launch: `--n` after the module is ambiguous with its own options
    with pytest.raises(AssertionError, match="torchrun refuses"):
        run_command(
            shlex.split("torchrun --nproc-per-node 2 -m ditscope eval tiny-pixart --n 8"), "page.md:4"
        )


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_in_the_document_runs(document, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, lines in INPUT_FILES.items():
        Path(name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path("my_grid.json").write_text(json.dumps(GRID), encoding="utf-8")
    namespace = None
    ran = 0
    for lang, start, text in fenced_blocks(REPO / document):
        where = f"{document}:{start}"
        if lang == "bash":
            for words in shell_commands(text):
                run_command(words, where)
                ran += 1
        elif lang == "python":
            namespace = namespace or python_namespace()
            run_python(text, namespace, where)
            ran += 1
    assert ran or not any(lang in ("bash", "python") for lang, _, _ in fenced_blocks(REPO / document))
