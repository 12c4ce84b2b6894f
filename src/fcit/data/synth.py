"""FCIT-Synth: a procedurally generated stand-in for the 12 FCIT datasets and for a generic pre-training mixture.

The real benchmark needs a 7B LLaVA and about a million images. FCIT-Synth keeps what makes FCIT a continual-learning
problem while fitting a tiny LLaVA (ViT with 8-pixel patches on 48 x 48 images) trained on a CPU:

* every dataset mirrors one real dataset and its answer type (registry), so the same loaders and scorers apply;
* the 8 Task-related datasets are learnable from about a thousand samples: big high-contrast objects, a few classes
  per question, short answers;
* tasks share image families (CLEVR-Math and super-CLEVR use one scene generator; ArxivQA, FigureQA and DVQA are all
  charts; Flickr30k, AOKVQA and Grounding all use landscapes) but differ in questions and answer formats, so the
  same picture asks for a caption, a letter, a number or yes/no depending on the task: sequential tuning forgets;
* instructions end in LLaVA-1.5's two shared suffixes (``SHORT``, ``MC``), as the real datasets' do, so tasks are
  told apart by their questions only;
* captions are drawn per reference from a small grammar, so references disagree in wording as human ones do and
  CIDEr sits in its usual range;
* the base is pre-trained on two generic mixtures over the same image families (``fcit.pretrain``): descriptions
  in one register without any answer format, then instructions in every answer format of the benchmark
  (``INSTRUCT``) that never ask as one of the 12 tasks asks, so the base follows formats without knowing the tasks;
* a held-out split of that instruction mixture (``build_general``) is the general-ability benchmark, the analogue
  of MME and POPE: what a run keeps of the base's own abilities.

Everything is a pure function of ``SynthConfig``: each sample has its own seed (seed, dataset, split, index), so files
are byte-identical across runs and machines with the same Pillow, and the test split does not change with n_train.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fcit.config import SynthConfig
from fcit.data import registry
from fcit.errors import FcitError

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary. Fixed lists keep the whole text corpus small (the tokenizer is trained on it).

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (34, 160, 60),
    "blue": (35, 85, 215),
    "yellow": (245, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
COLOR_NAMES = list(COLORS)
SCENE_COLORS = ["red", "green", "blue", "yellow", "purple"]  # orange is too close to red/yellow on shaded solids
THING_COLORS = ["red", "blue", "yellow", "purple"]  # green would vanish on grass
COVER_COLORS = {**COLORS, "black": (30, 30, 35), "white": (245, 245, 240)}
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "arrow"]
STYLES = ["cartoon", "sketch", "painting", "embroidery", "graffiti"]
TRENDS = ["increasing", "decreasing", "constant", "peak", "valley"]
# Icons keep one colour per kind, as real IconQA icons do; counting then needs only coarse shape + colour.
ICONS = {"star": "yellow", "heart": "red", "circle": "blue", "triangle": "green", "square": "purple"}
ICON_NAMES = list(ICONS)
SOLIDS = ["cube", "sphere", "cone"]
SOLID_PLURALS = {"cube": "cubes", "sphere": "spheres", "cone": "cones"}
TITLES = [
    "CAT", "DOG", "SUN", "MOON", "STAR", "FISH", "BIRD", "TREE", "LAKE", "ROSE", "WIND", "FIRE",
    "SNOW", "GOLD", "RAIN", "SHIP", "KING", "WOLF", "BEAR", "LION", "FROG", "SAND", "LAMP", "ROAD",
]  # fmt: skip
SKY_THINGS = ["sun", "cloud"]
GROUND_THINGS = ["tree", "house", "car", "flower"]
COLORED_THINGS = {"house", "car", "flower"}
TABLE_ITEMS = ["PEN", "CUP", "HAT", "BAG", "MUG", "KEY", "CAN", "JAR"]
GRID_POS = [
    ["top left", "top", "top right"],
    ["left", "center", "right"],
    ["bottom left", "bottom", "bottom right"],
]
SLOT_PHRASES = ["on the left", "in the middle", "on the right"]
LETTERS = "ABCDE"

PRETRAIN_PROMPTS = [
    "Describe the image.",
    "Give a full description of the picture.",
    "Write down what the image shows.",
]

# The two instruction suffixes of LLaVA-1.5's training mixture, shared across datasets as the real FCIT files share
# them: multiple-choice sets end with MC, short-answer sets (words, numbers, titles, yes/no) with SHORT. Tasks are
# then told apart by their questions, not by a suffix of their own, so identity tokens overlap as on real data.
SHORT = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."
SUFFIX = {
    "ImageNet-R": SHORT,
    "ArxivQA": MC,
    "IconQA": MC,
    "CLEVR-Math": SHORT,
    "OCR-VQA": SHORT,
    "FigureQA": SHORT,
    "super-CLEVR": SHORT,
    "AOKVQA": MC,
    "DVQA": SHORT,
    "TabMWP": SHORT,
}
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."

# The seed of a dataset does not depend on the registry's order, so reordering it never changes the data.
DATASET_NAMES = [
    "ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k",
    "FigureQA", "super-CLEVR", "AOKVQA", "Grounding", "DVQA", "TabMWP",
]  # fmt: skip
_PRETRAIN_STREAM = 100
_CORPUS_STREAM = 200
_SPLITS = {"train": 0, "test": 1}

# ---------------------------------------------------------------------------------------------------------------
# Drawing. Everything is laid out in [0, 1] image coordinates, rendered at up to 4x, then box-downsampled: anti-aliased
# edges keep 12-pixel objects and 10-pixel letters legible at 48 x 48, and boxes do not depend on image_size.

RGB = tuple[int, int, int]


def _mix(c: RGB, other: RGB, t: float) -> RGB:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c, other))  # type: ignore[return-value]


def _lighter(c: RGB, t: float = 0.45) -> RGB:
    return _mix(c, (255, 255, 255), t)


def _darker(c: RGB, t: float = 0.35) -> RGB:
    return _mix(c, (0, 0, 0), t)


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


class _Canvas:
    def __init__(self, size: int, bg: RGB):
        self.size = size
        self.k = 4 if size <= 64 else 2 if size <= 160 else 1
        self.R = size * self.k
        self.img = Image.new("RGB", (self.R, self.R), bg)
        self.draw = ImageDraw.Draw(self.img)

    def px(self, v: float) -> int:
        return max(1, int(round(v * self.R)))

    def pts(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.R, y * self.R) for x, y in points]

    def box(self, x1: float, y1: float, x2: float, y2: float) -> list[float]:
        return [x1 * self.R, y1 * self.R, x2 * self.R, y2 * self.R]

    def rect(self, x1, y1, x2, y2, fill=None, outline=None, width=0.0):
        self.draw.rectangle(self.box(x1, y1, x2, y2), fill=fill, outline=outline, width=self.px(width) if width else 0)

    def ellipse(self, x1, y1, x2, y2, fill=None, outline=None, width=0.0):
        self.draw.ellipse(self.box(x1, y1, x2, y2), fill=fill, outline=outline, width=self.px(width) if width else 0)

    def polygon(self, points, fill=None, outline=None, width=0.0):
        self.draw.polygon(self.pts(points), fill=fill, outline=outline, width=self.px(width) if width else 0)

    def line(self, points, fill, width):
        self.draw.line(self.pts(points), fill=fill, width=self.px(width), joint="curve")

    def paste_inside(self, points, layer: Image.Image):
        mask = Image.new("L", self.img.size, 0)
        ImageDraw.Draw(mask).polygon(self.pts(points), fill=255)
        self.img.paste(layer, (0, 0), mask)

    def text(self, s: str, cx: float, cy: float, height: float, fill: RGB, max_width: float = 1.0, bold: float = 0.0):
        px = self.px(height)
        while px > 4 and _font(px).getlength(s) > max_width * self.R:
            px -= 1
        stroke = int(round(bold * px))
        self.draw.text((cx * self.R, cy * self.R), s, font=_font(px), fill=fill, anchor="mm",
                       stroke_width=stroke, stroke_fill=fill)  # fmt: skip

    def finish(self) -> Image.Image:
        return self.img.reduce(self.k) if self.k > 1 else self.img


@lru_cache(maxsize=None)
def _unit_shape(shape: str) -> tuple[tuple[float, float], ...]:
    """Polygon of ``shape`` inside [-1, 1]^2 (y down), visually centred."""
    if shape == "circle":
        return tuple((math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 48, endpoint=False))
    if shape == "square":
        return ((-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82))
    if shape == "triangle":
        return ((0.0, -0.95), (1.0, 0.8), (-1.0, 0.8))
    if shape == "star":
        return tuple(
            ((1.0 if j % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + j * math.pi / 5),
             (1.0 if j % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + j * math.pi / 5) + 0.1)
            for j in range(10)
        )  # fmt: skip
    if shape == "cross":
        a = 0.32
        return ((-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
                (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a))  # fmt: skip
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        return tuple(
            (16 * math.sin(t) ** 3 / 17,
             -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17 - 0.15)
            for t in ts
        )  # fmt: skip
    if shape == "diamond":
        return ((0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0))
    if shape == "arrow":
        return ((-1, -0.3), (0.15, -0.3), (0.15, -0.8), (1, 0), (0.15, 0.8), (0.15, 0.3), (-1, 0.3))
    raise ValueError(shape)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return [(cx + x * r, cy + y * r) for x, y in _unit_shape(shape)]


def _add_noise(img: Image.Image, rng: np.random.Generator, sd: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16) + np.round(rng.normal(0, sd, (img.height, img.width, 3))).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _rgb(rng: np.random.Generator, lo: int, hi: int) -> RGB:
    return tuple(int(v) for v in rng.integers(lo, hi + 1, 3))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, items: list, k: Optional[int] = None):
    """One item, or k distinct items in random order (never depends on set/dict iteration order)."""
    if k is None:
        return items[int(rng.integers(len(items)))]
    return [items[int(j)] for j in rng.permutation(len(items))[:k]]


def _unif(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ---------------------------------------------------------------------------------------------------------------
# Image families. Each has a spec (all the random choices), a drawing and a pre-training description; datasets only
# add a question and an answer on top of a family's spec.

# -- one big object in a rendition style (ImageNet-R) ------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    style: str
    color: str
    cx: float
    cy: float
    r: float
    bg: RGB


def sample_object(rng: np.random.Generator) -> ObjectSpec:
    return ObjectSpec(
        shape=_pick(rng, SHAPES), style=_pick(rng, STYLES), color=_pick(rng, COLOR_NAMES),
        cx=_unif(rng, 0.42, 0.58), cy=_unif(rng, 0.42, 0.58), r=_unif(rng, 0.3, 0.38), bg=_rgb(rng, 200, 250),
    )  # fmt: skip


def draw_object(s: ObjectSpec, size: int, rng: np.random.Generator) -> Image.Image:
    c = COLORS[s.color]
    pts = _shape_points(s.shape, s.cx, s.cy, s.r)
    if s.style == "sketch":
        cv = _Canvas(size, (246, 244, 238))
        for dx, dy in ((0.0, 0.0), (0.012, 0.01)):  # a doubled pencil stroke
            cv.polygon([(x + dx, y + dy) for x, y in pts], outline=_darker(c, 0.2), width=0.035)
        return cv.finish()
    if s.style == "embroidery":
        cv = _Canvas(size, (232, 222, 200))
        for t in np.arange(0.0, 1.0, 0.0625):  # canvas weave
            cv.line([(t, 0), (t, 1)], (218, 206, 182), 0.008)
            cv.line([(0, t), (1, t)], (218, 206, 182), 0.008)
        layer = Image.new("RGB", cv.img.size, _lighter(c, 0.7))
        d = ImageDraw.Draw(layer)
        step, rad = 0.075 * cv.R, 0.027 * cv.R
        for y in np.arange(step / 2, cv.R, step):
            for x in np.arange(step / 2, cv.R, step):
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=c)
        cv.paste_inside(pts, layer)
        cv.polygon(pts, outline=_darker(c), width=0.02)
        return cv.finish()
    if s.style == "graffiti":
        cv = _Canvas(size, (150, 146, 140))
        for j, y in enumerate(np.arange(0.0, 1.0, 0.125)):  # brick wall
            cv.line([(0, y), (1, y)], (120, 116, 110), 0.012)
            for x in np.arange(0.0625 * (j % 2), 1.0, 0.25):
                cv.line([(x, y), (x, y + 0.125)], (120, 116, 110), 0.012)
        layer = Image.new("RGB", cv.img.size, _lighter(c, 0.55))
        d = ImageDraw.Draw(layer)
        step = int(0.1 * cv.R)
        for x in range(-cv.R, 2 * cv.R, step):
            d.line([(x, 0), (x + cv.R, cv.R)], fill=c, width=step // 2)
        cv.paste_inside(pts, layer)
        cv.polygon(pts, outline=(20, 20, 20), width=0.03)
        return cv.finish()
    cv = _Canvas(size, s.bg)
    if s.style == "cartoon":
        cv.polygon(pts, fill=c, outline=(15, 15, 15), width=0.035)
        return cv.finish()
    # painting: a solid blob under visible brush noise
    cv.polygon(pts, fill=c)
    return _add_noise(cv.finish(), rng, 16.0)


def describe_object(s: ObjectSpec) -> str:
    return f"{_a(s.style)} picture of {_a(s.color)} {s.shape} in the middle of the image."


# -- line chart (ArxivQA) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineSpec:
    trend: str
    color: str
    ys: tuple[float, ...]  # values in [0, 1], left to right


def sample_line(rng: np.random.Generator) -> LineSpec:
    trend = _pick(rng, TRENDS)
    t = np.linspace(0, 1, 6)
    lo, hi = _unif(rng, 0.05, 0.3), _unif(rng, 0.7, 0.95)
    if trend == "increasing":
        ys = lo + (hi - lo) * t
    elif trend == "decreasing":
        ys = hi - (hi - lo) * t
    elif trend == "constant":
        ys = np.full(6, _unif(rng, 0.3, 0.7))
    else:
        top = _pick(rng, [2, 3])  # the turning point is in the middle
        tri = 1 - np.abs(np.arange(6) - top) / max(top, 5 - top)
        ys = lo + (hi - lo) * (tri if trend == "peak" else 1 - tri)
    ys = np.clip(ys + rng.normal(0, 0.02, 6), 0.0, 1.0)
    return LineSpec(trend, _pick(rng, COLOR_NAMES), tuple(round(float(y), 4) for y in ys))


def _axes(cv: _Canvas, x0: float, y0: float, x1: float, y1: float, grid: int = 3):
    for j in range(1, grid + 1):
        y = y1 - (y1 - y0) * j / grid
        cv.line([(x0, y), (x1, y)], (222, 222, 228), 0.012)
    cv.line([(x0, y0), (x0, y1), (x1, y1)], (60, 60, 60), 0.022)


def draw_line(s: LineSpec, size: int, rng: np.random.Generator) -> Image.Image:
    cv = _Canvas(size, (255, 255, 255))
    x0, y0, x1, y1 = 0.14, 0.08, 0.94, 0.86
    _axes(cv, x0, y0, x1, y1)
    pts = [(x0 + 0.06 + (x1 - x0 - 0.12) * j / 5, y1 - 0.05 - (y1 - y0 - 0.1) * y) for j, y in enumerate(s.ys)]
    c = COLORS[s.color]
    cv.line(pts, c, 0.055)
    for x, y in pts:
        cv.ellipse(x - 0.035, y - 0.035, x + 0.035, y + 0.035, fill=_darker(c, 0.3))
    return cv.finish()


def describe_line(s: LineSpec) -> str:
    shape = {
        "increasing": "it goes up from left to right",
        "decreasing": "it goes down from left to right",
        "constant": "it stays flat from left to right",
        "peak": "it goes up to a peak in the middle and then down",
        "valley": "it goes down to a valley in the middle and then up",
    }[s.trend]
    return f"a line chart with one {s.color} line. the trend of the line is {s.trend}: {shape}."


# -- icon grid (IconQA) ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IconSpec:
    cells: tuple[Optional[str], ...]  # 9 cells, row-major; None = empty
    counts: tuple[tuple[str, int], ...]  # most frequent first


def sample_icons(rng: np.random.Generator) -> IconSpec:
    while True:
        kinds = _pick(rng, ICON_NAMES, int(rng.integers(2, 4)))
        counts = [int(rng.integers(1, 5)) for _ in kinds]
        top = sorted(counts, reverse=True)
        if sum(counts) <= 9 and top[0] > top[1]:  # a unique answer to "most often"
            break
    slots = rng.permutation(9)
    cells: list[Optional[str]] = [None] * 9
    j = 0
    for kind, n in zip(kinds, counts):
        for _ in range(n):
            cells[int(slots[j])] = kind
            j += 1
    order = sorted(range(len(kinds)), key=lambda q: (-counts[q], q))
    return IconSpec(tuple(cells), tuple((kinds[q], counts[q]) for q in order))


def draw_icons(s: IconSpec, size: int, rng: np.random.Generator) -> Image.Image:
    cv = _Canvas(size, (250, 250, 244))
    for j in (1, 2):
        cv.line([(j / 3, 0), (j / 3, 1)], (205, 205, 200), 0.01)
        cv.line([(0, j / 3), (1, j / 3)], (205, 205, 200), 0.01)
    for idx, kind in enumerate(s.cells):
        if kind is None:
            continue
        cx, cy = (idx % 3 + 0.5) / 3, (idx // 3 + 0.5) / 3
        c = COLORS[ICONS[kind]]
        cv.polygon(_shape_points(kind, cx, cy, 0.135), fill=c, outline=_darker(c, 0.45), width=0.012)
    return cv.finish()


def describe_icons(s: IconSpec) -> str:
    parts = [f"{NUM_WORDS[n]} {_plural(k, n)}" for k, n in s.counts]
    return f"a grid of icons with {_join(parts)}. there are more {s.counts[0][0]}s than any other icon."


# -- CLEVR-like scene (CLEVR-Math, super-CLEVR) ------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObj:
    color: str
    shape: str
    cell: int  # 0..8 on a 3 x 3 grid, row-major
    cx: float
    cy: float


@dataclass(frozen=True)
class SceneSpec:
    objs: tuple[SceneObj, ...]  # in reading order
    bg: int


def sample_scene(rng: np.random.Generator) -> SceneSpec:
    n = int(rng.integers(2, 6))
    cells = sorted(int(c) for c in rng.permutation(9)[:n])
    objs = tuple(
        SceneObj(_pick(rng, SCENE_COLORS), _pick(rng, SOLIDS), c,
                 (c % 3 + 0.5) / 3 + _unif(rng, -0.035, 0.035), (c // 3 + 0.5) / 3 + _unif(rng, -0.03, 0.03))
        for c in cells
    )  # fmt: skip
    return SceneSpec(objs, int(rng.integers(150, 185)))


def _draw_solid(cv: _Canvas, o: SceneObj, s: float = 0.125):
    c = COLORS[o.color]
    cx, cy = o.cx, o.cy
    shadow = _darker(cv.img.getpixel((cv.px(cx), cv.px(cy + s * 0.9))), 0.18)
    cv.ellipse(cx - s * 0.95, cy + s * 0.6, cx + s * 1.15, cy + s * 1.15, fill=shadow)
    if o.shape == "cube":
        d = 0.35 * s
        top = [(cx - s, cy - s + d), (cx - s + d, cy - s), (cx + s, cy - s), (cx + s - d, cy - s + d)]
        side = [(cx + s - d, cy - s + d), (cx + s, cy - s), (cx + s, cy + s - d), (cx + s - d, cy + s)]
        cv.polygon(top, fill=_lighter(c, 0.35))
        cv.polygon(side, fill=_darker(c, 0.35))
        cv.rect(cx - s, cy - s + d, cx + s - d, cy + s, fill=c)
    elif o.shape == "sphere":
        cv.ellipse(cx - s, cy - s, cx + s, cy + s, fill=_darker(c, 0.2))
        cv.ellipse(cx - s * 0.9, cy - s * 0.95, cx + s * 0.75, cy + s * 0.7, fill=c)
        cv.ellipse(cx - s * 0.55, cy - s * 0.6, cx - s * 0.1, cy - s * 0.15, fill=_lighter(c, 0.55))
    else:  # cone
        cv.ellipse(cx - s, cy + s * 0.6, cx + s, cy + s * 1.05, fill=_darker(c, 0.3))
        cv.polygon([(cx, cy - s * 1.05), (cx + s, cy + s * 0.82), (cx - s, cy + s * 0.82)], fill=c)
        cv.polygon([(cx, cy - s * 1.05), (cx + s, cy + s * 0.82), (cx + s * 0.25, cy + s * 0.9)], fill=_darker(c, 0.25))


def draw_scene(s: SceneSpec, size: int, rng: np.random.Generator) -> Image.Image:
    cv = _Canvas(size, (s.bg, s.bg, s.bg + 4))
    for j in range(16):  # floor lit from the back
        g = s.bg + 14 - j * 2
        cv.rect(0, j / 16, 1, (j + 1) / 16, fill=(g, g, g + 4))
    for o in s.objs:
        _draw_solid(cv, o)
    return cv.finish()


def describe_scene(s: SceneSpec) -> str:
    parts = [f"{_a(o.color)} {o.shape} at the {GRID_POS[o.cell // 3][o.cell % 3]}" for o in s.objs]
    return f"a scene with {NUM_WORDS[len(s.objs)]} objects: {_join(parts)}."


# -- book cover (OCR-VQA) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BookSpec:
    title: str
    cover: str
    cy: float


def sample_book(rng: np.random.Generator) -> BookSpec:
    return BookSpec(_pick(rng, TITLES), _pick(rng, list(COVER_COLORS)), _unif(rng, 0.36, 0.5))


def _ink(cover: str) -> str:
    return "black" if cover in ("yellow", "orange", "white") else "white"


def draw_book(s: BookSpec, size: int, rng: np.random.Generator) -> Image.Image:
    bg = COVER_COLORS[s.cover]
    ink = COVER_COLORS[_ink(s.cover)]
    cv = _Canvas(size, bg)
    cv.rect(0, 0, 0.1, 1, fill=_darker(bg, 0.3) if s.cover != "black" else (70, 70, 75))  # spine
    cv.rect(0.15, 0.05, 0.95, 0.95, outline=_mix(bg, ink, 0.5), width=0.015)
    cv.text(s.title, 0.55, s.cy, 0.34, ink, max_width=0.76, bold=0.06)
    cv.rect(0.35, 0.8, 0.75, 0.84, fill=_mix(bg, ink, 0.55))  # author line
    return cv.finish()


def describe_book(s: BookSpec) -> str:
    return f"a {s.cover} book cover with the title {s.title} written in big {_ink(s.cover)} letters."


# -- landscape (Flickr30k, AOKVQA, Grounding) --------------------------------------------------------------------


@dataclass(frozen=True)
class Thing:
    kind: str
    color: Optional[str]  # only for COLORED_THINGS
    slot: int  # 0 left, 1 middle, 2 right
    box: tuple[float, float, float, float]  # tight box in [0, 1]

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.kind}" if self.color else self.kind

    @property
    def noun_phrase(self) -> str:
        return {"sun": "the sun", "cloud": "a white cloud"}.get(self.kind) or _a(self.phrase)


@dataclass(frozen=True)
class LandscapeSpec:
    sky: Optional[Thing]
    ground: tuple[Thing, ...]  # left to right
    horizon: float
    grass: RGB
    air: RGB

    @property
    def things(self) -> tuple[Thing, ...]:
        return ((self.sky,) if self.sky else ()) + self.ground


_THING_SIZE = {"sun": (0.22, 0.22), "cloud": (0.34, 0.16), "tree": (0.28, 0.46), "house": (0.3, 0.34),
               "car": (0.36, 0.2), "flower": (0.17, 0.3)}  # fmt: skip


def _thing(rng: np.random.Generator, kind: str, slot: int) -> Thing:
    w, h = _THING_SIZE[kind]
    k = _unif(rng, 0.9, 1.1)
    w, h = w * k, h * k
    cx = (0.2, 0.5, 0.8)[slot] + _unif(rng, -0.03, 0.03)
    if kind in SKY_THINGS:
        cy = _unif(rng, 0.15, 0.2)
        y1, y2 = cy - h / 2, cy + h / 2
    else:
        y2 = _unif(rng, 0.86, 0.93)
        y1 = y2 - h
    box = (cx - w / 2, y1, cx + w / 2, y2)
    color = _pick(rng, THING_COLORS) if kind in COLORED_THINGS else None
    return Thing(kind, color, slot, tuple(round(v, 4) for v in box))  # type: ignore[arg-type]


def sample_landscape(rng: np.random.Generator) -> LandscapeSpec:
    sky_kind = _pick(rng, ["sun", "cloud", "sun", "cloud", None])
    sky = _thing(rng, sky_kind, int(rng.integers(3))) if sky_kind else None
    kinds = _pick(rng, GROUND_THINGS, int(rng.integers(1, 3)))
    slots = sorted(int(v) for v in rng.permutation(3)[: len(kinds)])
    ground = tuple(_thing(rng, k, sl) for k, sl in zip(kinds, slots))
    grass = (int(rng.integers(115, 150)), int(rng.integers(185, 205)), 90)
    air = (int(rng.integers(145, 175)), int(rng.integers(200, 220)), 248)
    return LandscapeSpec(sky, ground, _unif(rng, 0.5, 0.58), grass, air)


def _draw_thing(cv: _Canvas, t: Thing):
    x1, y1, x2, y2 = t.box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2
    outline = (40, 40, 40)
    if t.kind == "sun":
        cv.ellipse(x1, y1, x2, y2, fill=(250, 210, 40), outline=(235, 140, 20), width=0.02)
    elif t.kind == "cloud":
        for e in ((0, 0.35, 0.5, 1), (0.5, 0.3, 1, 1), (0.2, 0, 0.78, 1)):
            cv.ellipse(x1 + e[0] * w, y1 + e[1] * h, x1 + e[2] * w, y1 + e[3] * h, fill=(252, 252, 252))
    elif t.kind == "tree":
        cv.rect(cx - 0.12 * w, y1 + 0.55 * h, cx + 0.12 * w, y2, fill=(110, 70, 35))
        cv.ellipse(x1, y1, x2, y1 + 0.7 * h, fill=(25, 105, 35), outline=(15, 60, 20), width=0.015)
    elif t.kind == "house":
        c = COLORS[t.color]  # type: ignore[index]
        cv.rect(x1 + 0.08 * w, y1 + 0.42 * h, x2 - 0.08 * w, y2, fill=c, outline=outline, width=0.012)
        roof = [(x1, y1 + 0.45 * h), (cx, y1), (x2, y1 + 0.45 * h)]
        cv.polygon(roof, fill=(85, 60, 55), outline=outline, width=0.012)
        cv.rect(cx - 0.12 * w, y1 + 0.68 * h, cx + 0.12 * w, y2, fill=(70, 45, 30))
    elif t.kind == "car":
        c = COLORS[t.color]  # type: ignore[index]
        yb = y1 + 0.45 * h
        cabin = [(x1 + 0.22 * w, yb), (x1 + 0.32 * w, y1), (x2 - 0.3 * w, y1), (x2 - 0.18 * w, yb)]
        cv.polygon(cabin, fill=_lighter(c, 0.15), outline=outline, width=0.01)
        cv.rect(x1, y1 + 0.42 * h, x2, y2 - 0.2 * h, fill=c, outline=outline, width=0.012)
        r = 0.22 * h
        for wx in (x1 + 0.25 * w, x2 - 0.25 * w):
            cv.ellipse(wx - r, y2 - 2 * r, wx + r, y2, fill=(25, 25, 25))
    elif t.kind == "flower":
        c = COLORS[t.color]  # type: ignore[index]
        cv.line([(cx, y1 + 0.4 * h), (cx, y2)], (30, 110, 40), 0.03)
        cv.ellipse(x1, y1, x2, y1 + w, fill=c, outline=_darker(c), width=0.01)
        cv.ellipse(cx - 0.18 * w, y1 + 0.32 * w, cx + 0.18 * w, y1 + 0.68 * w, fill=(250, 230, 60))


def draw_landscape(s: LandscapeSpec, size: int, rng: np.random.Generator) -> Image.Image:
    cv = _Canvas(size, s.air)
    cv.rect(0, s.horizon, 1, 1, fill=s.grass)
    for t in s.things:
        _draw_thing(cv, t)
    return cv.finish()


def describe_landscape(s: LandscapeSpec) -> str:
    if s.sky:
        sky = f"{s.sky.noun_phrase} in the sky {SLOT_PHRASES[s.sky.slot]}"
    else:
        sky = "a clear blue sky"
    ground = [f"{_a(t.phrase)} {SLOT_PHRASES[t.slot]}" for t in s.ground]
    return f"a landscape with {sky}, above green grass. on the grass: {_join(ground)}."


# -- bar chart (FigureQA), and bar chart with value labels (DVQA) ------------------------------------------------


@dataclass(frozen=True)
class BarSpec:
    colors: tuple[str, ...]  # left to right
    values: tuple[int, ...]
    labelled: bool


def sample_bars(rng: np.random.Generator, labelled: bool = False) -> BarSpec:
    # FigureQA's bars differ by at least 3 of 10: "is X the maximum?" then turns on whether X's bar is tall, which
    # the tiny model can see; with 2-unit gaps over 3-4 bars it never learned the comparison (v3: MTL at chance).
    n = 3
    lo, hi, gap = (1, 9, 1) if labelled else (1, 10, 3)
    while True:
        values = [int(v) for v in rng.integers(lo, hi + 1, n)]
        srt = sorted(values)
        if all(b - a >= gap for a, b in zip(srt, srt[1:])):
            break
    return BarSpec(tuple(_pick(rng, COLOR_NAMES, n)), tuple(values), labelled)


def draw_bars(s: BarSpec, size: int, rng: np.random.Generator) -> Image.Image:
    n = len(s.values)
    if s.labelled:
        cv = _Canvas(size, (236, 238, 244))
        x0, y0, x1, y1, vmax = 0.1, 0.06, 0.96, 0.92, 9
    else:
        cv = _Canvas(size, (255, 255, 255))
        x0, y0, x1, y1, vmax = 0.12, 0.06, 0.94, 0.9, 10
    _axes(cv, x0, y0, x1, y1, grid=3 if s.labelled else 2)
    slot = (x1 - x0 - 0.04) / n
    top = y0 + (0.2 if s.labelled else 0.02)  # room for the labels above the highest bar
    for j, (c, v) in enumerate(zip(s.colors, s.values)):
        bx = x0 + 0.04 + slot * j
        by = y1 - (y1 - top) * v / vmax
        rgb = COLORS[c]
        cv.rect(bx + slot * 0.14, by, bx + slot * 0.86, y1 - 0.01, fill=rgb, outline=_darker(rgb, 0.4), width=0.008)
        if s.labelled:
            cv.text(str(v), bx + slot / 2, by - 0.09, 0.2, (20, 20, 20), bold=0.05)
    return cv.finish()


def describe_bars(s: BarSpec) -> str:
    parts = [f"{c} bar {NUM_WORDS[v]}" for c, v in zip(s.colors, s.values)]
    hi = s.colors[int(np.argmax(s.values))]
    lo = s.colors[int(np.argmin(s.values))]
    if s.labelled:
        return f"a bar chart with {NUM_WORDS[len(s.values)]} labelled bars. from left to right the labels read: " + (
            _join(parts) + "."
        )
    return (f"a bar chart with {NUM_WORDS[len(s.values)]} bars. from left to right the heights are: {_join(parts)}. "
            f"the {hi} bar is the highest and the {lo} bar is the lowest.")  # fmt: skip


# -- table (TabMWP) ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    items: tuple[str, ...]
    values: tuple[int, ...]


def sample_table(rng: np.random.Generator) -> TableSpec:
    n = int(rng.integers(2, 4))
    values = [int(v) + 1 for v in rng.permutation(9)[:n]]  # distinct, so "how many more" always has a sign
    return TableSpec(tuple(_pick(rng, TABLE_ITEMS, n)), tuple(values))


def draw_table(s: TableSpec, size: int, rng: np.random.Generator) -> Image.Image:
    cv = _Canvas(size, (255, 255, 255))
    n = len(s.items)
    x0, y0, x1, y1, xm = 0.04, 0.04, 0.96, 0.96, 0.66
    cv.rect(x0, y0, xm, y1, fill=(225, 235, 250))
    rh = (y1 - y0) / n
    for j, (item, v) in enumerate(zip(s.items, s.values)):
        cy = y0 + rh * (j + 0.5)
        cv.text(item, (x0 + xm) / 2, cy, 0.24, (15, 15, 15), max_width=xm - x0 - 0.06, bold=0.05)
        cv.text(str(v), (xm + x1) / 2, cy, 0.26, (15, 15, 15), bold=0.05)
        if j:
            cv.line([(x0, y0 + rh * j), (x1, y0 + rh * j)], (40, 40, 40), 0.015)
    cv.rect(x0, y0, x1, y1, outline=(40, 40, 40), width=0.02)
    cv.line([(xm, y0), (xm, y1)], (40, 40, 40), 0.015)
    return cv.finish()


def describe_table(s: TableSpec) -> str:
    rows = [f"{item} {NUM_WORDS[v]}" for item, v in zip(s.items, s.values)]
    return f"a table with {NUM_WORDS[len(s.items)]} rows. from top to bottom: {_join(rows)}."


@dataclass(frozen=True)
class Family:
    sample: Callable[[np.random.Generator], Any]
    draw: Callable[[Any, int, np.random.Generator], Image.Image]
    describe: Callable[[Any], str]


FAMILIES: dict[str, Family] = {
    "object": Family(sample_object, draw_object, describe_object),
    "line": Family(sample_line, draw_line, describe_line),
    "icons": Family(sample_icons, draw_icons, describe_icons),
    "scene": Family(sample_scene, draw_scene, describe_scene),
    "book": Family(sample_book, draw_book, describe_book),
    "landscape": Family(sample_landscape, draw_landscape, describe_landscape),
    "bars": Family(sample_bars, draw_bars, describe_bars),
    "labelled_bars": Family(lambda rng: sample_bars(rng, labelled=True), draw_bars, describe_bars),
    "table": Family(sample_table, draw_table, describe_table),
}

# ---------------------------------------------------------------------------------------------------------------
# Datasets: a family plus a question/answer maker. A maker returns (question text without <image>, answer, refs,
# extra test fields); refs holds every reference answer (only captions have more than one).

QA = tuple[str, str, list[str], dict[str, Any]]


def _options(rng: np.random.Generator, answer: str, pool: list[str], k: int) -> tuple[list[str], str]:
    opts = [answer] + _pick(rng, [p for p in pool if p != answer], k - 1)
    opts = [opts[int(j)] for j in rng.permutation(k)]
    return opts, LETTERS[opts.index(answer)]


def qa_imagenet_r(s: ObjectSpec, rng, i) -> QA:
    q = f"What object is shown in this {s.style} picture?\n{SUFFIX['ImageNet-R']}"
    return q, s.shape, [s.shape], {}


def qa_arxivqa(s: LineSpec, rng, i) -> QA:
    # Every trend is an option, always in the same order: the letter is read off the plot, so FFN-only LoRA on a
    # tiny model can learn it (shuffled options need an in-context lookup its frozen attention never learned).
    opts, letter = list(TRENDS), LETTERS[TRENDS.index(s.trend)]
    stem = _pick(rng, ["Which trend does the line in this figure show?",
                       "How does the plotted value change along the x axis?"])  # fmt: skip
    body = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(opts))
    return f"{stem}\nOptions:\n{body}\n{SUFFIX['ArxivQA']}", letter, [letter], {}


def qa_iconqa(s: IconSpec, rng, i) -> QA:
    opts, letter = list(ICON_NAMES), LETTERS[ICON_NAMES.index(s.counts[0][0])]  # fixed order, as in ArxivQA
    # The multiple-choice layout of ArxivQA and AOKVQA (LLaVA-1.5's), with a question stem close to ArxivQA's
    body = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(opts))
    q = f"Which icon appears most often in this figure?\nOptions:\n{body}\n{SUFFIX['IconQA']}"
    return q, letter, [letter], {}


def qa_clevr_math(s: SceneSpec, rng, i) -> QA:
    n = len(s.objs)
    kind = int(rng.integers(2))  # subtract a colour or a shape; "add k" needed arithmetic on the question's digits
    present = rng.random() < 0.8  # mostly subtract something that is there, sometimes nothing
    if kind == 0:
        color = _pick(rng, [o.color for o in s.objs] if present else SCENE_COLORS)
        q = f"Subtract all {color} objects. How many objects are left?"
        ans = n - sum(o.color == color for o in s.objs)
    elif kind == 1:
        shape = _pick(rng, [o.shape for o in s.objs] if present else SOLIDS)
        q = f"Subtract all {SOLID_PLURALS[shape]}. How many objects are left?"
        ans = n - sum(o.shape == shape for o in s.objs)
    else:
        k = int(rng.integers(1, 3))
        color, shape = _pick(rng, SCENE_COLORS), _pick(rng, SOLIDS)
        q = f"Add {k} {color} {shape if k == 1 else SOLID_PLURALS[shape]}. How many objects exist?"
        ans = n + k
    return f"{q}\n{SUFFIX['CLEVR-Math']}", str(ans), [str(ans)], {}


def _unique(values: list[str]) -> list[str]:
    return [v for v in dict.fromkeys(values) if values.count(v) == 1]


def _attribute_qa(s: SceneSpec, rng, color_q: str, shape_q: str) -> QA:
    """super-CLEVR's question about a unique object's colour (``color_q`` names its shape) or shape (``shape_q``
    names its colour); the versions differ in the phrasing only, so they make the same draws and answers."""
    colors, shapes = _unique([o.color for o in s.objs]), _unique([o.shape for o in s.objs])
    ask_color = bool(shapes) and (not colors or rng.random() < 0.5)
    if ask_color:
        shape = _pick(rng, shapes)
        q, ans = color_q.format(shape), next(o.color for o in s.objs if o.shape == shape)
    else:
        color = _pick(rng, colors)
        q, ans = shape_q.format(color), next(o.shape for o in s.objs if o.color == color)
    return f"{q}\n{SUFFIX['super-CLEVR']}", ans, [ans], {}


def qa_super_clevr(s: SceneSpec, rng, i) -> QA:
    return _attribute_qa(s, rng, "What color is the {}?", "What shape is the {} object?")


# v5: LLaVA-1.5's ImageNet-R instruction is one fixed question, and the scene questions name "the image" as it does,
# so ImageNet-R's and super-CLEVR's identity tokens meet at a cosine of 0.80 (v4: 0.69 at most between any two
# tasks), as tasks written in one style do on real data, still below DISCO's tau of 0.9.
def qa_imagenet_r_v5(s: ObjectSpec, rng, i) -> QA:
    return f"What is the object in the image?\n{SUFFIX['ImageNet-R']}", s.shape, [s.shape], {}


def qa_super_clevr_v5(s: SceneSpec, rng, i) -> QA:
    return _attribute_qa(s, rng, "What color is the {} in the image?",
                         "What is the shape of the {} object in the image?")


def _super_clevr_ok(s: SceneSpec) -> bool:
    return bool(_unique([o.color for o in s.objs]) or _unique([o.shape for o in s.objs]))


OCR_TITLES = TITLES[:12]  # the pre-training mixture shows all 24; the task reads 12 of them


def _ocr_ok(s: BookSpec) -> bool:
    return s.title in OCR_TITLES


def qa_ocrvqa(s: BookSpec, rng, i) -> QA:
    return f"What is the title of this book?\n{SUFFIX['OCR-VQA']}", s.title, [s.title], {}


# Captions are drawn from a small grammar (several phrasings of each thing, the setting and the sky, and several
# sentence shapes), one draw per reference: like human references, they agree on the content but not on the words,
# so CIDEr lands in its usual range (v3's near-identical paraphrases gave CIDEr x100 of 400-600).
_CAPTION_NOUN = {
    "house": ["house", "home", "cottage", "building"],
    "car": ["car", "vehicle", "automobile"],
    "flower": ["flower", "blossom", "bloom"],
    "tree": ["tree", "oak", "green tree", "leafy tree"],
}
_CAPTION_ADJ = ["small", "little", "tall", "single", "lonely"]
_CAPTION_SETTING = ["in a green field", "on the grass", "in a grassy meadow", "on a green lawn", "in the countryside",
                    "outdoors", "in a park"]  # fmt: skip
_CAPTION_SCENE = ["a green field", "a grassy meadow", "a quiet countryside scene", "a wide green lawn", "a park"]
_CAPTION_SKY = {
    "sun": ["on a sunny day", "under the bright sun", "with the sun shining above", "in the sunshine"],
    "cloud": ["under a cloudy sky", "beneath a white cloud", "with a cloud in the sky", "on an overcast day"],
    None: ["under a clear sky", "under a blue sky", "on a clear day"],
}


def _caption_thing(t: Thing, rng: np.random.Generator) -> str:
    noun = _pick(rng, _CAPTION_NOUN[t.kind])
    if t.color and rng.random() < 0.75:  # people leave out details: the colour is not always said
        return _a(f"{t.color} {noun}") if rng.random() < 0.7 else f"{_a(noun)} painted {t.color}"
    return _a(f"{_pick(rng, _CAPTION_ADJ)} {noun}") if rng.random() < 0.4 else _a(noun)


def caption(s: LandscapeSpec, rng: np.random.Generator) -> str:
    """One reference caption of a landscape (at most 20 words), drawn from the grammar above."""
    ground = list(s.ground)
    if len(ground) == 2 and rng.random() < 0.25:  # and not always every thing
        ground = [ground[int(rng.integers(2))]]
    g = [_caption_thing(t, rng) for t in ground]
    if len(g) == 2 and rng.random() < 0.5:
        g = g[::-1]
    things = _join(g)
    sky = _pick(rng, _CAPTION_SKY[s.sky and s.sky.kind]) if rng.random() < 0.7 else ""
    shapes = [f"{things} {_pick(rng, _CAPTION_SETTING)} {sky}", f"{things} {sky}",
              f"there is {things} {_pick(rng, _CAPTION_SETTING)}", f"{_pick(rng, _CAPTION_SCENE)} with {things}",
              f"a view of {things} {_pick(rng, _CAPTION_SETTING)}"]  # fmt: skip
    if len(g) == 2:
        shapes.append(f"{g[0]} next to {g[1]} {sky}")
    text = " ".join(_pick(rng, shapes).split())
    return text[0].upper() + text[1:] + "."


def captions(s: LandscapeSpec, rng: np.random.Generator, k: int = 5) -> list[str]:
    """``k`` distinct references (the test answer is the first)."""
    refs: list[str] = []
    for _ in range(20 * k):  # two-thing scenes have hundreds of phrasings; one-thing scenes still have dozens
        c = caption(s, rng)
        if c not in refs:
            refs.append(c)
        if len(refs) == k:
            break
    return refs


def qa_flickr(s: LandscapeSpec, rng, i) -> QA:
    # The training target is a fresh draw, not one of the references: a model cannot learn the test references.
    refs = captions(s, rng)
    return CAPTION_PROMPT, caption(s, rng), refs, {}


def qa_aokvqa(s: LandscapeSpec, rng, i) -> QA:
    colored = [t for t in s.ground if t.color]
    kinds = ["where", "seen"] + (["weather"] if s.sky else []) + (["color"] if colored else [])
    kind = _pick(rng, kinds)
    if kind == "weather":
        q = "What is the weather like in this picture?"
        weather = {"sun": "sunny", "cloud": "cloudy"}[s.sky.kind]  # type: ignore[union-attr]
        opts, letter = _options(rng, weather, ["sunny", "cloudy", "rainy", "snowy"], 4)
    elif kind == "color":
        t = _pick(rng, colored)
        q = f"What color is the {t.kind} in this picture?"
        opts, letter = _options(rng, t.color, THING_COLORS, 4)
    elif kind == "where":
        t = _pick(rng, list(s.things))
        q = f"Where is the {t.kind} in this picture?"
        ans = "in the sky" if t.kind in SKY_THINGS else SLOT_PHRASES[t.slot]
        opts, letter = _options(rng, ans, SLOT_PHRASES + ["in the sky"], 4)
    else:
        t = _pick(rng, list(s.things))
        present = {u.kind for u in s.things}
        q = "Which of these things can be seen in the picture?"
        opts = [t.kind] + _pick(rng, [k for k in SKY_THINGS + GROUND_THINGS if k not in present], 3)
        opts = [opts[int(j)] for j in rng.permutation(4)]
        letter = LETTERS[opts.index(t.kind)]
    body = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(opts))
    return f"{q}\n{body}\n{SUFFIX['AOKVQA']}", letter, [letter], {}


def _box_str(box: tuple[float, float, float, float]) -> str:
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in box) + "]"


def qa_grounding(s: LandscapeSpec, rng, i) -> QA:
    t = _pick(rng, list(s.things))
    box = _box_str(t.box)
    return GROUNDING_PROMPT.format(f"the {t.phrase}"), box, [box], {"answer_bbox": box}


def qa_figureqa(s: BarSpec, rng, i) -> QA:
    want_yes = i % 2 == 0  # exactly balanced
    v, c = list(s.values), list(s.colors)
    kind = _pick(rng, ["max", "min"])  # pairwise comparisons were not learnable by the tiny model in budget
    if kind in ("max", "min"):
        best = c[int(np.argmax(v) if kind == "max" else np.argmin(v))]
        col = best if want_yes else _pick(rng, [x for x in c if x != best])
        q = f"Is {col} the {'maximum' if kind == 'max' else 'minimum'}?"
    else:
        a, b = _pick(rng, list(range(len(c))), 2)
        holds = v[a] < v[b] if kind == "less" else v[a] > v[b]
        if holds != want_yes:
            a, b = b, a
        q = f"Is {c[a]} {'less' if kind == 'less' else 'greater'} than {c[b]}?"
    ans = "Yes" if want_yes else "No"
    return f"{q}\n{SUFFIX['FigureQA']}", ans, [ans], {}


def qa_dvqa(s: BarSpec, rng, i) -> QA:
    if rng.random() < 0.7:
        j = int(rng.integers(len(s.values)))
        q, ans = f"What is the value of the {s.colors[j]} bar?", s.values[j]
    else:
        q, ans = "What is the largest value in the chart?", max(s.values)
    return f"{q}\n{SUFFIX['DVQA']}", str(ans), [str(ans)], {}


def qa_tabmwp(s: TableSpec, rng, i) -> QA:
    kind = int(rng.integers(3))
    a, b = _pick(rng, list(range(len(s.items))), 2)
    na, nb = s.items[a].lower() + "s", s.items[b].lower() + "s"
    if kind == 0:
        q, ans = f"How many {na} and {nb} are there in total?", s.values[a] + s.values[b]
    elif kind == 1:
        if s.values[a] < s.values[b]:
            a, b, na, nb = b, a, nb, na
        q, ans = f"How many more {na} than {nb} are there?", s.values[a] - s.values[b]
    else:
        q, ans = f"How many {na} are there?", s.values[a]
    return f"Look at the table. {q}\n{SUFFIX['TabMWP']}", str(ans), [str(ans)], {}


@dataclass(frozen=True)
class DatasetGen:
    family: str
    qa: Callable[[Any, np.random.Generator, int], QA]
    accept: Callable[[Any], bool] = lambda s: True


GENERATORS: dict[str, DatasetGen] = {
    "ImageNet-R": DatasetGen("object", qa_imagenet_r),
    "ArxivQA": DatasetGen("line", qa_arxivqa),
    "IconQA": DatasetGen("icons", qa_iconqa),
    "CLEVR-Math": DatasetGen("scene", qa_clevr_math),
    "OCR-VQA": DatasetGen("book", qa_ocrvqa, _ocr_ok),
    "Flickr30k": DatasetGen("landscape", qa_flickr),
    "FigureQA": DatasetGen("bars", qa_figureqa),
    "super-CLEVR": DatasetGen("scene", qa_super_clevr, _super_clevr_ok),
    "AOKVQA": DatasetGen("landscape", qa_aokvqa),
    "Grounding": DatasetGen("landscape", qa_grounding),
    "DVQA": DatasetGen("labelled_bars", qa_dvqa),
    "TabMWP": DatasetGen("table", qa_tabmwp),
}
assert list(GENERATORS) == DATASET_NAMES and set(DATASET_NAMES) == set(registry.DATASETS)
# Same images and answers as v4 (every draw from a sample's generator is the same), other questions for two tasks.
GENERATORS_V5: dict[str, DatasetGen] = {
    **GENERATORS,
    "ImageNet-R": DatasetGen("object", qa_imagenet_r_v5),
    "super-CLEVR": DatasetGen("scene", qa_super_clevr_v5, _super_clevr_ok),
}


def generators(cfg: SynthConfig) -> dict[str, DatasetGen]:
    return GENERATORS_V5 if cfg.version == 5 else GENERATORS


def generator_version(cfg: SynthConfig) -> str:
    return str(cfg.version)


def _identity(cfg: SynthConfig) -> dict[str, Any]:
    """What a cache and a manifest name: the knobs without the version, which ``generator_version`` carries (so a
    v4 cache keeps the folder it had before the version was a knob)."""
    return {"config": cfg.model_dump(exclude={"version"}), "generator_version": generator_version(cfg)}


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _sample_spec(family: Family, gen: DatasetGen, rng: np.random.Generator):
    while True:
        spec = family.sample(rng)
        if gen.accept(spec):
            return spec


def make_sample(cfg: SynthConfig, dataset: str, split: str, i: int, render: bool = True):
    """(spec, question, answer, refs, extra, image) of sample ``i``; a pure function of its arguments."""
    gen = generators(cfg)[dataset]
    family = FAMILIES[gen.family]
    rng = _rng(cfg.seed, DATASET_NAMES.index(dataset), _SPLITS[split], i)
    spec = _sample_spec(family, gen, rng)
    q, ans, refs, extra = gen.qa(spec, rng, i)
    img = family.draw(spec, cfg.image_size, rng) if render else None
    return spec, q, ans, refs, extra, img


def make_pretrain_sample(cfg: SynthConfig, i: int, render: bool = True):
    """(prompt, description, image) of pre-training sample ``i``: families in turn, so the mixture is balanced."""
    names = list(FAMILIES)
    family = FAMILIES[names[i % len(names)]]
    rng = _rng(cfg.seed, _PRETRAIN_STREAM, i)
    spec = family.sample(rng)
    prompt = _pick(rng, PRETRAIN_PROMPTS)
    img = family.draw(spec, cfg.image_size, rng) if render else None
    return prompt, family.describe(spec), img


# ---------------------------------------------------------------------------------------------------------------
# The generic instruction mixture: the base's second pre-training phase, as LLaVA-1.5's visual instruction tuning is
# to the 7B. It asks about the same image families in the benchmark's answer formats (a word, a number, yes/no, an
# option letter, a box, a caption) and with the same two suffixes, but never as one of the 12 tasks asks: colours,
# counts, presence, styles, positions and rows; an attribute a task asks for is only asked in another form (a shape
# as yes/no or by position, a title by its first letter or length), and the caption prompt, Flickr30k's, only on the
# other families. The base then follows formats and reads questions without knowing any task, and a task's questions
# still have to be learned. Two yes/no kinds are skewed (landscape presence about 38% yes, table rows about 64%);
# the overall yes share is balanced, and changing them means a new base.

_INSTRUCT_STREAM = 300
Instruct = tuple[str, str]  # (question without <image>, answer)


def _yes_no(rng: np.random.Generator, truth: str, pool: list[str]) -> tuple[str, str]:
    """(value to ask about, "Yes"/"No"), balanced: half the time the true value, else another from ``pool``."""
    if rng.random() < 0.5 or not [p for p in pool if p != truth]:
        return truth, "Yes"
    return _pick(rng, [p for p in pool if p != truth]), "No"


def _mc(rng: np.random.Generator, question: str, answer: str, pool: list[str], k: int = 4) -> Instruct:
    opts, letter = _options(rng, answer, pool, min(k, len(set(pool))))
    body = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(opts))
    return f"{question}\n{body}\n{MC}", letter


def _short(question: str, answer: Any) -> Instruct:
    return f"{question}\n{SHORT}", str(answer)


def _box(cx: float, cy: float, half_w: float, half_h: float) -> str:
    return _box_str((cx - half_w, cy - half_h, cx + half_w, cy + half_h))


def instruct_object(s: ObjectSpec, rng) -> Instruct:
    kind = _pick(rng, ["color", "is_color", "is_shape", "style", "box", "caption"])
    if kind == "color":
        return _short("What color is the object in this image?", s.color)
    if kind == "is_color":
        c, yn = _yes_no(rng, s.color, COLOR_NAMES)
        return _short(f"Is the object in this image {c}?", yn)
    if kind == "is_shape":
        sh, yn = _yes_no(rng, s.shape, SHAPES)
        return _short(f"Is this a picture of {_a(sh)}?", yn)
    if kind == "style":
        return _mc(rng, "In which style is this image made?", s.style, STYLES)
    if kind == "box":
        return GROUNDING_PROMPT.format(f"the {s.color} object"), _box(s.cx, s.cy, s.r, s.r)
    text = f"{_a(s.color)} {s.shape} in {s.style} style."
    return CAPTION_PROMPT, text[0].upper() + text[1:]


def instruct_line(s: LineSpec, rng) -> Instruct:
    kind = _pick(rng, ["color", "is_color", "mc_color", "caption"])
    if kind == "color":
        return _short("What color is the line in the chart?", s.color)
    if kind == "is_color":
        c, yn = _yes_no(rng, s.color, COLOR_NAMES)
        return _short(f"Is the line in this chart {c}?", yn)
    if kind == "mc_color":
        return _mc(rng, "Which color is the plotted line?", s.color, COLOR_NAMES)
    return CAPTION_PROMPT, f"A line chart with a {s.color} line."


def instruct_icons(s: IconSpec, rng) -> Instruct:
    present = {k: n for k, n in s.counts}
    kind = _pick(rng, ["count", "present", "empty", "mc_count", "cell"])
    icon = _pick(rng, ICON_NAMES)
    if kind == "count":
        return _short(f"How many {icon}s are in the grid?", present.get(icon, 0))
    if kind == "present":
        return _short(f"Is there a {icon} in the grid?", "Yes" if icon in present else "No")
    if kind == "empty":
        return _short("How many cells of the grid are empty?", sum(c is None for c in s.cells))
    if kind == "cell":
        filled = [j for j, c in enumerate(s.cells) if c is not None]
        j = _pick(rng, filled)
        return _short(f"Which icon is in the {GRID_POS[j // 3][j % 3]} cell of the grid?", s.cells[j])
    return _mc(rng, "How many icons are in the grid in total?", str(sum(present.values())),
               [str(v) for v in range(1, 10)])


def instruct_scene(s: SceneSpec, rng) -> Instruct:
    kind = _pick(rng, ["count", "count_color", "present", "box", "at", "mc_count"])
    o = _pick(rng, list(s.objs))
    if kind == "count":
        return _short("How many objects are in the scene?", len(s.objs))
    if kind == "count_color":
        c = _pick(rng, SCENE_COLORS)
        return _short(f"How many {c} objects are there?", sum(x.color == c for x in s.objs))
    if kind == "present":
        c, sh = _pick(rng, SCENE_COLORS), _pick(rng, SOLIDS)
        if rng.random() < 0.5:
            c, sh = o.color, o.shape
        yes = any(x.color == c and x.shape == sh for x in s.objs)
        return _short(f"Is there a {c} {sh} in the scene?", "Yes" if yes else "No")
    if kind == "at":  # position -> attribute: the object is named by where it is, not by what it is
        what = _pick(rng, ["color", "shape"])
        return _short(f"What {what} is the object at the {GRID_POS[o.cell // 3][o.cell % 3]}?",
                      o.color if what == "color" else o.shape)
    if kind == "box" and sum(x.color == o.color and x.shape == o.shape for x in s.objs) == 1:
        return GROUNDING_PROMPT.format(f"the {o.color} {o.shape}"), _box(o.cx, o.cy + 0.02, 0.13, 0.14)
    return _mc(rng, "How many objects are in the scene?", str(len(s.objs)), [str(v) for v in range(1, 7)])


def instruct_book(s: BookSpec, rng) -> Instruct:
    kind = _pick(rng, ["cover", "is_cover", "mc_cover", "letter", "length", "caption"])
    covers = list(COVER_COLORS)
    if kind == "cover":
        return _short("What color is the cover of this book?", s.cover)
    if kind == "is_cover":
        c, yn = _yes_no(rng, s.cover, covers)
        return _short(f"Is the cover of this book {c}?", yn)
    if kind == "mc_cover":
        return _mc(rng, "Which color is the book cover?", s.cover, covers)
    if kind == "letter":  # the title has to be read, though never written out
        first, yn = _yes_no(rng, s.title[0], sorted({t[0] for t in TITLES}))
        return _short(f"Does the title on this cover begin with the letter {first}?", yn)
    if kind == "length":
        return _short("How many letters does the title on this cover have?", len(s.title))
    return CAPTION_PROMPT, f"A {s.cover} book cover with a short title."


def instruct_landscape(s: LandscapeSpec, rng) -> Instruct:
    kind = _pick(rng, ["present", "count", "mc_sky", "sky_present", "is_color"])
    kinds = {t.kind for t in s.things}
    colored = [t for t in s.ground if t.color]
    if kind == "is_color" and colored:
        t = _pick(rng, colored)
        c, yn = _yes_no(rng, t.color, THING_COLORS)
        return _short(f"Is the {t.kind} {c}?", yn)
    if kind == "present":
        k = _pick(rng, GROUND_THINGS)
        return _short(f"Is there a {k} in the picture?", "Yes" if k in kinds else "No")
    if kind == "count":
        return _short("How many things stand on the grass?", len(s.ground))
    if kind == "mc_sky":
        truth = s.sky.kind if s.sky else "nothing"
        return _mc(rng, "What can be seen in the sky?", truth, ["sun", "cloud", "nothing", "moon"])
    k = _pick(rng, SKY_THINGS)
    return _short(f"Is there a {k} in the sky?", "Yes" if s.sky and s.sky.kind == k else "No")


def instruct_bars(s: BarSpec, rng) -> Instruct:
    kind = _pick(rng, ["count", "position", "is_position", "present", "mc_rightmost", "caption"])
    where = ["leftmost", "middle", "rightmost"]
    j = int(rng.integers(len(s.colors)))
    if kind == "count":
        return _short("How many bars are in the chart?", len(s.values))
    if kind == "position":
        return _short(f"What color is the {where[j]} bar?", s.colors[j])
    if kind == "is_position":
        c, yn = _yes_no(rng, s.colors[j], COLOR_NAMES)
        return _short(f"Is the {where[j]} bar {c}?", yn)
    if kind == "present":
        c = _pick(rng, COLOR_NAMES)
        return _short(f"Is there a {c} bar in the chart?", "Yes" if c in s.colors else "No")
    if kind == "mc_rightmost":
        return _mc(rng, "Which color is the rightmost bar?", s.colors[-1], COLOR_NAMES)
    return CAPTION_PROMPT, f"A bar chart with {NUM_WORDS[len(s.values)]} bars."


def instruct_table(s: TableSpec, rng) -> Instruct:
    kind = _pick(rng, ["rows", "first", "present", "is_first", "mc_last", "caption"])
    if kind == "rows":
        return _short("How many rows does the table have?", len(s.items))
    if kind == "first":
        return _short("What is written in the first row of the table?", s.items[0])
    if kind == "present":
        item, yn = _yes_no(rng, _pick(rng, list(s.items)), TABLE_ITEMS)
        return _short(f"Does the table have a row for {item}?", "Yes" if item in s.items else "No")
    if kind == "is_first":
        item, yn = _yes_no(rng, s.items[0], TABLE_ITEMS)
        return _short(f"Is {item} written in the first row of the table?", yn)
    if kind == "mc_last":
        return _mc(rng, "What is written in the last row of the table?", s.items[-1], TABLE_ITEMS)
    return CAPTION_PROMPT, f"A table with {NUM_WORDS[len(s.items)]} rows."


INSTRUCT: dict[str, Callable[[Any, np.random.Generator], Instruct]] = {
    "object": instruct_object,
    "line": instruct_line,
    "icons": instruct_icons,
    "scene": instruct_scene,
    "book": instruct_book,
    "landscape": instruct_landscape,
    "bars": instruct_bars,
    "labelled_bars": instruct_bars,
    "table": instruct_table,
}
assert list(INSTRUCT) == list(FAMILIES)


def _instruct(cfg: SynthConfig, name: str, rng: np.random.Generator, render: bool):
    family = FAMILIES[name]
    spec = family.sample(rng)
    q, ans = INSTRUCT[name](spec, rng)
    img = family.draw(spec, cfg.image_size, rng) if render else None
    return spec, q, ans, img


def make_instruct_sample(cfg: SynthConfig, i: int, render: bool = True):
    """(question, answer, image) of instruction-mixture sample ``i``: families in turn, as in the description mix."""
    names = list(FAMILIES)
    name = names[i % len(names)]
    _, q, ans, img = _instruct(cfg, name, _rng(cfg.seed, _INSTRUCT_STREAM, i), render)
    return q, ans, img


def instruct_format(question: str, answer: str) -> str:
    """The answer format (a key of ``registry.FORMATS``) of a generic instruction, read off how INSTRUCT wrote it."""
    if question == CAPTION_PROMPT:
        return "caption"
    if question.startswith(GROUNDING_PROMPT.split("{}")[0]):
        return "box"
    if question.endswith(MC):
        return "letter"
    if answer in ("Yes", "No"):
        return "yesno"
    return "number" if answer.isdigit() else "word"


# The held-out split of the generic instruction mixture: the general-ability benchmark, fcit's analogue of MME and
# POPE for the 7B (the base's own instruction distribution, scored before and after a run; ``eval.retention``).
# Its own seed stream, so the training mixture (``_INSTRUCT_STREAM``, which the committed base was trained on) is
# unchanged byte for byte. A fixed size rather than a SynthConfig field: a new field would change every cache key
# (``synth_root`` hashes the whole config) and so every existing cache folder.
_INSTRUCT_TEST_STREAM = 301
GENERAL_PER_FAMILY = 30
GENERAL_TEST_FILE = "general/test.json"
_GENERAL_MARKER = "general/manifest.json"


def _instruct_key(name: str, spec: Any, question: str) -> tuple[str, str, str]:
    return name, repr(spec), question


def make_general_test(cfg: SynthConfig, render: bool = True) -> Iterator[tuple[str, Any, str, str, Any]]:
    """(family, image spec, question, answer, image) of the held-out split, family by family, GENERAL_PER_FAMILY
    each.

    A draw whose (family, image spec, question) is in the training mixture of ``cfg`` is skipped: it would be a
    training item again up to pixel noise. Family-major order keeps an evenly spaced subset (``eval.max_test``)
    balanced over families."""
    train = set()
    names = list(FAMILIES)
    for i in range(cfg.n_instruct):
        spec, q, _, _ = _instruct(cfg, names[i % len(names)], _rng(cfg.seed, _INSTRUCT_STREAM, i), render=False)
        train.add(_instruct_key(names[i % len(names)], spec, q))
    for f, name in enumerate(names):
        kept, j = 0, 0
        while kept < GENERAL_PER_FAMILY:
            spec, q, ans, img = _instruct(cfg, name, _rng(cfg.seed, _INSTRUCT_TEST_STREAM, f, j), render)
            j += 1
            if _instruct_key(name, spec, q) in train:
                continue
            kept += 1
            yield name, spec, q, ans, img


# ---------------------------------------------------------------------------------------------------------------
# Minimal pairs for the comparison a yes/no question asks: the optional third pre-training phase
# (``fcit pretrain --binding-epochs``). The two-phase base reads the image ("What color is the leftmost bar?") and
# reads the question, but answers the generic yes/no questions at chance (``scripts/base_skills.py``): it never
# learned to compare a word of the question with the image, and FigureQA and half of CLEVR-Math need exactly that.
# Here every image is asked one generic yes/no kind twice, once with its true value (Yes) and once with a false one
# (No), so the image alone predicts neither answer and only the comparison lowers the loss. The kinds are the generic
# mixture's own (INSTRUCT), never a task's question.

_BINDING_STREAM = 302
BINDING_PAIRS = 10000  # a constant, like GENERAL_PER_FAMILY: a SynthConfig field would change every cache key
BINDING_FILE = "binding/train.json"
_BINDING_MARKER = "binding/manifest.json"
_WHERE = ("leftmost", "middle", "rightmost")

# (question for a value, the image's true values, every value the question takes)
BindingKind = tuple[Callable[[str], str], list[str], list[str]]


def binding_kinds(name: str, s: Any) -> list[BindingKind]:
    """The yes/no kinds of family ``name`` that can be asked of image ``s`` both ways (a true and a false value)."""
    kinds: list[BindingKind]
    if name == "object":
        kinds = [(lambda c: f"Is the object in this image {c}?", [s.color], COLOR_NAMES),
                 (lambda sh: f"Is this a picture of {_a(sh)}?", [s.shape], SHAPES)]
    elif name == "line":
        kinds = [(lambda c: f"Is the line in this chart {c}?", [s.color], COLOR_NAMES)]
    elif name == "icons":
        kinds = [(lambda i: f"Is there a {i} in the grid?", sorted(k for k, _ in s.counts), ICON_NAMES)]
    elif name == "scene":
        kinds = [(lambda v: f"Is there a {v} in the scene?", sorted({f"{o.color} {o.shape}" for o in s.objs}),
                  [f"{c} {sh}" for c in SCENE_COLORS for sh in SOLIDS])]
    elif name == "book":
        kinds = [(lambda c: f"Is the cover of this book {c}?", [s.cover], list(COVER_COLORS)),
                 (lambda x: f"Does the title on this cover begin with the letter {x}?", [s.title[0]],
                  sorted({t[0] for t in TITLES}))]
    elif name == "landscape":
        present = sorted({t.kind for t in s.ground})
        kinds = [(lambda k: f"Is there a {k} in the picture?", present, GROUND_THINGS),
                 (lambda k: f"Is there a {k} in the sky?", [s.sky.kind] if s.sky else [], SKY_THINGS)]
        for kind in sorted({t.kind for t in s.ground if t.color}):
            colors = {t.color for t in s.ground if t.kind == kind}
            if len(colors) == 1:  # "Is the house red?" names one house only when they all share the colour
                kinds.append((lambda c, k=kind: f"Is the {k} {c}?", sorted(colors), THING_COLORS))
    elif name in ("bars", "labelled_bars"):
        kinds = [(lambda c, w=w: f"Is the {w} bar {c}?", [s.colors[j]], COLOR_NAMES) for j, w in enumerate(_WHERE)]
        kinds.append((lambda c: f"Is there a {c} bar in the chart?", list(s.colors), COLOR_NAMES))
    elif name == "table":
        kinds = [(lambda i: f"Does the table have a row for {i}?", list(s.items), TABLE_ITEMS),
                 (lambda i: f"Is {i} written in the first row of the table?", [s.items[0]], TABLE_ITEMS)]
    else:
        raise KeyError(name)
    return [k for k in kinds if k[1] and set(k[2]) - set(k[1])]


def make_binding_pair(cfg: SynthConfig, i: int, render: bool = True):
    """(family, image spec, question answered Yes, question answered No, image) of pair ``i``: families in turn."""
    names = list(FAMILIES)
    name = names[i % len(names)]
    rng = _rng(cfg.seed, _BINDING_STREAM, i)
    family = FAMILIES[name]
    while True:  # an image every kind of which holds for all values or none is drawn again (rare)
        spec = family.sample(rng)
        kinds = binding_kinds(name, spec)
        if kinds:
            break
    ask, true, every = _pick(rng, kinds)
    yes = _pick(rng, true)
    no = _pick(rng, [v for v in every if v not in true])
    img = family.draw(spec, cfg.image_size, rng) if render else None
    return name, spec, f"{ask(yes)}\n{SHORT}", f"{ask(no)}\n{SHORT}", img


# ---------------------------------------------------------------------------------------------------------------
# Files, cache and atomic commit.


def default_cache_dir() -> Path:
    env = os.environ.get("FCIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fcit"


def synth_root(cfg: SynthConfig, cache_dir: Optional[Path] = None) -> Path:
    key = json.dumps(_identity(cfg), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"synth-{digest}"


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _write_json(path: Path, obj: Any) -> str:
    data = _json_bytes(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _save_png(img: Image.Image, path: Path):
    img.save(path, format="PNG", compress_level=6)  # Pillow writes no time chunk unless asked


def _progress(it, progress: bool, desc: str, total: int):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only probes whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_stale_tmp(root: Path):
    """Remove temporary build folders left by crashed builds (their process is gone) and our own pid's leftovers."""
    if not root.parent.is_dir():
        return
    for p in sorted(root.parent.glob(f"{root.name}.*tmp-*")):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _commit(tmp: Path, root: Path, parts: list[str], marker: str):
    """Move a finished build from ``tmp`` into ``root``; the last part carries ``marker`` (the manifest), so the
    marker's presence alone means complete.

    When ``root`` does not exist the whole folder is renamed in one step. When it exists (the benchmark and the
    pre-training mixture share a root and are built separately) the parts are moved in one by one, marker last.
    """
    if (root / marker).is_file():
        return  # a concurrent build finished first, with the same content
    try:
        os.replace(tmp, root)
        return
    except OSError:
        if not root.is_dir():
            raise
    for part in parts:
        dst = root / part
        if dst.is_dir():
            shutil.rmtree(dst)  # leftover of a commit that crashed half-way
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / part, dst)


