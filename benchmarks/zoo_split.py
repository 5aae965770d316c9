"""The benchmarks' split of a zoo model's prompts: calibration prompts to fit on (zoo prompt seed 7000) and test
prompts to score on (seed 3000), with the command-line arguments that size them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import ditscope
from ditscope.zoo import evaluator

CALIBRATION_SEED, TEST_SEED = 7000, 3000


def arguments(description: str | None = None, target: str | None = "psnr=30") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("model", nargs="?", default="tiny-pixart")
    if target is not None:
        ap.add_argument("--target", default=target)
    ap.add_argument("--calibration-prompts", type=int, default=8)
    ap.add_argument("--test-prompts", type=int, default=32)
    return ap


@dataclass
class Split:
    pipe: object
    steps: int
    guidance: float | None
    calibration: list
    test: list


def load(args) -> Split:
    """The zoo model of `args.model` (progress bars off) and its calibration and test prompts."""
    pipe = ditscope.zoo.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    entry = ditscope.zoo.ZOO[args.model]
    return Split(
        pipe,
        entry.steps,
        entry.guidance_scale,
        evaluator.evaluation_prompts(pipe, args.calibration_prompts, seed=CALIBRATION_SEED)[1],
        evaluator.evaluation_prompts(pipe, args.test_prompts, seed=TEST_SEED)[1],
    )
