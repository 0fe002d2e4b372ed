"""Simulated users: people with a hidden taste, who pick between two images as a person would.

A user is a hidden scoring function over what is in an image (object colour, background, object size, texture). It
reads images through the judge, so it can rate any generated image, and labels pairs with a Bradley-Terry choice
(seeded), so its picks are noisy the way people's are. Several users ship with the studio for tests; `random_user`
makes new ones (held-out users for evaluation).

>>> from studio.world.users import SHIPPED_USERS
>>> sorted(SHIPPED_USERS)
['cool-minimalist', 'dark-mode', 'texture-fan', 'warm-and-bold']
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from studio.world.judge import Judge, Reading
from studio.world.scene import COLOURS, TEXTURES, Scene

WARM = frozenset({"red", "orange", "yellow"})
COOL = frozenset({"blue", "green", "purple"})
DARK_BACKGROUNDS = frozenset({"black", "blue", "purple"})
LIGHT_BACKGROUNDS = frozenset({"white", "yellow", "gray"})
FEATURES: tuple[str, ...] = (
    "warm_object",
    "cool_object",
    "dark_background",
    "light_background",
    "textured_background",
    "large_object",
    "favourite_colour",
)


def features_of(colour: str, background: str, coverage: float, favourite: str | None) -> dict[str, float]:
    """The attributes a user's taste is defined over."""
    return {
        "warm_object": float(colour in WARM),
        "cool_object": float(colour in COOL),
        "dark_background": float(background in DARK_BACKGROUNDS),
        "light_background": float(background in LIGHT_BACKGROUNDS),
        "textured_background": float(background in TEXTURES),
        # Coverage of a medium object is about 0.15; squash so size matters but does not dominate.
        "large_object": min(1.0, coverage / 0.3),
        "favourite_colour": float(favourite is not None and (colour == favourite or background == favourite)),
    }


@dataclass(frozen=True)
class SimulatedUser:
    """A hidden taste: weights over `FEATURES`, an optional favourite colour and how noisy the picks are."""

    name: str
    weights: dict[str, float]
    favourite: str | None = None
    temperature: float = 0.3
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def score_reading(self, reading: Reading) -> float:
        f = features_of(reading.colour, reading.background, reading.coverage, self.favourite)
        return sum(self.weights.get(k, 0.0) * v for k, v in f.items())

    def score_scene(self, scene: Scene) -> float:
        """Score from ground truth (for rendered images, no judge needed)."""
        obj = scene.objects[0]
        from studio.world.scene import SIZES

        coverage = sum(3.0 * SIZES[o.size] ** 2 for o in scene.objects)
        return sum(
            self.weights.get(k, 0.0) * v
            for k, v in features_of(str(obj.colour), scene.background, coverage, self.favourite).items()
        )

    def scores(self, images: Sequence[Image.Image], judge: Judge) -> list[float]:
        return [self.score_reading(r) for r in judge.read(list(images))]

    def pick(self, score_a: float, score_b: float, rng: random.Random) -> int:
        """0 if the user prefers the first image, 1 for the second (Bradley-Terry with this user's temperature)."""
        p_first = 1.0 / (1.0 + math.exp(-(score_a - score_b) / max(1e-6, self.temperature)))
        return 0 if rng.random() < p_first else 1

    def prefers_first(self, a: Image.Image, b: Image.Image, judge: Judge) -> bool:
        """Deterministic pick (no noise): whether ``a`` scores at least as high as ``b``."""
        sa, sb = self.scores([a, b], judge)
        return sa >= sb


SHIPPED_USERS: dict[str, SimulatedUser] = {
    "warm-and-bold": SimulatedUser(
        "warm-and-bold",
        {"warm_object": 1.0, "cool_object": -0.5, "large_object": 0.8, "dark_background": -0.4},
        description="likes warm colours and large objects, dislikes dark backgrounds",
    ),
    "cool-minimalist": SimulatedUser(
        "cool-minimalist",
        {
            "cool_object": 1.0,
            "warm_object": -0.6,
            "light_background": 0.6,
            "large_object": -0.5,
            "textured_background": -0.8,
        },
        description="likes cool colours on light, plain backgrounds and small objects",
    ),
    "dark-mode": SimulatedUser(
        "dark-mode",
        {"dark_background": 1.2, "light_background": -0.8, "warm_object": 0.3},
        description="likes dark backgrounds, dislikes light ones",
    ),
    "texture-fan": SimulatedUser(
        "texture-fan",
        {"textured_background": 1.2, "favourite_colour": 0.6, "large_object": 0.3},
        favourite="green",
        description="likes textured backgrounds and green",
    ),
}


def random_user(seed: int) -> SimulatedUser:
    """A new user with a random taste (for held-out evaluation): 2-4 strong preferences, maybe a favourite colour."""
    rng = random.Random(f"user:{seed}")
    chosen = rng.sample([f for f in FEATURES if f != "favourite_colour"], rng.randint(2, 4))
    weights = {f: rng.choice([-1, 1]) * rng.uniform(0.5, 1.2) for f in chosen}
    favourite = None
    if rng.random() < 0.4:
        favourite = rng.choice(list(COLOURS))
        weights["favourite_colour"] = rng.uniform(0.5, 1.0)
    return SimulatedUser(f"random-{seed}", weights, favourite=favourite, description="random taste")
