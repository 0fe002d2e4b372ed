"""Concepts: novel objects the base model has never seen, with a class noun and reference images.

A concept is what a user personalises the model with: like the 3-6 photos of their dog, it comes as a handful of
reference images in varied positions and backgrounds. Because concepts are procedural, their ground truth is known
and the judge can measure how well a trained adapter reproduces them.

>>> from studio.world.concepts import SHIPPED_CONCEPTS, reference_images
>>> sorted(SHIPPED_CONCEPTS)
['crescent-moon', 'hex-emblem', 'robot-toy']
>>> len(reference_images(SHIPPED_CONCEPTS["robot-toy"]))
5
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from studio.world.scene import COLOURS, ObjectSpec, Scene, render

# Backgrounds used for reference images and for "new context" prompts; kept apart so that evaluation prompts put the
# concept on backgrounds it was never shown on.
REFERENCE_BACKGROUNDS: tuple[str, ...] = ("white", "black", "yellow", "white", "black")
NEW_CONTEXT_BACKGROUNDS: tuple[str, ...] = ("blue", "red", "purple", "orange", "gray", "green")


@dataclass(frozen=True)
class Concept:
    """A novel object: how to draw it, and the class noun it belongs to."""

    name: str
    class_noun: str
    look: ObjectSpec
    description: str

    def object_at(
        self, position: str = "center", size: str | None = None, offset: tuple[float, float] = (0.0, 0.0)
    ) -> ObjectSpec:
        """The concept's object placed in a scene."""
        return replace(self.look, position=position, size=size or self.look.size, offset=offset, concept=self.name)

    def scene(
        self,
        background: str,
        position: str = "center",
        size: str | None = None,
        offset: tuple[float, float] = (0.0, 0.0),
    ) -> Scene:
        """A scene with the concept alone on a background."""
        return Scene(background=background, objects=(self.object_at(position, size, offset),))


SHIPPED_CONCEPTS: dict[str, Concept] = {
    "robot-toy": Concept(
        name="robot-toy",
        class_noun="toy",
        look=ObjectSpec(
            shape="toy",
            colour="orange",
            size="large",
            parts=(("body", "square"), ("head", "blue"), ("head_shape", "square"), ("feet", "purple")),
        ),
        description="an orange square robot with a blue square head and purple feet",
    ),
    "hex-emblem": Concept(
        name="hex-emblem",
        class_noun="emblem",
        look=ObjectSpec(
            shape="emblem",
            colour="purple",
            size="large",
            parts=(("outer", "hexagon"), ("inner", "diamond"), ("symbol", "yellow"), ("border", "white")),
        ),
        description="a purple hexagonal emblem with a white rim and a yellow diamond",
    ),
    "crescent-moon": Concept(
        name="crescent-moon",
        class_noun="object",
        look=ObjectSpec(
            shape="crescent",
            colour="yellow",
            size="large",
            parts=(("inner", "circle"), ("symbol", "red"), ("inner_scale", "0.18")),
        ),
        description="a yellow crescent with a small red dot",
    ),
}


def reference_scenes(concept: Concept, count: int = 5, seed: int = 0) -> list[Scene]:
    """Scenes for a concept's reference images: varied positions, sizes and backgrounds, like a user's photos."""
    rng = random.Random(f"{concept.name}:{seed}")
    colour = concept.look.colour
    backgrounds = [b for b in REFERENCE_BACKGROUNDS if b != colour]
    placements = [
        ("center", "large"),
        ("left", "medium"),
        ("right", "medium"),
        ("center", "medium"),
        ("bottom", "medium"),
        ("left", "large"),
    ]
    scenes = []
    for i in range(count):
        position, size = placements[i % len(placements)]
        offset = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))
        scenes.append(concept.scene(backgrounds[i % len(backgrounds)], position, size, offset))
    return scenes


def reference_images(concept: Concept, count: int = 5, seed: int = 0) -> list[Image.Image]:
    """Render a concept's reference images."""
    return [render(s) for s in reference_scenes(concept, count, seed)]


def write_reference_folder(concept: Concept, folder: Path, count: int = 5, with_captions: bool = False) -> list[Path]:
    """Write reference images (and optional kohya-style caption sidecars) to a folder, as a user would upload them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (scene, image) in enumerate(
        zip(reference_scenes(concept, count), reference_images(concept, count), strict=True)
    ):
        path = folder / f"{concept.name}-{i}.png"
        image.save(path)
        if with_captions:
            bg = scene.background
            path.with_suffix(".txt").write_text(f"a {concept.class_noun} on a {bg} background\n", encoding="utf-8")
        paths.append(path)
    return paths


def concept_colours(concept: Concept) -> set[str]:
    """Palette colours the concept is drawn with (a background of one of these would hide part of it)."""
    values = [concept.look.colour, *(v for _, v in concept.look.parts)]
    return {v for v in values if is_palette_colour(v)}  # type: ignore[misc]


def new_context_prompts(concept: Concept, token: str) -> list[tuple[str, str]]:
    """Prompts that put a concept in new contexts, with the background the judge should find: (prompt, background).

    The backgrounds are ones the reference images never show and that differ from the concept's own colours.
    """
    backgrounds = [bg for bg in NEW_CONTEXT_BACKGROUNDS if bg not in concept_colours(concept)]
    return [(f"a {token} on a {bg} background", bg) for bg in backgrounds]


def is_palette_colour(colour: object) -> bool:
    return isinstance(colour, str) and colour in COLOURS
