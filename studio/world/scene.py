"""The shapes world: a deterministic, seeded renderer of 64x64 scenes with template captions.

A scene is a background (a solid colour or a two-colour texture) and one or two objects. An object is a basic shape
(circle, square, ...), a generic member of a class (toy, emblem, pattern) or a concept (a novel object, see
`studio.world.concepts`). Because every image is rendered from a `Scene`, the ground truth of every image is known.

>>> from studio.world.scene import Scene, ObjectSpec, render, caption_for
>>> scene = Scene(background="blue", objects=(ObjectSpec(shape="circle", colour="red"),))
>>> caption_for(scene)
'a red circle on a blue background'
>>> render(scene).size
(64, 64)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
# Draw on a canvas this many times larger and downsample: smooth edges without an anti-aliasing renderer.
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (35, 75, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
TEXTURES: dict[str, str] = {"stripes": "striped", "dots": "dotted", "checkers": "checkered"}
BACKGROUNDS: tuple[str, ...] = tuple(COLOURS) + tuple(TEXTURES)
# Class nouns with generic members in the world, so that prior preservation and initialising a new word from its
# class have something to preserve. "object" is the hypernym of everything.
CLASS_NOUNS: tuple[str, ...] = ("toy", "emblem", "pattern", "object")
SIZES: dict[str, float] = {"small": 0.15, "medium": 0.22, "large": 0.30}
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
# Shapes that concepts may use but the base vocabulary never names (novel to the base model).
EXTRA_SHAPES: tuple[str, ...] = ("hexagon", "diamond", "crescent", "heart", "arrow", "pentagon")


@dataclass(frozen=True)
class ObjectSpec:
    """One object in a scene.

    ``shape`` is a basic or extra shape, or a class noun (``toy``, ``emblem``, ``pattern``) whose look is given by
    ``parts``; ``colour`` is the main colour (a palette name or an ``(r, g, b)`` tuple), ``size`` and ``position`` are
    names from `SIZES` and `POSITIONS`, ``offset`` a small jitter in image fractions.
    """

    shape: str
    colour: str | tuple[int, int, int]
    size: str = "medium"
    position: str = "center"
    offset: tuple[float, float] = (0.0, 0.0)
    # Secondary colours and style choices for composite objects (toys, emblems, patterns, concepts).
    parts: tuple[tuple[str, str | tuple[int, int, int]], ...] = ()
    # Name of the concept this object renders, if any (for ground truth only).
    concept: str | None = None


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects."""

    background: str
    objects: tuple[ObjectSpec, ...]
    # The two colours of a textured background (ignored for solid ones).
    texture_colours: tuple[str, str] = ("white", "gray")
    # How the caption is phrased: "full", "no_background", "no_colour", "class", "bare".
    caption_style: str = "full"
    extra: dict[str, str] = field(default_factory=dict)


