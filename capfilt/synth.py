"""A procedural image-text world with known ground truth.

No pretrained weights or real datasets can be fetched where capfilt is developed and tested, so this
module makes a small world in which everything CapFilt claims can be measured on a CPU:

* every image is a :class:`Scene` of one to three coloured shapes on a muted, textured background,
  so the truth about an image is a short list of (colour, shape, size, position) facts;
* ``human`` and ``test`` images carry five reference captions that name every object's colour and
  shape (the stand-in for COCO);
* ``web`` images carry one web text each, of which a known share is noise of a known type (the
  stand-in for LAION alt-text): the filter's precision and recall can be scored exactly;
* :func:`check_caption` decides whether a caption names exactly the objects in the image, so a
  captioner's output can be scored without a language model (:func:`attribute_accuracy`).

Everything is a pure function of ``(seed, split, index)``: the same call writes the same JPEG bytes
and the same texts, whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from capfilt.errors import UserError

# --------------------------------------------------------------------------------------------------
# The world's vocabulary. Every word a caption can contain is spelled out in this section, so that
# all_words() can hand a tokenizer the complete vocabulary (a test guards that claim).
# --------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "heart")
"""Shapes chosen to stay distinct when an object is only ~20 px wide."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 135, 15),
    "yellow": (250, 220, 30),
    "green": (35, 165, 55),
    "blue": (35, 85, 230),
    "purple": (140, 50, 190),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
"""Saturated, well-separated object colours; backgrounds are muted so objects always stand out."""

SIZES: dict[str, float] = {"small": 0.11, "medium": 0.16, "large": 0.22}
"""Object half-extent as a fraction of the image side."""

# Position names on a 3x3 grid: name -> (column, row). Left/right/top/bottom words in captions are
# derived from the grid cell, so they are always truthful.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}

BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "plain gray", "simple"),
    "noise": ("noisy", "speckled", "grainy"),
    "stripes": ("striped", "stripy", "lined"),
    "gradient": ("gradient", "shaded", "smooth gradient"),
    "checker": ("checkered", "checkerboard", "tiled"),
}
"""Background kinds and the adjectives captions use for them."""


@dataclass(frozen=True, kw_only=True)
class World:
    """Which of the vocabulary's values a corpus draws from: a named preset of :data:`WORLDS`.

    Every world uses the same words (a caption of any world is checked by the same
    :func:`check_caption`), only fewer values or simpler scenes. ``object_counts`` maps a number
    of objects to its probability.
    """

    name: str
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    backgrounds: tuple[str, ...]
    object_counts: tuple[tuple[int, float], ...]
    description: str

    def __post_init__(self) -> None:
        unknown = (
            [s for s in self.shapes if s not in SHAPES]
            + [c for c in self.colors if c not in COLORS]
            + [z for z in self.sizes if z not in SIZES]
            + [b for b in self.backgrounds if b not in BACKGROUNDS]
        )
        if unknown:
            raise ValueError(f"world {self.name!r}: unknown values {unknown}")
        if not (self.shapes and self.colors and self.sizes and self.backgrounds and self.object_counts):
            raise ValueError(f"world {self.name!r}: every value list needs at least one entry")
        if len(self.shapes) * len(self.colors) < 2 * max(n for n, _ in self.object_counts):
            raise ValueError(f"world {self.name!r}: too few (colour, shape) pairs for wrong-attribute texts")

    @property
    def smallest_size(self) -> str:
        return min(self.sizes, key=SIZES.__getitem__)


WORLDS: dict[str, World] = {
    "standard": World(
        name="standard",
        shapes=SHAPES,
        colors=tuple(COLORS),
        sizes=tuple(SIZES),
        backgrounds=tuple(BACKGROUNDS),
        object_counts=((1, 0.35), (2, 0.4), (3, 0.25)),
        description="7 shapes x 8 colours, 3 sizes, 1-3 objects on 5 textured backgrounds (the benchmarks)",
    ),
    "demo": World(
        name="demo",
        shapes=("circle", "square", "triangle", "star"),
        colors=("red", "yellow", "green", "blue"),
        sizes=("medium", "large"),
        backgrounds=("plain",),
        object_counts=((1, 0.6), (2, 0.4)),
        description="4 shapes x 4 colours, medium or large, 1-2 objects on plain backgrounds (the bootstrap demo)",
    ),
}
"""Named worlds. ``standard`` is the richer world of the benchmarks; ``demo`` is one a tiny model learns
in the few minutes the bootstrap demo has (fewer values, larger objects, no background texture)."""
DEFAULT_WORLD = "standard"


