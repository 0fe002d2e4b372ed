"""The taste quiz's pool: a fixed set of base-model pairs, drawn once per base model and kept in the studio's cache,
from which `trainers.preference.TasteQuiz` chooses what to ask a new user next.

Random pairs often differ in nothing a person cares about, or in what everyone agrees on; a quiz over a larger pool
asks the pairs that tell most about this user, so 4 picks say more (`bench/eval_preference.py --quiz`). The pool's
prompts come from the shapes world of the embedded `tiny` model (the only base model that ships the attributes
population and the reader a quiz needs); other base models get "not available yet".

>>> prompts = quiz_prompts(2)
>>> [seeds for _, seeds in prompts]
[(200000, 200001), (200002, 200003)]
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image

from studio.errors import InvalidInputError
from studio.home import StudioHome
from studio.preferences import atomic_write, sanitize_user
from studio.world.scene import caption_for, random_scene

QUIZ_SEED = 2
"""The pool's prompt stream and seeds (`bench/eval_preference.py` builds population users on stream 1 and gives each
evaluated user stream 100 + i)."""
QUIZ_PROMPTS = 256
"""Prompts in the pool, two seeds each: the quiz needs room to find pairs that differ in one thing the committee
disagrees on (167 of this pool's 256 pairs on `tiny` differ in the colour or the background, not both)."""
QUIZ_STEPS = 20
"""Sampling steps of the pool's images (what `bench/eval_preference.py` generates with)."""
OPEN_STYLES = ("bare", "no_colour", "no_background")
"""Caption styles that leave the object's colour, the background or both to the model, as people's prompts do."""
Pool = list[tuple[str, Image.Image, Image.Image]]


def quiz_prompts(count: int = QUIZ_PROMPTS, seed: int = QUIZ_SEED) -> list[tuple[str, tuple[int, int]]]:
    """The pool's prompts and the two seeds of each: shapes-world prompts in the open styles."""
    rng = random.Random(f"preference-pool:{seed}")
    prompts = []
    for index in range(count):
        scene = random_scene(rng, two_object_prob=0.0, class_prob=0.0)
        scene = replace(scene, caption_style=rng.choice(OPEN_STYLES))
        prompts.append((caption_for(scene), (seed * 100_000 + 2 * index, seed * 100_000 + 2 * index + 1)))
    return prompts


def draw_pool(
    generate: Callable[[str, Sequence[int]], Sequence[Image.Image]],
    count: int = QUIZ_PROMPTS,
    folder: Path | None = None,
) -> Pool:
    """The pool: ``generate(prompt, seeds)`` (the base model, no adapter) for each of `quiz_prompts`. With
    ``folder`` the pool is read from there when it holds this many prompts, else drawn and written there (the images
    first, the index last, so a pool cut off mid-write is drawn again)."""
    index = folder / "prompts.json" if folder is not None else None
    if folder is not None and index is not None and index.is_file():
        prompts = json.loads(index.read_text())
        if len(prompts) == count:
            return [
                (prompt, _image(folder / f"{i}-a.png"), _image(folder / f"{i}-b.png"))
                for i, prompt in enumerate(prompts)
            ]
    pool: Pool = []
    for prompt, seeds in quiz_prompts(count):
        first, second = generate(prompt, seeds)
        pool.append((prompt, first, second))
    if folder is not None and index is not None:
        folder.mkdir(parents=True, exist_ok=True)
        index.unlink(missing_ok=True)  # another pool's index must not name images half replaced by this one
        for i, (_, first, second) in enumerate(pool):
            first.save(folder / f"{i}-a.png")
            second.save(folder / f"{i}-b.png")
        atomic_write(index, json.dumps([prompt for prompt, _, _ in pool]).encode())
    return pool


def pool_folder(home: StudioHome, base_fingerprint: str) -> Path:
    """Where a base model's pool is kept (a cache: deleting it only means drawing it again)."""
    return home.cache / "quiz" / base_fingerprint


def _image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class QuizAnswers:
    """A user's answers to the quiz (pool index -> 0 or 1 for the picked image, ``None`` for a skip), kept beside
    their preference pairs so the quiz never asks the same pair twice."""

    def __init__(self, home: StudioHome, user_id: str) -> None:
        self.path = home.preferences / sanitize_user(user_id) / "quiz.json"

    def load(self) -> dict[int, int | None]:
        """The answers so far (none for a new user)."""
        if not self.path.is_file():
            return {}
        try:
            rows = json.loads(self.path.read_text())
            return {int(index): (None if choice is None else int(choice)) for index, choice in rows.items()}
        except (ValueError, AttributeError) as exc:
            raise InvalidInputError(
                f"expected quiz answers as JSON in {self.path}, found unreadable text ({exc})"
            ) from None

    def record(self, index: int, choice: int | None) -> dict[int, int | None]:
        """Add one answer (written whole, atomically) and return them all."""
        if choice not in (0, 1, None):
            raise InvalidInputError(f"expected the choice 0, 1 or none (a skip), found {choice!r}")
        answers = {**self.load(), int(index): choice}
        atomic_write(self.path, json.dumps({str(i): c for i, c in answers.items()}).encode())
        return answers