def rgb(colour: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """Return the RGB value of a palette name or pass a tuple through."""
    if isinstance(colour, tuple):
        return colour
    return COLOURS[colour]


# ---------------------------------------------------------------------------------------------------------------------
# Drawing


def _regular_polygon(
    cx: float, cy: float, r: float, n: int, rotation: float = -math.pi / 2
) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / n), cy + r * math.sin(rotation + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
    hole: tuple[int, int, int] | None = None,
) -> None:
    """Draw one basic or extra shape centred at (cx, cy) with 'radius' r (canvas pixels)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, int(r * 0.38)))
    elif shape == "cross":
        w = r * 0.34
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_regular_polygon(cx, cy, r, 5), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.1), (cx + r * 0.75, cy), (cx, cy + r * 1.1), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        cut = hole if hole is not None else (0, 0, 0)
        draw.ellipse((cx - r * 0.45, cy - r * 1.05, cx + r * 1.3, cy + r * 0.75), fill=cut)
    elif shape == "heart":
        rr = r * 0.52
        draw.ellipse((cx - 2 * rr, cy - rr * 1.5, cx, cy + rr * 0.5), fill=fill)
        draw.ellipse((cx, cy - rr * 1.5, cx + 2 * rr, cy + rr * 0.5), fill=fill)
        draw.polygon([(cx - 1.95 * rr, cy - rr * 0.3), (cx + 1.95 * rr, cy - rr * 0.3), (cx, cy + r)], fill=fill)
    elif shape == "arrow":
        w = r * 0.3
        draw.rectangle((cx - r, cy - w, cx + r * 0.2, cy + w), fill=fill)
        draw.polygon([(cx + r * 0.1, cy - r * 0.75), (cx + r, cy), (cx + r * 0.1, cy + r * 0.75)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_texture_fill(
    canvas: Image.Image,
    box: tuple[int, int, int, int],
    texture: str,
    colours: tuple[tuple[int, int, int], tuple[int, int, int]],
    period: int,
) -> None:
    """Fill a box of the canvas with a two-colour texture."""
    x0, y0, x1, y1 = box
    draw = ImageDraw.Draw(canvas)
    draw.rectangle(box, fill=colours[0])
    if texture == "stripes":
        for x in range(x0, x1, period):
            draw.rectangle((x, y0, x + period // 2 - 1, y1), fill=colours[1])
    elif texture == "dots":
        r = period * 0.22
        for y in range(y0 + period // 2, y1, period):
            for x in range(x0 + period // 2, x1, period):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colours[1])
    elif texture == "checkers":
        for j, y in enumerate(range(y0, y1, period // 2)):
            for i, x in enumerate(range(x0, x1, period // 2)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + period // 2 - 1, y + period // 2 - 1), fill=colours[1])
    elif texture == "diagonal":
        for k in range(-(y1 - y0), x1 - x0, period):
            draw.polygon(
                [
                    (x0 + k, y0),
                    (x0 + k + period // 2, y0),
                    (x0 + k + period // 2 + (y1 - y0), y1),
                    (x0 + k + (y1 - y0), y1),
                ],
                fill=colours[1],
            )
    else:
        raise ValueError(f"unknown texture {texture!r}")


def _draw_object(canvas: Image.Image, obj: ObjectSpec, background_rgb: tuple[int, int, int]) -> None:
    S = canvas.size[0]
    px, py = POSITIONS[obj.position]
    cx, cy = (px + obj.offset[0]) * S, (py + obj.offset[1]) * S
    r = SIZES[obj.size] * S
    draw = ImageDraw.Draw(canvas)
    main = rgb(obj.colour)
    parts = dict(obj.parts)
    if obj.shape == "toy":
        # A toy figure: a body, a head on top and two feet; the body shape and part colours vary.
        body = str(parts.get("body", "square"))
        head = rgb(parts.get("head", "white"))
        feet = rgb(parts.get("feet", "black"))
        br = r * 0.62
        by = cy + r * 0.12
        _draw_shape(draw, "square" if body == "square" else body, cx, by, br, main, background_rgb)
        hr = r * 0.36
        _draw_shape(draw, str(parts.get("head_shape", "circle")), cx, by - br - hr * 0.85, hr, head, background_rgb)
        fw = r * 0.2
        for sx in (-1, 1):
            fx = cx + sx * br * 0.55
            draw.rectangle((fx - fw, by + br * 0.85, fx + fw, by + br * 0.85 + fw * 1.6), fill=feet)
    elif obj.shape == "emblem":
        # An emblem: an outer plate of the main colour with a border and an inner symbol.
        outer = str(parts.get("outer", "circle"))
        inner = str(parts.get("inner", "star"))
        border = rgb(parts.get("border", main))
        _draw_shape(draw, outer, cx, cy, r * 1.05, border, background_rgb)
        _draw_shape(draw, outer, cx, cy, r * 0.88, main, background_rgb)
        _draw_shape(draw, inner, cx, cy, r * 0.5, rgb(parts.get("symbol", "white")), main)
    elif obj.shape == "pattern":
        # A patterned tile: a square of two-colour texture.
        texture = str(parts.get("texture", "stripes"))
        second = rgb(parts.get("second", "white"))
        s = int(r * 0.95)
        _draw_texture_fill(
            canvas, (int(cx - s), int(cy - s), int(cx + s), int(cy + s)), texture, (main, second), max(8, int(S * 0.09))
        )
    else:
        # Basic and extra shapes; concepts may add an inner symbol of another colour.
        hole = background_rgb
        _draw_shape(draw, obj.shape, cx, cy, r, main, hole)
        if "inner" in parts:
            _draw_shape(
                draw,
                str(parts["inner"]),
                cx,
                cy,
                r * float(parts.get("inner_scale", "0.45")),
                rgb(parts.get("symbol", "white")),
                main,
            )


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene to an RGB image of ``size`` x ``size`` pixels."""
    S = size * SUPERSAMPLE
    canvas = Image.new("RGB", (S, S))
    if scene.background in TEXTURES:
        colours = (rgb(scene.texture_colours[0]), rgb(scene.texture_colours[1]))
        _draw_texture_fill(canvas, (0, 0, S, S), scene.background, colours, S // 6)
        background_rgb = colours[0]
    else:
        background_rgb = rgb(scene.background)
        canvas.paste(background_rgb, (0, 0, S, S))
    for obj in scene.objects:
        _draw_object(canvas, obj, background_rgb)
    return canvas.resize((size, size), Image.Resampling.BOX)


def render_array(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene to a uint8 HWC array."""
    return np.asarray(render(scene, size))


# ---------------------------------------------------------------------------------------------------------------------
# Captions


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def background_phrase(background: str) -> str:
    """'blue' -> 'blue', 'stripes' -> 'striped'."""
    return TEXTURES.get(background, background)


def object_phrase(
    obj: ObjectSpec, *, with_colour: bool = True, with_size: bool = False, noun: str | None = None
) -> str:
    words = []
    if with_size and obj.size != "medium":
        words.append(obj.size)
    if with_colour and isinstance(obj.colour, str):
        words.append(obj.colour)
    words.append(noun or obj.shape)
    return f"{article(words[0])} {' '.join(words)}"


def caption_for(scene: Scene) -> str:
    """The caption of a scene in its `caption_style`.

    The full style of a single object is exactly "a {colour} {shape} on a {colour} background".
    """
    bg = background_phrase(scene.background)
    style = scene.caption_style
    if len(scene.objects) == 2:
        a, b = scene.objects
        return f"{object_phrase(a)} and {object_phrase(b)} on {article(bg)} {bg} background"
    (obj,) = scene.objects
    if style == "full":
        return f"{object_phrase(obj)} on {article(bg)} {bg} background"
    if style == "sized":
        return f"{object_phrase(obj, with_size=True)} on {article(bg)} {bg} background"
    if style == "placed":
        return f"{object_phrase(obj)} at the {obj.position} on {article(bg)} {bg} background"
    if style == "no_background":
        return object_phrase(obj)
    if style == "no_colour":
        return f"{object_phrase(obj, with_colour=False)} on {article(bg)} {bg} background"
    if style == "object":
        # The hypernym: any object may be called "an object".
        return f"{object_phrase(obj, noun='object')} on {article(bg)} {bg} background"
    if style == "bare":
        return object_phrase(obj, with_colour=False)
    raise ValueError(f"unknown caption style {style!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Random scenes


def _pick_other(rng: random.Random, options: Sequence[str], exclude: Sequence[str]) -> str:
    choices = [o for o in options if o not in exclude]
    return rng.choice(choices)


def random_generic(rng: random.Random, kind: str, colour: str, background_colours: Sequence[str]) -> ObjectSpec:
    """A generic member of a class noun, with a varied look (so the class word means something)."""
    palette = list(COLOURS)
    if kind == "toy":
        parts = (
            ("body", rng.choice(["square", "circle", "triangle"])),
            ("head", _pick_other(rng, palette, [colour, *background_colours])),
            ("head_shape", rng.choice(["circle", "square"])),
            ("feet", _pick_other(rng, palette, [colour, *background_colours])),
        )
    elif kind == "emblem":
        parts = (
            ("outer", rng.choice(["circle", "square"])),
            ("inner", rng.choice(["star", "cross", "circle", "triangle"])),
            ("symbol", _pick_other(rng, palette, [colour])),
            ("border", _pick_other(rng, palette, [colour, *background_colours])),
        )
    elif kind == "pattern":
        parts = (
            ("texture", rng.choice(list(TEXTURES))),
            ("second", _pick_other(rng, palette, [colour, *background_colours])),
        )
    else:
        raise ValueError(f"not a class noun with generic members: {kind!r}")
    return ObjectSpec(shape=kind, colour=colour, size=rng.choice(["medium", "large"]), parts=parts)


def is_held_out(shape: str, colour: str, background: str) -> bool:
    """About 12% of (shape, colour, background) triples never appear together in the base model's training data.

    Prompt compliance is measured on them, so it measures composition rather than memory.
    """
    key = f"{shape}|{colour}|{background}"
    h = 0
    for ch in key:
        h = (h * 131 + ord(ch)) % 1_000_003
    return h % 8 == 0


def random_scene(
    rng: random.Random, *, allow_held_out: bool = False, two_object_prob: float = 0.2, class_prob: float = 0.15
) -> Scene:
    """Draw a random training scene (held-out triples excluded unless ``allow_held_out``)."""
    palette = list(COLOURS)
    while True:
        # Mostly solid backgrounds: textures are the hardest thing for a tiny model to draw and the least useful.
        background = rng.choice(list(COLOURS)) if rng.random() < 0.85 else rng.choice(list(TEXTURES))
        texture_colours = tuple(rng.sample(palette, 2)) if background in TEXTURES else ("white", "gray")
        bg_colours = list(texture_colours) if background in TEXTURES else [background]
        if rng.random() < two_object_prob:
            shapes = rng.sample(SHAPES, 2)
            colours = [_pick_other(rng, palette, bg_colours) for _ in shapes]
            if colours[0] == colours[1] and rng.random() < 0.7:
                colours[1] = _pick_other(rng, palette, [*bg_colours, colours[0]])
            left_right = rng.random() < 0.5
            slots = ("left", "right") if left_right else ("top", "bottom")
            objects = tuple(
                ObjectSpec(
                    shape=s,
                    colour=c,
                    size="small",
                    position=p,
                    offset=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
                )
                for s, c, p in zip(shapes, colours, slots, strict=True)
            )
            if not allow_held_out and any(is_held_out(o.shape, str(o.colour), background) for o in objects):
                continue
            return Scene(background=background, objects=objects, texture_colours=texture_colours)  # type: ignore[arg-type]
        colour = _pick_other(rng, palette, bg_colours)
        position = rng.choice(list(POSITIONS)) if rng.random() < 0.5 else "center"
        size = rng.choice(list(SIZES))
        offset = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
        if rng.random() < class_prob:
            kind = rng.choice(["toy", "emblem", "pattern"])
            obj = random_generic(rng, kind, colour, bg_colours)
            obj = replace(obj, position=position if obj.size != "large" else "center", offset=offset)
            style = rng.choice(["full", "full", "no_background", "no_colour", "object"])
            return Scene(background=background, objects=(obj,), texture_colours=texture_colours, caption_style=style)  # type: ignore[arg-type]
        shape = rng.choice(SHAPES)
        if not allow_held_out and is_held_out(shape, colour, background):
            continue
        if size == "large":
            position = "center"
        obj = ObjectSpec(shape=shape, colour=colour, size=size, position=position, offset=offset)
        style = rng.choices(
            ["full", "sized", "placed", "no_background", "no_colour", "object", "bare"],
            weights=[5, 1.5, 1.5, 1, 1, 0.5, 0.3],
        )[0]
        if style == "placed" and position == "center" and rng.random() < 0.5:
            style = "full"
        return Scene(background=background, objects=(obj,), texture_colours=texture_colours, caption_style=style)  # type: ignore[arg-type]


def scene_for_caption(shape: str, colour: str, background: str, *, seed: int = 0) -> Scene:
    """The canonical single-object scene for "a {colour} {shape} on a {background} background"."""
    rng = random.Random(seed)
    texture_colours = (
        tuple(rng.sample([c for c in COLOURS if c != colour], 2)) if background in TEXTURES else ("white", "gray")
    )
    return Scene(
        background=background, objects=(ObjectSpec(shape=shape, colour=colour),), texture_colours=texture_colours
    )  # type: ignore[arg-type]
