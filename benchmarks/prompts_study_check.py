"""Check a prompts study's CoV against an independent computation from the study's own profile file.

    python benchmarks/prompts_study_check.py runs/study            # the --out of `ditscope study prompts`

Reads the profile with safetensors and json only (not ditscope's Profile class), takes per layer the
image-stream key of the cond branch (the text-stream key where a layer has no image key: K and V of
cross-attention), and for every (layer, step) the population std / mean of the l1 distance over prompts,
in plain loops; the mean over cells (cells whose mean is 0 skipped) is the CoV. Prints both numbers per
target and exits 1 when any differs by more than 1 percentage point.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from safetensors import safe_open


def independent_cov(profile_path: Path) -> dict[str, float]:
    with safe_open(str(profile_path), framework="np") as f:
        header = f.metadata()
        values = f.get_tensor("values")  # (prompts, keys, steps - 1, metrics)
    keys = [tuple(k) for k in json.loads(header["keys"])]
    metric = json.loads(header["metrics"]).index("l1")
    n_prompts, _, n_dist, _ = values.shape
    out = {}
    for target in ("k", "v", "a"):
        cells = []
        for layer in sorted({k[0] for k in keys}):
            chosen = None
            for stream in ("image", "text"):
                for i, k in enumerate(keys):
                    if k == (layer, target, stream, "cond") and chosen is None:
                        chosen = i
            if chosen is None:
                continue
            for step in range(n_dist):
                xs = [float(values[p, chosen, step, metric]) for p in range(n_prompts)]
                m = sum(xs) / n_prompts
                if m == 0:
                    continue
                sd = math.sqrt(sum((x - m) ** 2 for x in xs) / n_prompts)
                cells.append(sd / abs(m))
        if cells:
            out[target] = sum(cells) / len(cells)
    return out


def main(out: Path) -> int:
    result = json.loads((out / "prompts" / "result.json").read_text())
    profiles = sorted((out / "profiles").glob("*/default-*/profile.ditscope"))
    if len(profiles) != 1:
        print(
            f"expected one default profile under {out / 'profiles'}, found {len(profiles)}", file=sys.stderr
        )
        return 2
    mine = independent_cov(profiles[0])
    worst = 0.0
    print(f"{result['model']}, {result['n_prompts']} prompts ({profiles[0]})")
    print("target  study CoV  independent  difference (points)")
    for t, c in result["cov"].items():
        diff = 100 * (c["cov"] - mine[t])
        worst = max(worst, abs(diff))
        print(f"{t.upper():6s}  {c['cov']:8.2%}  {mine[t]:11.2%}  {diff:+.4f}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study")))
