"""`studio demo`: personalisation end to end on the embedded base model, on a laptop CPU.

1. Write the reference images of a shipped concept (like the few photos a user uploads).
2. Train a DreamBooth LoRA on them with the embedded ``tiny`` base model (progress bar on stderr).
3. Generate the concept in new contexts (backgrounds it was never shown on) next to the base model's attempt.
4. Score both with the judge (concept similarity, background compliance) and save a contact sheet PNG.

>>> result = run_demo(resolve_home(), concept_name="robot-toy")  # doctest: +SKIP
>>> result.sheet  # doctest: +SKIP
PosixPath('studio-home/outputs/demo/demo-robot-toy.png')
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import InvalidInputError
from studio.home import StudioHome

logger = logging.getLogger(__name__)

DEMO_SEEDS: tuple[int, ...] = (1, 2)
# On top of DreamBooth's measured recipe for tiny (`trainers.dreambooth.BASE_RECIPES`: a rank-8 LoRA at a high learning
# rate learns a shipped concept in a couple of CPU minutes): the demo keeps no checkpoints.
DEMO_TRAINING: dict[str, Any] = {"checkpoint_every": 0}


@dataclass
class DemoResult:
    """What the demo made and measured."""

    adapter: str
    sheet: Path
    base_similarity: float
    adapter_similarity: float
    base_background: float
    adapter_background: float
    prompts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "sheet": str(self.sheet),
            "concept_similarity": {
                "base": round(self.base_similarity, 3),
                "adapter": round(self.adapter_similarity, 3),
            },
            "background_compliance": {
                "base": round(self.base_background, 3),
                "adapter": round(self.adapter_background, 3),
            },
            "prompts": self.prompts,
        }


def _free_name(library: Any, stem: str) -> str:
    """The first of ``stem``, ``stem-2``, ``stem-3``... not taken in the library (the demo never overwrites)."""
    name, n = stem, 1
    while library.exists(name):
        n += 1
        name = f"{stem}-{n}"
    return name


def run_demo(
    home: StudioHome, *, concept_name: str = "robot-toy", out: Path | None = None, show_progress: bool = True
) -> DemoResult:
    """Train a LoRA on a shipped concept with ``tiny`` and compare it with the base model. See the module doc."""
    # Heavy imports here so that `studio --help` stays fast.
    from pipelines.requests import AdapterRef
    from pipelines.service import PipelineService
    from studio.base_models import load_base_model
    from studio.library import AdapterLibrary
    from studio.world.concepts import SHIPPED_CONCEPTS, new_context_prompts, reference_images, write_reference_folder
    from studio.world.evaluate import contact_sheet, evaluate_concept
    from studio.world.judge import Judge
    from trainers.core.config import load_config
    from trainers.core.progress import TqdmProgress
    from trainers.dreambooth import BASE_RECIPES, DreamBoothConfig, train_dreambooth

    if concept_name not in SHIPPED_CONCEPTS:
        raise InvalidInputError(
            f"expected a shipped concept ({', '.join(sorted(SHIPPED_CONCEPTS))}), found {concept_name!r}"
        )
    concept = SHIPPED_CONCEPTS[concept_name]
    home.ensure()
    library = AdapterLibrary(home)

    # 1. The user's "photos".
    name = _free_name(library, f"demo-{concept.name}")
    run_dir = home.runs / name
    images = write_reference_folder(concept, run_dir / "images")
    logger.info("wrote %d reference images to %s", len(images), images[0].parent)

    # 2. Train.
    base = load_base_model("tiny")
    values = {**DEMO_TRAINING, "token": "sks", "class_noun": concept.class_noun}
    config = load_config(DreamBoothConfig, recipe=BASE_RECIPES["tiny"], values=values)
    callbacks = [TqdmProgress(description=f"training {name}")] if show_progress else []
    train_dreambooth(
        config, run_dir / "images", base, name=name, library=library, run_dir=run_dir / "train", progress=callbacks
    )

    # 3-4. Generate in new contexts, score, and lay out the contact sheet.
    service = PipelineService(base, "cpu", adapter_source=library)
    judge = Judge.load()
    base_score = evaluate_concept(service, concept, concept.class_noun, [], seeds=DEMO_SEEDS, judge=judge)
    adapter_score = evaluate_concept(
        service, concept, f"sks {concept.class_noun}", [AdapterRef(name)], seeds=DEMO_SEEDS, judge=judge
    )
    prompts = [p for p, _ in new_context_prompts(concept, f"sks {concept.class_noun}")]
    rows = [
        (f"reference images of '{concept.name}'", reference_images(concept)),
        (f"base model: 'a {concept.class_noun} on a ... background'", base_score.images),
        (f"with the adapter: 'a sks {concept.class_noun} on a ... background'", adapter_score.images),
    ]
    sheet = out if out is not None and out.suffix.lower() == ".png" else (out or home.outputs / "demo") / f"{name}.png"
    contact_sheet(rows, sheet)
    return DemoResult(
        adapter=name,
        sheet=sheet,
        base_similarity=base_score.similarity,
        adapter_similarity=adapter_score.similarity,
        base_background=base_score.background_compliance,
        adapter_background=adapter_score.background_compliance,
        prompts=prompts,
    )


def run_demo_from_cli(args: argparse.Namespace, home: StudioHome) -> int:
    """``studio demo [--out DIR]``: run the demo and print where the contact sheet is."""
    concept = getattr(args, "concept", None) or "robot-toy"
    out = Path(args.out) if getattr(args, "out", None) else None
    result = run_demo(home, concept_name=concept, out=out)
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"trained adapter '{result.adapter}' on the shipped concept '{concept}' with the embedded base model 'tiny'")
    print(
        f"concept similarity in new contexts: base {result.base_similarity:.3f}"
        f" -> adapter {result.adapter_similarity:.3f}"
    )
    print(f"background compliance: base {result.base_background:.0%} -> adapter {result.adapter_background:.0%}")
    print(f"contact sheet: {result.sheet}")
    sys.stdout.flush()
    return 0