def _build_atomic(root: Path, marker: str, kind: str, write: Callable[[Path], list[str]]) -> Path:
    """Build into ``<root>.<kind>tmp-<pid>`` with ``write`` (returns the parts to move, marker-carrying last)."""
    if (root / marker).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    tmp = root.with_suffix(f".{kind}tmp-{os.getpid()}")
    try:
        parts = write(tmp)
        _commit(tmp, root, parts, marker)
    except OSError as e:
        raise FcitError(f"cannot write FCIT-Synth to {root}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _manifest(cfg: SynthConfig, hashes: dict[str, str]) -> dict[str, Any]:
    return {**_identity(cfg), "sha256": hashes}


def _write_dataset(cfg: SynthConfig, name: str, tmp: Path, progress: bool) -> dict[str, str]:
    spec = registry.get(name)
    img_dir = tmp / "images" / spec.folder
    img_dir.mkdir(parents=True, exist_ok=True)
    ins = f"instructions/{spec.folder}"
    hashes = {}
    for split, n, fname in (("train", cfg.n_train, spec.train_file), ("test", cfg.n_test, spec.test_file)):
        records, coco_images, coco_anns = [], [], []
        for i in _progress(range(n), progress, f"FCIT-Synth {name} {split}", n):
            _, q, ans, refs, extra, img = make_sample(cfg, name, split, i)
            rid = f"{spec.folder}-{split}-{i:06d}"
            rel = f"images/{spec.folder}/{rid}.png"
            _save_png(img, tmp / rel)
            if split == "train":
                records.append({"id": rid, "image": rel, "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": ans}]})  # fmt: skip
                continue
            rec = {"question_id": rid, "image": rel, "text": q, "answer": refs[0] if len(refs) > 1 else ans, **extra}
            if spec.answer_type == registry.GROUNDING:
                rec["size"] = [cfg.image_size, cfg.image_size]
            records.append(rec)
            if spec.answer_type == registry.CAPTION:
                coco_images.append({"id": i + 1})
                for r in refs:
                    coco_anns.append({"image_id": i + 1, "id": len(coco_anns) + 1, "caption": r})
        hashes[f"{ins}/{fname}"] = _write_json(tmp / ins / fname, records)
        if coco_images:
            coco = {"images": coco_images, "annotations": coco_anns}
            hashes[f"{ins}/val_coco_type.json"] = _write_json(tmp / ins / "val_coco_type.json", coco)
    return hashes


