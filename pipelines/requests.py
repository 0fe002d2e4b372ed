"""What a generation request is, and what comes back.

A request is a plain value: prompt, negative prompt, seeds, steps, guidance, size, scheduler and the adapters to use
with their weights. `GenerationRequest.validate` checks it at the boundary and raises one-line `InvalidInputError`s,
so that the service never starts work on a request it cannot finish.

>>> request = GenerationRequest(prompt="a photo of <cat-toy>", seeds=[1, 2], adapters=[AdapterRef.parse("cat:0.8")])
>>> request.validate()
>>> request.adapters[0].weight
0.8
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from studio.errors import InvalidInputError

# Scheduler names a request may ask for; `pipelines.service` maps them to diffusers classes. ``None`` (or
# "default") means the base model's own scheduler, built fresh from its config.
SCHEDULER_NAMES = ("default", "ddim", "pndm", "euler", "euler_a", "dpm++", "dpm++_sde", "unipc")

# A prompt this long is not a prompt (CLIP reads 77 tokens, about 300 characters); refusing it early keeps a
# pasted document from tying up the tokenizer and the metadata of every image.
MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 16
MAX_STEPS = 500
MAX_SIDE = 4096
MAX_GUIDANCE = 50.0
# A huge LoRA weight is a typo, and it turns images into noise; A1111 users rarely go past +-2.
MAX_ABS_WEIGHT = 10.0
SIZE_MULTIPLE = 8
REGION_LAYOUTS = ("columns", "rows")
"""How ``GenerationRequest.regions`` splits the image: side-by-side stripes or stacked stripes."""
REGION_MODES = ("attention", "latent")
"""How regions are drawn: per-region cross-attention in one U-Net pass, or one U-Net view per region
(`pipelines.latent_regions`), where a LoRA can be given to one region with the adapter option ``region``."""
REGION_OPTION = "region"
REGION_SEPARATOR = "BREAK"
REGION_BASE = "ADDBASE"
MAX_REGIONS = 8


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{what} should be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInputError(f"{what} should be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class AdapterRef:
    """One adapter in a request: its library name, a weight, and kind-specific options.

    ``weight`` is the LoRA strength, 0 switches an embedding off; ``options`` carry numbers such as NeTI's
    ``truncation`` or a preference ``strength``.

    >>> AdapterRef.parse("neti-cat:0.8,truncation=64")
    AdapterRef(name='neti-cat', weight=0.8, options={'truncation': 64.0})
    """

    name: str
    weight: float = 1.0
    options: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse ``name``, ``name:0.8``, ``name:truncation=64`` or ``name:0.8,truncation=64`` (the CLI form)."""
        name, sep, rest = text.strip().partition(":")
        name = name.strip()
        if not name:
            raise InvalidInputError(f"expected an adapter as NAME[:WEIGHT][,OPTION=VALUE...], found {text!r}")
        weight = 1.0
        options: dict[str, float] = {}
        if sep:
            for position, item in enumerate(part.strip() for part in rest.split(",")):
                key, eq, value = item.partition("=")
                if not eq and position == 0:
                    weight = _parse_float(key, text)
                elif eq and key.strip():
                    options[key.strip()] = _parse_float(value, text)
                else:
                    raise InvalidInputError(
                        f"expected an adapter as NAME[:WEIGHT][,OPTION=VALUE...], found {text!r} (bad part {item!r})"
                    )
        return cls(name=name, weight=weight, options=options)

    def validate(self) -> None:
        """Raise `InvalidInputError` for an empty name, or a NaN/infinite/huge weight or option."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidInputError(f"expected an adapter name, found {self.name!r}")
        weight = _finite_number(self.weight, f"the weight of adapter '{self.name}'")
        if abs(weight) > MAX_ABS_WEIGHT:
            raise InvalidInputError(
                f"the weight of adapter '{self.name}' should be between -{MAX_ABS_WEIGHT:g} and {MAX_ABS_WEIGHT:g}, "
                f"got {weight:g}"
            )
        for key, value in self.options.items():
            _finite_number(value, f"option '{key}' of adapter '{self.name}'")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: name, weight and options."""
        return {"name": self.name, "weight": float(self.weight), "options": dict(self.options)}


