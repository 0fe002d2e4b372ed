"""Measure what a model or an adapter learned, with the judge, on the shapes world.

- `prompt_compliance`: does the base model draw what held-out captions ask for (shape, colour, background)?
- `evaluate_concept`: does an adapter put its concept into new contexts (concept similarity against the concept's
  reference images) while still obeying the prompt's background?

Everything goes through `pipelines.PipelineService`, the same path users generate with.

>>> from studio.world.evaluate import evaluate_concept  # doctest: +SKIP
>>> robot = SHIPPED_CONCEPTS["robot-toy"]  # doctest: +SKIP
>>> score = evaluate_concept(service, robot, "<robot-toy>", [AdapterRef("robot")])  # doctest: +SKIP
>>> score.similarity, score.background_compliance  # doctest: +SKIP
(0.81, 0.92)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from pipelines.requests import REGION_SEPARATOR, AdapterRef, GenerationRequest
from studio.world.concepts import Concept, new_context_prompts, reference_images
from studio.world.judge import Judge
from studio.world.scene import BACKGROUNDS, COLOURS, SHAPES, ObjectSpec, Scene, caption_for, is_held_out

DEFAULT_SEEDS: tuple[int, ...] = (11, 22, 33)


@dataclass
class ConceptScore:
    """How well images show a concept in new contexts."""

    similarity: float
    background_compliance: float
    n: int
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "similarity": round(self.similarity, 4),
            "background_compliance": round(self.background_compliance, 4),
            "n": self.n,
            "per_prompt": self.per_prompt,
        }


def evaluate_concept_pair(
    service: Any,
    concepts: tuple[Concept, Concept],
    prompt_tokens: tuple[str, str],
    adapters: Sequence[AdapterRef] = (),
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    steps: int = 20,
    guidance: float = 7.5,
    judge: Judge | None = None,
    regions: str | None = None,
) -> tuple[ConceptScore, ConceptScore]:
    """Generate ``a {token_a} and a {token_b} on a {bg} background`` and score each concept on its own object.

    With ``regions`` ("columns" or "rows") the prompt is regional instead: that sentence as the base, then
    ``a {token_a} on a {bg} background BREAK a {token_b} on a {bg} background`` (`GenerationRequest.regions`).

    Backgrounds are new to both concepts. Each image's two largest foreground parts are assigned to the concepts
    (`object_concept_similarities`); a concept whose object is missing or merged with the other scores 0 on that
    image. Background compliance is the judge's reading of the whole image, shared by both scores.
    """
    from studio.world.judge import object_concept_similarities

    judge = judge or Judge.load()
    references = [reference_images(c) for c in concepts]
    first = {bg for _, bg in new_context_prompts(concepts[0], "")}
    backgrounds = [bg for _, bg in new_context_prompts(concepts[1], "") if bg in first]
    sims: tuple[list[float], list[float]] = ([], [])
    hits = 0
    images: list[Image.Image] = []
    for bg in backgrounds:
        prompt = f"a {prompt_tokens[0]} and a {prompt_tokens[1]} on a {bg} background"
        if regions is not None:
            parts = [f"a {token} on a {bg} background" for token in prompt_tokens]
            prompt = f"{prompt} ADDBASE {parts[0]} BREAK {parts[1]}"
        batch = _generate(service, prompt, seeds, adapters, steps, guidance, regions)
        scores = object_concept_similarities(batch, references)
        for (a, b), reading in zip(scores, judge.read(batch), strict=True):
            sims[0].append(a)
            sims[1].append(b)
            hits += reading.background == bg
        images.extend(batch)
    n = len(images)
    return tuple(  # type: ignore[return-value]
        ConceptScore(similarity=sum(s) / max(1, n), background_compliance=hits / max(1, n), n=n, images=images)
        for s in sims
    )


def evaluate_concepts_in_regions(
    service: Any,
    concepts: Sequence[Concept],
    prompt_tokens: Sequence[str],
    adapters: Sequence[AdapterRef] = (),
    *,
    overlap: float = 0.25,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    steps: int = 20,
    guidance: float = 7.5,
    judge: Judge | None = None,
) -> list[ConceptScore]:
    """Several concepts in one prompt, one latent region each, each scored on its own region.

    The prompt is ``a {token_1} on a {bg} background BREAK a {token_2} on a {bg} background BREAK ...`` with
    ``region_mode="latent"`` columns (`GenerationRequest`), on an image as wide as one native side per concept minus
    ``overlap`` of a side between neighbours. Each concept is scored on its region's window (native size: what the
    model drew for it; parts a neighbour's subject pushes in across the window's sides are left out,
    `window_concept_similarity`) against its references, and the judge reads that window's background. Backgrounds
    are new to every concept where they share any (else each region gets its concept's own, in turn). ``adapters``
    carry the LoRA ``region`` options. Each score's ``per_prompt`` names the backgrounds, to compare with
    `evaluate_concept` on the same ones.
    """
    from pipelines.latent_regions import region_views
    from studio.world.judge import window_concept_similarity

    judge = judge or Judge.load()
    count = len(concepts)
    native = int(service.default_size)
    scale = int(service.pipeline.vae_scale_factor)
    step = native - int(round(overlap * native / scale)) * scale
    width = native + step * (count - 1)
    views = region_views("columns", count, height=native // scale, width=width // scale, native=native // scale)
    own = [[bg for _, bg in new_context_prompts(concept, "")] for concept in concepts]
    shared = [bg for bg in own[0] if all(bg in other for other in own[1:])]
    rounds = (
        [[bg] * count for bg in shared]
        if shared
        else [[own[i][k % len(own[i])] for i in range(count)] for k in range(max(len(o) for o in own))]
    )
    sims: list[list[float]] = [[] for _ in concepts]
    hits = [0 for _ in concepts]
    per_prompt: list[list[dict[str, Any]]] = [[] for _ in concepts]
    images: list[Image.Image] = []
    references = [reference_images(c) for c in concepts]
    for backgrounds in rounds:
        prompt = f" {REGION_SEPARATOR} ".join(
            f"a {token} on a {bg} background" for token, bg in zip(prompt_tokens, backgrounds, strict=True)
        )
        request = GenerationRequest(
            prompt=prompt,
            seeds=list(seeds),
            steps=steps,
            guidance=guidance,
            adapters=list(adapters),
            width=width,
            height=native,
            regions="columns",
            region_mode="latent",
        )
        batch = list(service.generate(request).images)
        images.extend(batch)
        for index, (view, bg) in enumerate(zip(views, backgrounds, strict=True)):
            box = (view.left * scale, 0, (view.left + view.width) * scale, native)
            crops = [image.crop(box) for image in batch]
            here = window_concept_similarity(crops, references[index])
            ok = sum(reading.background == bg for reading in judge.read(crops))
            sims[index].extend(here)
            hits[index] += ok
            per_prompt[index].append(
                {"prompt": prompt, "background": bg, "similarity": round(sum(here) / len(here), 4), "background_ok": ok}
            )
    n = len(images)
    return [
        ConceptScore(
            similarity=sum(s) / max(1, n), background_compliance=h / max(1, n), n=n, per_prompt=p, images=images
        )
        for s, h, p in zip(sims, hits, per_prompt, strict=True)
    ]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (``successes`` may count a tie as half)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _generate(
    service: Any,
    prompt: str,
    seeds: Sequence[int],
    adapters: Sequence[AdapterRef],
    steps: int,
    guidance: float,
    regions: str | None = None,
) -> list[Image.Image]:
    request = GenerationRequest(
        prompt=prompt, seeds=list(seeds), steps=steps, guidance=guidance, adapters=list(adapters), regions=regions
    )
    return list(service.generate(request).images)


def evaluate_concept(
    service: Any,
    concept: Concept,
    prompt_token: str,
    adapters: Sequence[AdapterRef] = (),
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    steps: int = 20,
    guidance: float = 7.5,
    judge: Judge | None = None,
    backgrounds: Sequence[str] | None = None,
) -> ConceptScore:
    """Generate ``a {prompt_token} on a {bg} background`` for new backgrounds and score the images.

    For the base model's attempt pass the class noun as ``prompt_token`` and no adapters. ``backgrounds`` keeps only
    those of the new-context backgrounds (to compare with `evaluate_concepts_in_regions` on the same ones).
    """
    judge = judge or Judge.load()
    references = reference_images(concept)
    images: list[Image.Image] = []
    per_prompt = []
    hits = 0
    similarities: list[float] = []
    from studio.world.judge import concept_similarity

    for prompt, background in new_context_prompts(concept, prompt_token):
        if backgrounds is not None and background not in backgrounds:
            continue
        batch = _generate(service, prompt, seeds, adapters, steps, guidance)
        sims = concept_similarity(batch, references)
        readings = judge.read(batch)
        ok = sum(r.background == background for r in readings)
        hits += ok
        similarities.extend(sims)
        images.extend(batch)
        per_prompt.append(
            {
                "prompt": prompt,
                "background": background,
                "similarity": round(sum(sims) / len(sims), 4),
                "background_ok": ok,
                "n": len(batch),
            }
        )
    n = len(similarities)
    return ConceptScore(
        similarity=sum(similarities) / max(1, n),
        background_compliance=hits / max(1, n),
        n=n,
        per_prompt=per_prompt,
        images=images,
    )


def held_out_scenes(count: int = 200, *, two_objects: bool = False, seed: int = 0) -> list[Scene]:
    """Scenes whose (shape, colour, background) combinations never appear together in tiny's training data.

    Single-object captions use the plain template and its sized and placed variants, so there are enough distinct
    captions; two-object scenes combine a held-out pair with another object.
    """
    rng = random.Random(f"held-out:{seed}")
    scenes: list[Scene] = []
    seen: set[str] = set()
    triples = [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if c != b and is_held_out(s, c, b)]
    rng.shuffle(triples)
    attempts = 0
    while len(scenes) < count and attempts < count * 50:
        attempts += 1
        shape, colour, background = triples[attempts % len(triples)]
        texture = (
            tuple(rng.sample([c for c in COLOURS if c != colour], 2))
            if background not in COLOURS
            else ("white", "gray")
        )
        if two_objects:
            other_shape = rng.choice([s for s in SHAPES if s != shape])
            other_colour = rng.choice([c for c in COLOURS if c not in (background, *texture)])
            a = ObjectSpec(shape=shape, colour=colour, size="small", position="left")
            b = ObjectSpec(shape=other_shape, colour=other_colour, size="small", position="right")
            scene = Scene(background=background, objects=(a, b), texture_colours=texture)  # type: ignore[arg-type]
        else:
            style = rng.choice(["full", "full", "sized", "placed"])
            size = rng.choice(["small", "large"]) if style == "sized" else "medium"
            position = rng.choice(["left", "right", "top", "bottom"]) if style == "placed" else "center"
            obj = ObjectSpec(shape=shape, colour=colour, size=size, position=position)
            scene = Scene(background=background, objects=(obj,), texture_colours=texture, caption_style=style)  # type: ignore[arg-type]
        text = caption_for(scene)
        if text in seen:
            continue
        seen.add(text)
        scenes.append(scene)
    return scenes


def prompt_compliance(
    service: Any,
    scenes: Sequence[Scene],
    *,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.5,
    judge: Judge | None = None,
) -> dict[str, Any]:
    """Share of images in which the judge finds every object and the background a caption asks for."""
    judge = judge or Judge.load()
    hits = {"all": 0, "shape": 0, "colour": 0, "background": 0}
    images = []
    for scene in scenes:
        (image,) = _generate(service, caption_for(scene), [seed], [], steps, guidance)
        images.append(image)
        reading = judge.read([image])[0]
        hits["all"] += judge.complies(reading, scene)
        hits["background"] += reading.background == scene.background
        if len(scene.objects) == 1:
            hits["shape"] += reading.shape == scene.objects[0].shape
            hits["colour"] += reading.colour == scene.objects[0].colour
    n = len(scenes)
    low, high = wilson_interval(hits["all"], n)
    return {
        "n": n,
        "compliance": hits["all"] / max(1, n),
        "interval95": [round(low, 4), round(high, 4)],
        "shape": hits["shape"] / max(1, n),
        "colour": hits["colour"] / max(1, n),
        "background": hits["background"] / max(1, n),
        "images": images,
    }


def contact_sheet(rows: Sequence[tuple[str, Sequence[Image.Image]]], path: Path, *, scale: int = 2) -> Path:
    """Save a grid: one labelled row per (label, images)."""
    cell = 64 * scale
    label_w = 200
    width = label_w + cell * max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (width, cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        draw.multiline_text((6, r * cell + 6), _wrap(label, 26), fill="black")
        for c, image in enumerate(images):
            sheet.paste(
                image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (label_w + c * cell, r * cell)
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)