def get_world(name: str | World) -> World:
    """A preset by name (a World passes through); unknown names are a UserError."""
    if isinstance(name, World):
        return name
    if name not in WORLDS:
        raise UserError(f"world: unknown world {name!r}; choose one of {', '.join(WORLDS)}")
    return WORLDS[name]


_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "big"),
}

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "near the top", "at the top center"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom center"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}

_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# Fixed words of the human caption templates (see _human_caption); listed for all_words().
_HUMAN_TEMPLATE_WORDS = (
    "a an and on background against backdrop shapes there is in the picture shows with "
    "single drawing of to left right above below from top bottom next plus"
)

_WEB_CLUTTER: tuple[str, ...] = (
    "best wallpapers {year}",
    "free download",
    "stock photo",
    "hd wallpaper",
    "royalty free vector",
    "clipart png",
    "high quality print",
    "shop now",
    "poster art",
    "{year} design",
    "abstract art print",
    "desktop background",
)

_JUNK_SLOGANS: tuple[str, ...] = (
    "buy now free shipping",
    "limited offer 50% off today",
    "click here for more",
    "best price guaranteed",
    "sign up for our newsletter",
    "add to cart",
    "new arrivals in store now",
    "follow us for daily updates",
    "image not available",
    "untitled",
)

_JUNK_SEO: tuple[str, ...] = (
    "wallpaper background hd 4k free download abstract geometric design pattern art modern "
    "shapes desktop cool aesthetic cute simple minimal vector illustration texture graphic"
).split()
"""SEO filler. No colour or shape words here: junk must never describe an image by accident."""

_JUNK_FILENAMES: tuple[str, ...] = (
    "IMG_{n4}.jpg",
    "DSC{n5}.JPG",
    "image{n3}.png",
    "photo_{n4}.jpeg",
    "untitled-{n3}",
    "screenshot {year}-{n2}-{n2}",
)

NOISE_TYPES: tuple[str, ...] = ("clean", "mismatched", "junk", "wrong_attribute")
"""Ground-truth kinds of web text; every kind but ``clean`` is noise."""

_SPLIT_STREAM = {"web": 1, "human": 2, "test": 3}
"""Independent random streams per split: the test split never shares draws with training splits."""

