"""Prompt templates for concept training: what the placeholder token is shown in while it learns.

Textual inversion (Gal et al. 2022) trains a word from neutral prompts around it: "a photo of a {}" for an object,
"a painting in the style of {}" for a style. These are the templates of the paper and of diffusers' example, so a
token trained here sees the contexts users expect. Captions written by the user (kohya ``.txt`` sidecars) can be used
instead: `caption_prompt` puts the placeholder into them.

>>> object_prompt("<my-toy>", random.Random(0))
'a photo of the <my-toy>'
>>> caption_prompt("a toy on a white background", "<my-toy>", "toy")
'a <my-toy> on a white background'
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Literal

__all__ = [
    "OBJECT_TEMPLATES",
    "CONTEXT_TEMPLATES",
    "STYLE_TEMPLATES",
    "LearnableProperty",
    "caption_prompt",
    "object_prompt",
    "style_prompt",
    "template_prompt",
    "templates_for",
]

LearnableProperty = Literal["object", "style"]

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
"""Object templates of Gal et al. (2022), as in diffusers' textual-inversion example."""

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
"""Style templates of Gal et al. (2022)."""


CONTEXT_TEMPLATES: tuple[str, ...] = (
    "a {} on the beach",
    "a {} in the snow",
    "a {} next to a red car",
    "a {} on a wooden table in a kitchen",
    "a {} floating in space with stars",
    "a watercolor painting of a {} in a garden",
    "a {} on a blue background",
    "a {} and a cat on a sofa",
    "a {} in the rain at night",
    "a {} on top of a mountain at sunset",
    "a pencil sketch of a {} in a city street",
    "a {} under a green tree",
)
"""New-context prompts for CoRe's context regularisation: the words after the placeholder should mean what they
mean after the class word (Wu et al., "CoRe: Context-Regularized Text Embedding Learning")."""


def templates_for(learnable_property: LearnableProperty) -> tuple[str, ...]:
    """The templates for learning an ``object`` or a ``style``."""
    if learnable_property == "object":
        return OBJECT_TEMPLATES
    if learnable_property == "style":
        return STYLE_TEMPLATES
    raise ValueError(f"learnable_property must be 'object' or 'style', got {learnable_property!r}")


def template_prompt(templates: Sequence[str], word: str, rng: random.Random) -> str:
    """One template, drawn with ``rng``, filled with ``word`` (the placeholder, or the init word for CoRe)."""
    return rng.choice(list(templates)).format(word)


def object_prompt(word: str, rng: random.Random) -> str:
    """A random object prompt around ``word``."""
    return template_prompt(OBJECT_TEMPLATES, word, rng)


def style_prompt(word: str, rng: random.Random) -> str:
    """A random style prompt around ``word``."""
    return template_prompt(STYLE_TEMPLATES, word, rng)


def caption_prompt(caption: str, word: str, class_word: str | None = None) -> str:
    """The image's own caption with ``word`` in it.

    A ``{}`` in the caption marks the place; otherwise the first whole-word occurrence of ``class_word`` (for example
    the init word "toy" in "a toy on a white background") is replaced; otherwise the word is put in front
    (``"<my-toy>, <caption>"``), so every training prompt contains the placeholder.
    """
    caption = caption.strip()
    if "{}" in caption:
        return caption.replace("{}", word)
    if class_word:
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(class_word)}(?![A-Za-z0-9])", re.IGNORECASE)
        replaced, count = pattern.subn(lambda _: word, caption, count=1)
        if count:
            return replaced
    return f"{word}, {caption}" if caption else word
