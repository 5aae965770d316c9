"""Time of one zoo training step (forward, backward, AdamW), fp32 against bf16 autocast and torch.compile.

The zoo's training budget is wall clock (90 minutes on 2 CPU cores), so steps per second decide how much
a model learns. This measures the step `ditscope zoo train` runs: a fresh generator batch, captions
through the text encoder, v-prediction loss, backward, optimizer step. Modes are measured one after
another in this process; the first `--warmup` steps of each (and compilation) are not timed, and we
report the median of the rest and its ratio to fp32.

    python benchmarks/train_step.py                       # tiny-pixart, batch 32, all cores this process may use
    python benchmarks/train_step.py --modes fp32,bf16     # skip torch.compile (a minute of compiling on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ditscope.zoo import train


def step_times(name: str, mode: str, batch: int, steps: int, warmup: int) -> list[float]:
    pipe = train.build(name)
    modules = [m for m in (pipe.transformer, pipe.text_encoder) if m is not None]
    for m in modules:
        m.train()
    opt = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=1e-3)
    if mode == "compile":
        pipe.transformer = torch.compile(pipe.transformer)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        rng = np.random.default_rng([0, step])
        x0, scenes = train.training_batch(name, batch, rng)
        prompts = train.training_prompts(name, scenes, rng)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (batch,))
        xt, target = noise_sched.add_noise(x0, noise, t), noise_sched.get_velocity(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            pred = pipe.predict(xt, t, pipe._conditioning(prompts, "", False, "cpu"))
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny-pixart", choices=[r for r in train.RECIPES if r != "tiny-latte"]
    )
    parser.add_argument("--modes", default="fp32,bf16,compile")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "fp32" not in modes or not set(modes) <= {"fp32", "bf16", "compile"}:
        parser.error("--modes: a comma list of fp32 (required, the reference), bf16, compile")
    modes = ["fp32"] + [m for m in modes if m != "fp32"]  # the reference first
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(
        f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.steps} steps"
    )
    medians = {}
    for mode in modes:
        medians[mode] = statistics.median(step_times(args.model, mode, args.batch, args.steps, args.warmup))
        print(f"{mode:8s} {medians[mode]:.3f} s/step  speedup {medians['fp32'] / medians[mode]:.2f}x")


if __name__ == "__main__":
    main()