_WORD_RE = re.compile(r"[a-z]+|\d")
"""How captions are cut into words for checking and for all_words(): lowercase runs, single digits."""


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SceneObject:
    """One object: the ground truth that captions must state.

    ``x``/``y`` (centre, fraction of the image side) and ``angle`` (degrees) only drive rendering;
    ``position`` is the grid cell that ``x``/``y`` fall in.
    """

    shape: str
    color: str
    size: str
    position: str
    x: float
    y: float
    angle: float

    @property
    def column(self) -> int:
        return POSITIONS[self.position][0]

    @property
    def row(self) -> int:
        return POSITIONS[self.position][1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Scene:
    """An image's ground truth: its objects, its background kind and the seed of its texture."""

    objects: tuple[SceneObject, ...]
    background: str
    texture_seed: int

    def pairs(self) -> frozenset[tuple[str, str]]:
        """The (colour, shape) pairs in the scene; distinct by construction."""
        return frozenset((o.color, o.shape) for o in self.objects)

    def objects_json(self) -> str:
        return json.dumps([o.to_dict() for o in self.objects])


def sample_scene(rng: np.random.Generator, world: World | str = DEFAULT_WORLD) -> Scene:
    """Draw the world's number of objects with distinct (colour, shape) pairs and no overlapping bounds.

    Objects are placed by rejection: a candidate whose bounding circle would touch an earlier
    object's is redrawn, and after repeated failures it is made the world's smallest size, which
    fits somewhere in a 3x3 grid holding at most two other objects.
    """
    world = get_world(world)
    counts = [n for n, _ in world.object_counts]
    n_objects = int(rng.choice(counts, p=[p for _, p in world.object_counts]))
    objects: list[SceneObject] = []
    size_names = list(world.sizes)
    position_names = list(POSITIONS)
    for _ in range(n_objects):
        while True:
            shape = world.shapes[int(rng.integers(len(world.shapes)))]
            color = world.colors[int(rng.integers(len(world.colors)))]
            if all((o.color, o.shape) != (color, shape) for o in objects):
                break
        for attempt in range(60):
            size = world.smallest_size if attempt >= 30 else size_names[int(rng.integers(len(size_names)))]
            position = position_names[int(rng.integers(len(position_names)))]
            radius = SIZES[size]
            col, row = POSITIONS[position]
            margin = radius + 0.02
            x = float(np.clip((col + 0.5) / 3 + rng.uniform(-0.04, 0.04), margin, 1 - margin))
            y = float(np.clip((row + 0.5) / 3 + rng.uniform(-0.04, 0.04), margin, 1 - margin))
            if all(math.hypot(x - o.x, y - o.y) >= radius + SIZES[o.size] for o in objects):
                break
        else:  # pragma: no cover - a 3x3 grid always has room for a small third object
            raise AssertionError("could not place an object")
        angle = float(rng.uniform(-12.0, 12.0))
        objects.append(
            SceneObject(
                shape=shape,
                color=color,
                size=size,
                position=position,
                x=round(x, 4),
                y=round(y, 4),
                angle=round(angle, 2),
            )
        )
    background = world.backgrounds[int(rng.integers(len(world.backgrounds)))]
    return Scene(objects=tuple(objects), background=background, texture_seed=int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation mid-tone colour, far from every object colour's lightness or saturation."""
    grey = rng.uniform(95, 165)
    tint = rng.uniform(-22, 22, size=3)
    return np.clip(grey + tint, 0, 255)


def _background(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (side, side, 3) texture; float32 throughout because this is the hot loop of synth."""
    base = _muted_color(rng).astype(np.float32)
    if kind == "plain":
        img = base + 3 * rng.standard_normal((side, side, 1), dtype=np.float32)
    elif kind == "noise":
        cells = side // 8 + 1
        coarse = 22 * rng.standard_normal((cells, cells, 1), dtype=np.float32)
        coarse = coarse.repeat(8, 0).repeat(8, 1)[:side, :side]
        img = base + coarse + 12 * rng.standard_normal((side, side, 1), dtype=np.float32)
    else:
        yy, xx = np.ogrid[0:side, 0:side]
        yy, xx = yy.astype(np.float32), xx.astype(np.float32)
        other = _muted_color(rng).astype(np.float32)
        if kind == "stripes":
            period = float(rng.uniform(10, 24))
            coord = (yy, xx, xx + yy)[int(rng.integers(3))]  # horizontal, vertical or diagonal
            t = np.floor(coord / period) % 2
        elif kind == "gradient":
            theta = rng.uniform(0, 2 * math.pi)
            t = xx * math.cos(theta) + yy * math.sin(theta)
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        elif kind == "checker":
            cell = int(rng.integers(12, 26))
            t = (yy // cell + xx // cell) % 2
            other = base * 0.8
        else:
            raise ValueError(f"unknown background kind {kind!r}")
        img = base + np.broadcast_to(t, (side, side))[..., None] * (other - base)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rotate(
    points: Iterable[tuple[float, float]], angle: float, cx: float, cy: float
) -> list[tuple[float, float]]:
    rad = math.radians(angle)
    c, s = math.cos(rad), math.sin(rad)
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in points]


def _outline(shape: str, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at the origin with half-extent ``r`` (y grows downwards)."""
    if shape == "square":
        k = r * 0.85
        return [(-k, -k), (k, -k), (k, k), (-k, k)]
    if shape == "triangle":
        return [(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)]
    if shape == "diamond":
        return [(0, -r), (r * 0.65, 0), (0, r), (-r * 0.65, 0)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.33
        return [
            (-t, -r),
            (t, -r),
            (t, -t),
            (r, -t),
            (r, t),
            (t, t),
            (t, r),
            (-t, r),
            (-t, t),
            (-r, t),
            (-r, -t),
            (-t, -t),
        ]
    if shape == "heart":
        pts = []
        for i in range(48):
            a = 2 * math.pi * i / 48
            hx = 16 * math.sin(a) ** 3
            hy = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)
            pts.append((hx / 17 * r, -(hy + 2.5) / 15 * r))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, *, size: int = 96) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` x ``size`` pixels.

    Drawn at twice the size and downsampled, which anti-aliases the edges; each object gets a
    darker (or, for black, lighter) outline so it reads on any background.
    """
    side = 2 * size
    rng = np.random.default_rng(scene.texture_seed)
    canvas = Image.fromarray(_background(scene.background, side, rng))
    draw = ImageDraw.Draw(canvas)
    width = max(2, side // 96)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        edge = (110, 110, 110) if obj.color == "black" else tuple(int(c * 0.5) for c in fill)
        r = SIZES[obj.size] * side
        cx, cy = obj.x * side, obj.y * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=edge, width=width)
        else:
            draw.polygon(
                _rotate(_outline(obj.shape, r), obj.angle, cx, cy), fill=fill, outline=edge, width=width
            )
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def encode_jpeg(image: Image.Image, *, quality: int = 90) -> bytes:
    buf = BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(
    obj: SceneObject,
    rng: np.random.Generator,
    *,
    sized: bool = False,
    placed: bool = False,
    article: bool = True,
) -> str:
    """'a small red circle at the top left' and its shorter forms; colour always binds the shape."""
    words = f"{obj.color} {obj.shape}"
    if sized and (obj.size != "medium" or rng.random() < 0.3):
        words = f"{_pick(rng, _SIZE_WORDS[obj.size])} {words}"
    phrase = _with_article(words) if article else words
    if placed:
        phrase = f"{phrase} {_pick(rng, _POSITION_PHRASES[obj.position])}"
    return phrase


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _shuffled(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[SceneObject]:
    return [objects[i] for i in rng.permutation(len(objects))]


def _relational(scene: Scene, rng: np.random.Generator) -> str | None:
    """'A to the left of B' or 'A above B' for a pair whose grid cells make it true, else None."""
    objs = _shuffled(scene.objects, rng)
    for a in objs:
        for b in objs:
            if a is b:
                continue
            rest = [o for o in objs if o is not a and o is not b]
            tail = f", plus {_noun_phrase(rest[0], rng)}" if rest else ""
            if a.column < b.column:
                return f"{_noun_phrase(a, rng, sized=True)} to the left of {_noun_phrase(b, rng)}{tail}"
            if a.row < b.row:
                return f"{_noun_phrase(a, rng, sized=True)} above {_noun_phrase(b, rng)}{tail}"
    return None


def _human_templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Every applicable reference-caption style for a scene, in a fixed order."""
    objs = list(scene.objects)
    n = len(objs)
    bg = _pick(rng, BACKGROUNDS[scene.background])

    def listed(
        *, sized: bool = False, placed: bool = False, order: Sequence[SceneObject] | None = None
    ) -> str:
        order = _shuffled(objs, rng) if order is None else order
        return _join([_noun_phrase(o, rng, sized=sized, placed=placed) for o in order])

    out = [
        f"{listed()} on {_with_article(bg)} background",
        (
            f"{_COUNT_WORDS[n]} shapes: {listed(sized=True)}"
            if n > 1
            else f"a single {_noun_phrase(objs[0], rng, sized=True, article=False)} on {_with_article(bg)} background"
        ),
        listed(sized=True, placed=True),
        f"{listed(sized=True)} against {_with_article(bg)} backdrop",
        f"there is {listed()} in the picture"
        if rng.random() < 0.5
        else f"the picture shows {listed(placed=True)}",
        f"{_with_article(bg)} background with {listed(sized=True)}",
        f"a drawing of {listed()}",
    ]
    relation = _relational(scene, rng)
    if relation is not None:
        out.append(relation)
    columns = [o.column for o in objs]
    if n > 1 and len(set(columns)) == n:
        out.append(f"from left to right: {listed(order=sorted(objs, key=lambda o: o.column))}")
    return out


def human_captions(scene: Scene, rng: np.random.Generator, *, count: int = 5) -> list[str]:
    """``count`` reference captions in distinct styles; each names every object's colour and shape."""
    templates = _human_templates(scene, rng)
    chosen = rng.choice(len(templates), size=min(count, len(templates)), replace=False)
    captions = [templates[int(i)] for i in chosen]
    while len(captions) < count:  # only when count exceeds the number of styles
        captions.append(_pick(rng, _human_templates(scene, rng)))
    return captions


def _fill_numbers(template: str, rng: np.random.Generator) -> str:
    return template.format(
        year=int(rng.integers(2012, 2025)),
        n2=f"{int(rng.integers(1, 29)):02d}",
        n3=int(rng.integers(1, 1000)),
        n4=f"{int(rng.integers(0, 10000)):04d}",
        n5=f"{int(rng.integers(0, 100000)):05d}",
    )


def web_text(scene: Scene, rng: np.random.Generator) -> str:
    """A truthful but web-styled text: terse, sometimes title-cased, often with shop/SEO clutter.

    It names every object's colour and shape (so it passes :func:`check_caption`) and nothing else
    that the check would read as an object.
    """
    objs = _shuffled(scene.objects, rng)
    bare = [f"{o.color} {o.shape}" for o in objs]
    clutter = _fill_numbers(_pick(rng, _WEB_CLUTTER), rng)
    style = int(rng.integers(7))
    if style == 0:
        text = " and ".join(bare)
    elif style == 1:
        text = f"{', '.join(bare)} | {clutter}"
    elif style == 2:
        text = f"{' '.join(bare).title()} - {clutter.title()}"
    elif style == 3:
        text = _join([_with_article(b) for b in bare])
    elif style == 4:
        text = f"{', '.join(bare)} {clutter}"
    elif style == 5:
        text = f"{clutter}: {' and '.join(bare)}"
    else:
        text = f"{' and '.join(bare)} on {_pick(rng, BACKGROUNDS[scene.background])} background"
    return text


def junk_text(rng: np.random.Generator) -> str:
    """Alt-text junk that describes no image: a file name, a shop slogan, or an SEO word list."""
    kind = int(rng.integers(3))
    if kind == 0:
        return _fill_numbers(_pick(rng, _JUNK_FILENAMES), rng)
    if kind == 1:
        return _pick(rng, _JUNK_SLOGANS)
    words = rng.choice(len(_JUNK_SEO), size=int(rng.integers(4, 9)), replace=False)
    return " ".join(_JUNK_SEO[int(i)] for i in words)


def wrong_attribute_scene(
    scene: Scene, rng: np.random.Generator, world: World | str = DEFAULT_WORLD
) -> Scene:
    """The scene with one object's colour (60%) or shape (40%) changed to another value of the world
    that makes a (colour, shape) pair not in the scene."""
    world = get_world(world)
    idx = int(rng.integers(len(scene.objects)))
    obj = scene.objects[idx]
    taken = scene.pairs()
    if rng.random() < 0.6:
        options = [c for c in world.colors if c != obj.color and (c, obj.shape) not in taken]
        new = replace(obj, color=_pick(rng, options))
    else:
        options = [s for s in world.shapes if s != obj.shape and (obj.color, s) not in taken]
        new = replace(obj, shape=_pick(rng, options))
    objects = list(scene.objects)
    objects[idx] = new
    return replace(scene, objects=tuple(objects))


def all_words() -> list[str]:
    """Every word (as cut by ``[a-z]+|\\d``, lowercased) that any caption or web text can contain.

    Numbers in file names and years come out as single digits, so ``0``..``9`` stand for them.
    Feed this to a tokenizer trainer together with the corpus texts to guarantee no [UNK].
    """
    parts: list[str] = [
        " ".join(SHAPES),
        " ".join(COLORS),
        _HUMAN_TEMPLATE_WORDS,
        " ".join(_JUNK_SEO),
        " ".join(_COUNT_WORDS.values()),
        "0 1 2 3 4 5 6 7 8 9",
    ]
    for group in (BACKGROUNDS, _SIZE_WORDS, _POSITION_PHRASES):
        parts.extend(" ".join(v) for v in group.values())
    parts.extend(_WEB_CLUTTER + _JUNK_SLOGANS + _JUNK_FILENAMES)
    words = set()
    for part in parts:
        words.update(_WORD_RE.findall(re.sub(r"\{\w+\}", " ", part).lower()))
    return sorted(words)


# --------------------------------------------------------------------------------------------------
# The attribute check
# --------------------------------------------------------------------------------------------------

_SHAPE_FORMS: dict[str, str] = {s: s for s in SHAPES} | {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "stars": "star",
    "crosses": "cross",
    "diamonds": "diamond",
    "hearts": "heart",
}
_BINDING_WINDOW = 3
"""A colour binds a shape word when it is at most this many words before it ('red small circle')."""


def caption_pairs(caption: str) -> list[tuple[str | None, str]]:
    """The (colour, shape) pairs a caption states, in order; colour None for a bare shape word.

    A colour binds the nearest shape word after it, within three words and with no other shape word
    between them: "a small red circle and a blue square" -> [(red, circle), (blue, square)].
    Plural shape words count as their singular.
    """
    words = _WORD_RE.findall(caption.lower())
    pairs: list[tuple[str | None, str]] = []
    for i, word in enumerate(words):
        shape = _SHAPE_FORMS.get(word)
        if shape is None:
            continue
        color = None
        for j in range(i - 1, max(-1, i - 1 - _BINDING_WINDOW), -1):
            if words[j] in _SHAPE_FORMS:
                break
            if words[j] in COLORS:
                color = words[j]
                break
        pairs.append((color, shape))
    return pairs


def _as_objects(objects: Sequence[SceneObject | Mapping[str, Any]] | str) -> list[tuple[str, str]]:
    if isinstance(objects, str):
        objects = json.loads(objects)
    out = []
    for o in objects:
        if isinstance(o, SceneObject):
            out.append((o.color, o.shape))
        else:
            out.append((str(o["color"]), str(o["shape"])))
    return out


def check_caption(
    caption: str, objects: Sequence[SceneObject | Mapping[str, Any]] | str, *, strict: bool = True
) -> bool:
    """True iff the caption names the right colour and shape for every object in the image.

    ``objects``: SceneObjects, dicts with ``color`` and ``shape``, or the JSON string stored in the
    corpus tables. Colours must be bound to their shapes (see :func:`caption_pairs`): "a blue circle
    and a red square" fails for {red circle, blue square}. Counts, sizes, positions and background
    words are not checked. With ``strict`` (the default) the caption must also not mention a shape
    the image lacks or a shape without its colour, so a hallucinated extra object fails too.
    """
    truth = set(_as_objects(objects))
    stated = caption_pairs(caption)
    if not truth.issubset(set(stated)):
        return False
    return not strict or all(pair in truth for pair in stated)


def attribute_accuracy(captions: Sequence[str], objects_list: Sequence[Any]) -> float:
    """Share of captions that pass :func:`check_caption` against their own image's objects."""
    if len(captions) != len(objects_list):
        raise ValueError(f"{len(captions)} captions for {len(objects_list)} object lists")
    if not captions:
        raise ValueError("attribute_accuracy needs at least one caption")
    return sum(check_caption(c, o) for c, o in zip(captions, objects_list, strict=True)) / len(captions)


# --------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------


def _item_rng(seed: int, split: str, index: int, purpose: int = 0) -> np.random.Generator:
    """A generator that depends on (seed, split, index, purpose) only: order and workers do not matter."""
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index, purpose])


def _key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def describe(
    seed: int, split: str, index: int, world: World | str = DEFAULT_WORLD
) -> tuple[Scene, list[str]]:
    """An item's scene and texts (5 references, or the one truthful web text); cheap, no pixels."""
    rng = _item_rng(seed, split, index)
    scene = sample_scene(rng, world)
    texts = [web_text(scene, rng)] if split == "web" else human_captions(scene, rng)
    return scene, texts


def _render_jpeg(job: tuple[Scene, int]) -> bytes:
    """Worker: the JPEG of one scene (rendering is the only costly step, so only it is farmed out)."""
    scene, size = job
    return encode_jpeg(render(scene, size=size))


def _assign_noise(n: int, noise: float, rng: np.random.Generator) -> list[str]:
    """Exactly round(noise * n) noisy rows, split as evenly as possible among the three noise types."""
    n_noisy = round(noise * n)
    kinds = ["mismatched", "junk", "wrong_attribute"] if n > 1 else ["junk", "wrong_attribute"]
    labels = ["clean"] * n
    order = rng.permutation(n)
    for rank, idx in enumerate(order[:n_noisy]):
        labels[int(idx)] = kinds[rank % len(kinds)]
    return labels


def _noisy_web_texts(
    scenes: Sequence[Scene], clean: Sequence[str], seed: int, noise: float, world: World | str = DEFAULT_WORLD
) -> tuple[list[str], list[str], list[int | None]]:
    """Replace a share of the web texts by noise; returns texts, noise types and source indices.

    The source index is the image the text was written for: itself for clean and wrong-attribute
    texts, the donor image for mismatched ones (whose objects always differ), None for junk.
    """
    n = len(scenes)
    labels = _assign_noise(n, noise, np.random.default_rng([seed, _SPLIT_STREAM["web"], 0, 1]))
    texts, sources = list(clean), list[int | None](range(n))
    for i, label in enumerate(labels):
        rng = _item_rng(seed, "web", i, purpose=2)
        if label == "junk":
            texts[i], sources[i] = junk_text(rng), None
        elif label == "wrong_attribute":
            texts[i] = web_text(wrong_attribute_scene(scenes[i], rng, world), rng)
        elif label == "mismatched":
            donor = _donor(scenes, i, rng)
            if donor is None:  # every other image shows the same objects: no text can mismatch
                labels[i] = "junk"
                texts[i], sources[i] = junk_text(rng), None
            else:
                texts[i], sources[i] = clean[donor], donor
    return texts, labels, sources


def _donor(scenes: Sequence[Scene], i: int, rng: np.random.Generator) -> int | None:
    """A random other image whose objects differ from image i's, None if there is none."""

    def differs(j: int) -> bool:
        return j != i and scenes[j].pairs() != scenes[i].pairs()

    for _ in range(64):
        j = int(rng.integers(len(scenes)))
        if differs(j):
            return j
    return next((j for j in range(len(scenes)) if differs(j)), None)


def _default_workers(total: int) -> int:
    return 1 if total < 1500 else max(1, min(os.cpu_count() or 1, 8))


_ROW_GROUP = 2048
"""Rows per Parquet row group, and per batch held in memory while writing a split."""


class _Renderer:
    """Renders JPEGs in order, in this process or in a spawned pool shared by all splits."""

    def __init__(self, *, workers: int) -> None:
        self._pool = None
        if workers > 1:
            import multiprocessing

            # spawn: safe whatever threads the parent runs (Ray, tqdm); imap keeps results in order
            self._pool = multiprocessing.get_context("spawn").Pool(workers)

    def jpegs(self, scenes: Sequence[Scene], size: int) -> Iterator[bytes]:
        jobs = [(scene, size) for scene in scenes]
        if self._pool is None:
            return map(_render_jpeg, jobs)
        return self._pool.imap(_render_jpeg, jobs, chunksize=64)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()


def _write_split(
    out: Path,
    split: str,
    count: int,
    *,
    seed: int,
    size: int,
    noise: float,
    world: World,
    renderer: _Renderer,
    progress: bool,
) -> dict[str, Any]:
    """Describe every item, add web noise, then render and write images and table batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    described = [describe(seed, split, i, world) for i in range(count)]
    scenes = [scene for scene, _ in described]
    keys = [_key(split, i) for i in range(count)]
    paths = [f"images/{split}/{key}.jpg" for key in keys]
    fields: list[tuple[str, pa.DataType]] = [
        ("key", pa.string()),
        ("image_path", pa.string()),
        ("image", pa.binary()),
    ]
    columns: dict[str, list[Any]] = {"key": keys, "image_path": paths}
    summary: dict[str, Any] = {"images": count}
    if split == "web":
        texts, labels, sources = _noisy_web_texts(
            scenes, [texts[0] for _, texts in described], seed, noise, world
        )
        noisy = [label != "clean" for label in labels]
        columns |= {
            "text": texts,
            "noise_type": labels,
            "noisy": noisy,
            "source_key": [None if s is None else keys[s] for s in sources],
        }
        fields += [
            ("text", pa.string()),
            ("noise_type", pa.string()),
            ("noisy", pa.bool_()),
            ("source_key", pa.string()),
        ]
        counts = {kind: labels.count(kind) for kind in NOISE_TYPES}
        summary |= {"noisy": count - counts["clean"], "noise_types": counts}
        urls = pa.table({"path": paths, "TEXT": texts, "key": keys, "noise_type": labels, "noisy": noisy})
        pq.write_table(urls, out / "urls.parquet")
    else:
        columns["captions"] = [texts for _, texts in described]
        fields.append(("captions", pa.list_(pa.string())))
    columns["objects"] = [scene.objects_json() for scene in scenes]
    columns["background"] = [scene.background for scene in scenes]
    fields += [("objects", pa.string()), ("background", pa.string())]
    schema = pa.schema(fields)

    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    jpegs = renderer.jpegs(scenes, size)
    with (
        pq.ParquetWriter(out / f"{split}.parquet", schema) as writer,
        tqdm(total=count, desc=f"synth {split}", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, count, _ROW_GROUP):
            stop = min(start + _ROW_GROUP, count)
            batch_images = []
            for i in range(start, stop):
                jpeg = next(jpegs)
                (out / paths[i]).write_bytes(jpeg)
                batch_images.append(jpeg)
                bar.update()
            batch = {name: columns[name][start:stop] for name in schema.names if name != "image"}
            batch["image"] = batch_images
            writer.write_table(
                pa.table({f.name: pa.array(batch[f.name], type=f.type) for f in schema}, schema=schema)
            )
        if count == 0:
            writer.write_table(schema.empty_table())
    return summary


def make_corpus(
    out: Path,
    *,
    images: int,
    seed: int,
    noise: float = 0.4,
    size: int = 96,
    human_fraction: float = 1 / 3,
    human_images: int | None = None,
    test_images: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    world: str = DEFAULT_WORLD,
) -> dict[str, Any]:
    """Write a synthetic corpus to ``out`` and return its summary (also written to corpus.json).

    Split sizes: ``images`` web images (the noisy pairs CapFilt cleans); human images =
    ``human_images`` if given, else round(images * human_fraction) (the COCO stand-in that trains
    the captioner and filter); test images = ``test_images`` if given, else max(100, images // 10)
    (held out, drawn from its own random stream, never smaller than 100 so metrics mean something).
    ``workers``: render processes (default: 1 below 1,500 images, else the CPU count up to 8).
    ``world``: a preset of :data:`WORLDS` (``standard``: the benchmarks' world; ``demo``: fewer
    values and plain backgrounds, for the bootstrap demo).

    Layout of ``out``:

    * ``images/{web,human,test}/KEY.jpg`` (keys ``web-000000``, ``human-000000``, ...);
    * ``human.parquet`` and ``test.parquet``: key, image_path (relative to ``out``), image (JPEG
      bytes), captions (list of 5), objects (JSON list of {shape, color, size, position, x, y,
      angle}), background;
    * ``web.parquet``: key, image_path, image, text, noise_type (clean | mismatched | junk |
      wrong_attribute), noisy (bool), source_key (the image the text describes: itself,
      the donor for mismatched, null for junk), objects, background;
    * ``urls.parquet``: path (URL path of the web image relative to a server rooted at ``out``),
      TEXT, key, noise_type, noisy. It holds no host, because the server's port is only known
      when it starts: :func:`url_list` turns it into a LAION-style ``URL``/``TEXT`` file for a
      given base URL;
    * ``corpus.json``: the returned summary without timing.

    Deterministic: the same arguments give byte-identical files, whatever ``workers``. Memory holds
    every scene and text (small) but only one row group of image bytes at a time.
    """
    if images < 1:
        raise UserError(f"images: must be at least 1, got {images}")
    the_world = get_world(world)
    if seed < 0:
        raise UserError(f"seed: must not be negative, got {seed}")
    if not 0.0 <= noise <= 1.0:
        raise UserError(f"noise: must be between 0 and 1, got {noise}")
    if size < 16:
        raise UserError(f"size: must be at least 16 pixels, got {size}")
    if human_fraction < 0:
        raise UserError(f"human_fraction: must not be negative, got {human_fraction}")
    n_human = round(images * human_fraction) if human_images is None else human_images
    n_test = max(100, images // 10) if test_images is None else test_images
    if n_human < 0:
        raise UserError(f"human_images: must not be negative, got {n_human}")
    if n_test < 0:
        raise UserError(f"test_images: must not be negative, got {n_test}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    workers = _default_workers(images + n_human + n_test) if workers is None else max(1, workers)
    started = time.perf_counter()

    summary: dict[str, Any] = {"seed": seed, "size": size, "noise": noise, "world": the_world.name}
    renderer = _Renderer(workers=workers)
    try:
        for split, count in (("web", images), ("human", n_human), ("test", n_test)):
            summary[split] = _write_split(
                out,
                split,
                count,
                seed=seed,
                size=size,
                noise=noise,
                world=the_world,
                renderer=renderer,
                progress=progress,
            )
    finally:
        renderer.close()
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "seconds": round(time.perf_counter() - started, 2), "dir": str(out)}


def url_list(corpus_dir: Path, base_url: str, out: Path | None = None) -> Path:
    """Write a LAION-style URL list for the corpus's web images as served from ``base_url``.

    ``base_url`` is the root of a server over ``corpus_dir`` (e.g. what
    :func:`capfilt.serve.serve_directory` yields). Writes ``URL``, ``TEXT``, ``key``,
    ``noise_type``, ``noisy`` to ``out`` (default ``corpus_dir/urls_served.parquet``) and returns it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus_dir = Path(corpus_dir)
    source = corpus_dir / "urls.parquet"
    if not source.is_file():
        raise UserError(f"corpus_dir: {source} not found; run `capfilt synth` first")
    table = pq.read_table(source)
    if "path" not in table.column_names:
        raise UserError(f"corpus_dir: {source} has no 'path' column; is {corpus_dir} a synth corpus?")
    root = base_url.rstrip("/")
    urls = [f"{root}/{p}" for p in table.column("path").to_pylist()]
    table = table.drop_columns(["path"])
    table = table.add_column(0, "URL", pa.array(urls, type=pa.string()))
    target = corpus_dir / "urls_served.parquet" if out is None else Path(out)
    pq.write_table(table, target)
    return target