def _parse_float(text: str, whole: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise InvalidInputError(f"expected a number in adapter {whole!r}, found {text.strip()!r}") from exc


@dataclass
class GenerationRequest:
    """Everything that determines a set of images. The same request (and base model) gives the same images.

    ``width``/``height`` of ``None`` mean the base model's native size; ``scheduler`` of ``None`` means the base
    model's own scheduler. One image is made per seed.

    ``regions`` ("columns" or "rows") splits the image into equal stripes, one per part of the prompt separated by
    ``BREAK`` (as AUTOMATIC1111's Regional Prompter and ComfyUI's area conditioning do): the cross-attention of each
    stripe reads only its own part, so two subjects in one image each get their own words (``"a <my-toy> on a red
    background BREAK a <my-cat> on a red background"``). LoRAs still apply to the whole image. A prompt that starts
    with a base part ending in ``ADDBASE`` ("a <my-toy> and a <my-cat> on a red background ADDBASE ...") lays that
    base over the whole image with weight ``base_ratio`` (Regional Prompter's base prompt): it gives the layout of
    the whole scene, the regions their own subjects.

    ``region_mode`` "latent" draws each region as its own U-Net view instead (MultiDiffusion; Regional Prompter's
    Latent mode): each subject is drawn as the model draws a subject alone, the views blend where they overlap, and a
    LoRA with the option ``region=N`` (``AdapterRef.parse("my-lora:1,region=2")``) applies only to region N. Give the
    image about one native side per region along the split (a wider image for "columns").
    """

    prompt: str
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    adapters: list[AdapterRef] = field(default_factory=list)
    regions: str | None = None
    base_ratio: float = 0.2
    region_mode: str = "attention"

    def region_base(self) -> str:
        """The base part of a regional prompt (before ``ADDBASE``), or ``""``."""
        if self.regions is None or REGION_BASE not in self.prompt:
            return ""
        return self.prompt.split(REGION_BASE, 1)[0].strip()

    def region_prompts(self) -> list[str]:
        """The prompt's region parts for ``regions`` (after any base part, split on ``BREAK``), or ``[]``."""
        if self.regions is None:
            return []
        rest = self.prompt.split(REGION_BASE, 1)[-1]
        return [part.strip() for part in rest.split(REGION_SEPARATOR)]

    def validate(self, *, min_side: int = SIZE_MULTIPLE, max_images: int = MAX_IMAGES) -> None:
        """Raise a one-line `InvalidInputError` for the first thing wrong with the request.

        ``min_side`` is the base model's smallest usable side in pixels (the service passes it).

        >>> GenerationRequest(prompt="a cat", steps=0).validate()
        Traceback (most recent call last):
        ...
        studio.errors.InvalidInputError: steps should be a whole number from 1 to 500, got 0
        """
        # 1. Text.
        for what, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if not isinstance(text, str):
                raise InvalidInputError(f"the {what} should be text, got {type(text).__name__}")
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidInputError(
                    f"the {what} should be at most {MAX_PROMPT_CHARS} characters, got {len(text)} characters"
                )
        # 2. Sampling.
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise InvalidInputError(f"steps should be a whole number from 1 to {MAX_STEPS}, got {self.steps!r}")
        guidance = _finite_number(self.guidance, "guidance")
        if not 0.0 <= guidance <= MAX_GUIDANCE:
            raise InvalidInputError(f"guidance should be from 0 to {MAX_GUIDANCE:g}, got {guidance:g}")
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise InvalidInputError(f"scheduler should be one of {', '.join(SCHEDULER_NAMES)}, got {self.scheduler!r}")
        # 3. Size.
        for what, side in (("width", self.width), ("height", self.height)):
            if side is None:
                continue
            if isinstance(side, bool) or not isinstance(side, int):
                raise InvalidInputError(f"{what} should be a whole number of pixels, got {side!r}")
            if side % SIZE_MULTIPLE:
                raise InvalidInputError(f"{what} should be a multiple of {SIZE_MULTIPLE}, got {side}")
            if not min_side <= side <= MAX_SIDE:
                raise InvalidInputError(f"{what} should be from {min_side} to {MAX_SIDE} pixels, got {side}")
        # 4. Seeds.
        if not self.seeds:
            raise InvalidInputError("expected at least one seed, got none")
        if len(self.seeds) > max_images:
            raise InvalidInputError(f"expected at most {max_images} images per request, got {len(self.seeds)}")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise InvalidInputError(f"a seed should be a whole number from 0 to 2**63-1, got {seed!r}")
        # 5. Regions: a layout, and two or more non-empty parts.
        if self.regions is not None:
            if self.regions not in REGION_LAYOUTS:
                raise InvalidInputError(f"regions should be one of {', '.join(REGION_LAYOUTS)}, got {self.regions!r}")
            parts = self.region_prompts()
            if len(parts) < 2 or not all(parts):
                raise InvalidInputError(
                    f"regions expect a prompt of two or more non-empty parts separated by {REGION_SEPARATOR}, "
                    f"got {len([p for p in parts if p])} part(s) in {self.prompt!r}"
                )
            if len(parts) > MAX_REGIONS:
                raise InvalidInputError(f"expected at most {MAX_REGIONS} regions, got {len(parts)}")
            ratio = _finite_number(self.base_ratio, "base_ratio")
            if not 0.0 <= ratio < 1.0:
                raise InvalidInputError(f"base_ratio should be from 0 up to (not including) 1, got {ratio:g}")
            if self.region_mode not in REGION_MODES:
                raise InvalidInputError(
                    f"region_mode should be one of {', '.join(REGION_MODES)}, got {self.region_mode!r}"
                )
            if self.region_mode == "latent" and self.region_base():
                raise InvalidInputError(
                    f"latent regions take no {REGION_BASE} base part (each region is drawn on its own); "
                    f"found one in {self.prompt!r}"
                )
        # 6. Adapters.
        seen: set[str] = set()
        for ref in self.adapters:
            ref.validate()
            if ref.name in seen:
                raise InvalidInputError(f"adapter '{ref.name}' is named twice in one request; give it once")
            seen.add(ref.name)
            if REGION_OPTION in ref.options:
                self._check_region_option(ref)

    def _check_region_option(self, ref: AdapterRef) -> None:
        value = ref.options[REGION_OPTION]
        count = len(self.region_prompts())
        if self.regions is None or self.region_mode != "latent":
            raise InvalidInputError(
                f"adapter '{ref.name}' has region={value:g}, which needs latent regions (regions with "
                f"region_mode 'latent'); found {'no regions' if self.regions is None else 'attention regions'}"
            )
        if value != int(value) or not 1 <= value <= count:
            raise InvalidInputError(
                f"adapter '{ref.name}' has region={value:g}; expected a region number from 1 to {count}"
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description of the request (adapters by name, weight and options)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seeds": list(self.seeds),
            "steps": self.steps,
            "guidance": self.guidance,
            "width": self.width,
            "height": self.height,
            "scheduler": self.scheduler,
            "adapters": [ref.describe() for ref in self.adapters],
            **(
                {"regions": self.regions, "base_ratio": self.base_ratio, "region_mode": self.region_mode}
                if self.regions
                else {}
            ),
        }


@dataclass
class GenerationResult:
    """Images of one request, in seed order, with one metadata dict per image and timings in seconds.

    ``warnings`` lists things the user should know but that did not stop the request (a prompt truncated to the
    text encoder's 77 tokens, an embedding whose placeholder does not appear in the prompt).
    """

    images: list[Image.Image]
    metadata: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
