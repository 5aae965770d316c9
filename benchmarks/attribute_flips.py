"""Which samples a bench setting changes the attribute reading of, and by how much it moved their pixels.

    python benchmarks/attribute_flips.py runs/bench/peers39b/tiny-latte

For each setting of a zoo bench (its results.jsonl and stored samples), prints the samples whose reading
(shape, colour, size, position, background, motion; the class on tiny-dit) differs from the uncached
sample's, each with the largest pixel change in what the evaluator reads (a video's middle frame, an image).
A sample that flips under a change far below what other settings make sits on the evaluator's decision
boundary: the accuracy drop then measures which samples a setting happens to touch, not how much it degrades.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditscope import zoo
from ditscope.bench.runner import samples_file
from ditscope.files import load_images
from ditscope.zoo import evaluator


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a bench output folder (ditscope bench --out)")
    ap.add_argument("--max-objects", type=int, default=1, help="the bench's --max-objects")
    args = ap.parse_args()
    meta = json.loads((args.folder / "bench.json").read_text())
    rows = [json.loads(line) for line in (args.folder / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("skipped")]

    def samples(row):
        return load_images(samples_file(args.folder, row["key"])).float()

    uncached = samples(next(r for r in rows if r["label"] == "none"))
    video = uncached.dim() == 5
    class_conditional = zoo.load(meta["model"]).is_class_conditional
    scenes = evaluator.evaluation_scenes(len(uncached), meta["prompt_seed"], args.max_objects, video=video)
    net = evaluator.load_evaluator()

    def readings(images):
        return evaluator.sample_hits(net, images, scenes, class_conditional)

    def read_part(images):  # what the evaluator looks at
        return evaluator.middle_frame(images) if video else images

    base = readings(uncached)
    for row in rows:
        if row["label"] == "none":
            continue
        images = samples(row)
        hits = readings(images)
        flipped = [i for i in range(len(images)) if any(hits[k][i] != base[k][i] for k in base)]
        change = [float((read_part(images)[i] - read_part(uncached)[i]).abs().max()) for i in flipped]
        detail = ", ".join(f"{i} ({c:.3f})" for i, c in zip(flipped, change))
        print(f"{row['label']}: {len(flipped)} of {len(images)} flipped: {detail or '-'}")


if __name__ == "__main__":
    main()
