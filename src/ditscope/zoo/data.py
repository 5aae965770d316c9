"""Procedural training data for the zoo: coloured shapes with captions, deterministic by seed.

An image holds one or two objects on a plain background. Each object has a shape, a colour, a size
and a position; the caption names them all:

    "a small red circle at the top left and a large blue square at the bottom right on a grey background"

Positions are cells of a 3 x 3 grid. One object may sit in any cell; two objects sit in two different
corners (so they never overlap). The video variant moves one object in a direction over the frames:
"a small red circle moving right on a black background".

Rendering is numpy only: each shape is drawn at 4x resolution and averaged down (anti-aliased).
Pixel values are in [0, 1], arrays are (C, H, W) float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.1),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.1, 0.85),
    "cyan": (0.1, 0.85, 0.9),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "grey": (0.5, 0.5, 0.5), "white": (0.95, 0.95, 0.95)}
SIZES = {"small": 0.24, "large": 0.34}  # object diameter as a fraction of the image side
# 3 x 3 grid cells, row-major: caption phrase of each cell
CELLS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
CORNERS = (0, 2, 6, 8)
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
SUPERSAMPLE = 4
VIDEO_FRAMES = 8


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {CELLS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    direction: str | None = None  # video only

    def caption(self) -> str:
        if self.direction is not None:
            o = self.objects[0]
            return f"a {o.size} {o.color} {o.shape} moving {self.direction} on a {self.background} background"
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"


def sample_scene(rng: np.random.Generator, max_objects: int = 2) -> Scene:
    n = 1 if max_objects == 1 else int(rng.integers(1, max_objects + 1))
    cells = [int(rng.integers(9))] if n == 1 else [int(c) for c in rng.choice(CORNERS, size=n, replace=False)]
    objects = tuple(
        Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(SIZES))), c)
        for c in cells
    )
    return Scene(objects, str(rng.choice(list(BACKGROUNDS))))


def sample_video_scene(rng: np.random.Generator) -> Scene:
    obj = Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), "small", 4)
    return Scene((obj,), str(rng.choice(list(BACKGROUNDS))), str(rng.choice(list(DIRECTIONS))))


def _mask(shape: str, cy: float, cx: float, radius: float, n: int) -> np.ndarray:
    """Coverage of a shape centred at (cy, cx) (fractions of the side) on an n x n grid, supersampled."""
    m = n * SUPERSAMPLE
    ys, xs = (np.mgrid[0:m, 0:m] + 0.5) / m
    dy, dx = ys - cy, xs - cx
    if shape == "circle":
        inside = dy**2 + dx**2 <= radius**2
    elif shape == "square":
        r = radius * 0.886  # same area as the circle
        inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    elif shape == "triangle":  # upward, same bounding box as the circle
        top, bottom = cy - radius, cy + radius
        half_width = (dy + radius) / (2 * radius) * radius * 1.15
        inside = (ys >= top) & (ys <= bottom) & (np.abs(dx) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))


def cell_center(cell: int) -> tuple[float, float]:
    row, col = divmod(cell, 3)
    return (row + 0.5) / 3, (col + 0.5) / 3


def render(scene: Scene, size: int = 32, offsets: list[tuple[float, float]] | None = None) -> np.ndarray:
    """(3, size, size) float32 image of a scene; `offsets` shifts each object (fractions of the side)."""
    img = np.empty((3, size, size), np.float32)
    img[:] = np.asarray(BACKGROUNDS[scene.background], np.float32)[:, None, None]
    for i, obj in enumerate(scene.objects):
        cy, cx = cell_center(obj.cell)
        if offsets is not None:
            cy, cx = cy + offsets[i][0], cx + offsets[i][1]
        alpha = _mask(obj.shape, cy, cx, SIZES[obj.size] / 2, size)[None]
        img = img * (1 - alpha) + np.asarray(COLORS[obj.color], np.float32)[:, None, None] * alpha
    return img.astype(np.float32)


def render_video(scene: Scene, frames: int = VIDEO_FRAMES, size: int = 32, travel: float = 0.5) -> np.ndarray:
    """(frames, 3, size, size): the object crosses `travel` of the image in its direction."""
    dy, dx = DIRECTIONS[scene.direction]
    shifts = np.linspace(-travel / 2, travel / 2, frames)
    return np.stack([render(scene, size, [(dy * s, dx * s)]) for s in shifts])


def dataset(n: int, seed: int, size: int = 32, max_objects: int = 2) -> tuple[np.ndarray, list[Scene]]:
    """n images (n, 3, size, size) and their scenes; the same seed gives the same data."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, max_objects) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), scenes


def video_dataset(
    n: int, seed: int, frames: int = VIDEO_FRAMES, size: int = 32
) -> tuple[np.ndarray, list[Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [sample_video_scene(rng) for _ in range(n)]
    return np.stack([render_video(s, frames, size) for s in scenes]), scenes


def class_label(obj: Obj) -> int:
    """tiny-dit's class index: shape x colour."""
    return SHAPES.index(obj.shape) * len(COLORS) + list(COLORS).index(obj.color)


def class_name(label: int) -> str:
    shape, color = divmod(int(label), len(COLORS))
    return f"{list(COLORS)[color]} {SHAPES[shape]}"


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes (inverse of `Scene.caption`); ValueError if it is not one."""
    words = caption.strip().lower().rstrip(".")
    if " on a " not in words or not words.endswith(" background"):
        raise ValueError(f"not a zoo caption: {caption!r}")
    body, background = words.rsplit(" on a ", 1)
    background = background.removesuffix(" background")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}")
    if " moving " in body:
        desc, direction = body.split(" moving ")
        size, color, shape = desc.split()[1:4]
        return Scene((Obj(shape, color, size, 4),), background, direction)
    objects = []
    for part in body.split(" and "):
        tokens = part.split()
        size, color, shape = tokens[1:4]
        cell = CELLS.index(" ".join(tokens[4:]))
        if shape not in SHAPES or color not in COLORS or size not in SIZES:
            raise ValueError(f"unknown attribute in {part!r}")
        objects.append(Obj(shape, color, size, cell))
    return Scene(tuple(objects), background)