def build(cfg: SynthConfig, cache_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """Write the 12 FCIT-Synth datasets (or reuse a complete cached copy); returns the benchmark root."""

    def write(tmp: Path) -> list[str]:
        hashes: dict[str, str] = {}
        for name in DATASET_NAMES:
            hashes.update(_write_dataset(cfg, name, tmp, progress))
        _write_json(tmp / "manifest.json", _manifest(cfg, hashes))
        return ["instructions"] + [f"images/{registry.get(n).folder}" for n in DATASET_NAMES] + ["manifest.json"]

    return _build_atomic(synth_root(cfg, cache_dir), "manifest.json", "", write)


def _conversation(rid: str, rel: str, question: str, answer: str) -> dict[str, Any]:
    return {"id": rid, "image": rel, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}  # fmt: skip


# The two pre-training mixtures: file -> (record id prefix, size field of SynthConfig, sample maker).
_MIXTURES = {
    "pretrain/train.json": ("pretrain", "n_pretrain", make_pretrain_sample),
    "pretrain/instruct.json": ("instruct", "n_instruct", make_instruct_sample),
}


def _mixture(cfg: SynthConfig, file: str, render: bool) -> Iterator[tuple[dict[str, Any], str, Any]]:
    """(record, image path relative to the root, image or None) of every sample of one mixture."""
    prefix, size, make = _MIXTURES[file]
    for i in range(getattr(cfg, size)):
        question, answer, img = make(cfg, i, render)
        rid = f"{prefix}-{i:06d}"
        rel = f"images/pretrain/{rid}.png"
        yield _conversation(rid, rel, question, answer), rel, img


def mixture_sha256(cfg: SynthConfig) -> dict[str, str]:
    """The fingerprints ``build_pretrain`` would write for both mixtures (file bytes; no image is rendered), to check
    which mixture a base was trained on (``fcit_pretrain.json``)."""
    return {f: hashlib.sha256(_json_bytes([r for r, _, _ in _mixture(cfg, f, render=False)])).hexdigest()
            for f in _MIXTURES}


def build_pretrain(cfg: SynthConfig, cache_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """Write both pre-training mixtures under the benchmark root: the descriptions (``pretrain/train.json``) and the
    generic instructions (``pretrain/instruct.json``); returns that root."""

    def write(tmp: Path) -> list[str]:
        (tmp / "images" / "pretrain").mkdir(parents=True, exist_ok=True)
        hashes = {}
        for f, (prefix, size, _) in _MIXTURES.items():
            records = []
            n = getattr(cfg, size)
            for rec, rel, img in _progress(_mixture(cfg, f, render=True), progress, f"FCIT-Synth {prefix}", n):
                _save_png(img, tmp / rel)
                records.append(rec)
            hashes[f] = _write_json(tmp / f, records)
        _write_json(tmp / "pretrain" / "manifest.json", _manifest(cfg, hashes))
        return ["images/pretrain", "pretrain"]  # "pretrain" holds both files and the manifest: one atomic move

    return _build_atomic(synth_root(cfg, cache_dir), "pretrain/manifest.json", "pretrain-", write)


def build_general(cfg: SynthConfig, cache_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """Write the held-out general test split (``GENERAL_TEST_FILE``, the official test layout plus each record's
    ``format``) under the benchmark root, as its own atomic build: an existing cache gains it, nothing else is
    rebuilt. Returns that root."""

    def write(tmp: Path) -> list[str]:
        (tmp / "images" / "general").mkdir(parents=True, exist_ok=True)
        records = []
        n = GENERAL_PER_FAMILY * len(FAMILIES)
        for k, (family, _, q, ans, img) in enumerate(_progress(make_general_test(cfg), progress, "FCIT-Synth general", n)):
            rid = f"general-test-{k:06d}"
            rel = f"images/general/{rid}.png"
            _save_png(img, tmp / rel)
            fmt = instruct_format(q, ans)
            rec = {"question_id": rid, "image": rel, "text": q, "answer": ans, "format": fmt, "family": family}
            if fmt == "box":  # as the Grounding test file: the box to score against, the image size
                rec["answer_bbox"] = ans
                rec["size"] = [cfg.image_size, cfg.image_size]
            records.append(rec)
        hashes = {GENERAL_TEST_FILE: _write_json(tmp / GENERAL_TEST_FILE, records)}
        _write_json(tmp / _GENERAL_MARKER, {**_manifest(cfg, hashes), "per_family": GENERAL_PER_FAMILY})
        return ["images/general", "general"]

    return _build_atomic(synth_root(cfg, cache_dir), _GENERAL_MARKER, "general-", write)


def build_binding(cfg: SynthConfig, cache_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """Write the minimal pairs (``BINDING_FILE``: training records in the LLaVA layout, each pair's Yes record
    followed by its No record on the same image file) under the benchmark root, as its own atomic build. Returns that
    root."""

    def write(tmp: Path) -> list[str]:
        (tmp / "images" / "binding").mkdir(parents=True, exist_ok=True)
        records = []
        for i in _progress(range(BINDING_PAIRS), progress, "FCIT-Synth binding pairs", BINDING_PAIRS):
            _, _, q_yes, q_no, img = make_binding_pair(cfg, i)
            rel = f"images/binding/binding-{i:06d}.png"
            _save_png(img, tmp / rel)
            records += [_conversation(f"binding-{i:06d}-yes", rel, q_yes, "Yes"),
                        _conversation(f"binding-{i:06d}-no", rel, q_no, "No")]
        hashes = {BINDING_FILE: _write_json(tmp / BINDING_FILE, records)}
        _write_json(tmp / _BINDING_MARKER, {**_manifest(cfg, hashes), "pairs": BINDING_PAIRS})
        return ["images/binding", "binding"]

    return _build_atomic(synth_root(cfg, cache_dir), _BINDING_MARKER, "binding-", write)


def corpus_texts(cfg: SynthConfig) -> Iterator[str]:
    """Texts for tokenizer training: every word list, every prompt, and questions, answers and descriptions sampled
    from every dataset and family (no image is rendered)."""
    words = (COLOR_NAMES + list(COVER_COLORS) + NUM_WORDS + SHAPES + STYLES + TRENDS + ICON_NAMES + SOLIDS
             + list(SOLID_PLURALS.values()) + TITLES + SKY_THINGS + GROUND_THINGS + TABLE_ITEMS
             + [t.lower() + "s" for t in TABLE_ITEMS] + [p for row in GRID_POS for p in row] + SLOT_PHRASES
             + list(LETTERS) + [str(d) for d in range(20)] + ["Yes", "No"])  # fmt: skip
    yield " ".join(words)
    yield from PRETRAIN_PROMPTS
    yield from (SHORT, MC, CAPTION_PROMPT)
    for noun in _CAPTION_NOUN.values():
        yield " ".join(noun + _CAPTION_ADJ)
    yield " ".join(_CAPTION_SETTING + _CAPTION_SCENE + [x for v in _CAPTION_SKY.values() for x in v])
    for name in DATASET_NAMES:
        gen = generators(cfg)[name]
        family = FAMILIES[gen.family]
        for i in range(200):
            rng = _rng(cfg.seed, _CORPUS_STREAM, DATASET_NAMES.index(name), i)
            spec = _sample_spec(family, gen, rng)
            q, ans, refs, _ = gen.qa(spec, rng, i)
            yield q
            yield from refs
    for j, fname in enumerate(FAMILIES):
        family = FAMILIES[fname]
        for i in range(200):
            yield family.describe(family.sample(_rng(cfg.seed, _CORPUS_STREAM, 100 + j, i)))
        for i in range(200):
            rng = _rng(cfg.seed, _CORPUS_STREAM, 200 + j, i)
            yield from INSTRUCT[fname](family.sample(rng), rng)
