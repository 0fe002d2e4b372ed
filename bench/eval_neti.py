"""Evaluate NeTI on `tiny` with a shipped concept: the truncation dial against textual inversion trained as long.

Run: ``python bench/eval_neti.py [--concept robot-toy] [--ti-steps 300] [--truncations 128,64,32,16,8]``
(needs the built tiny model, ``studio/assets/tiny``; several minutes on a CPU).

1. Write the concept's reference images to a folder, as a user would upload them.
2. Train textual inversion for ``--ti-steps`` steps and time it; then train NeTI for the same wall time
   (``max_seconds``), both on the same images, with the class noun as init word / super-category.
3. Score with the judge through the shared pipeline (`studio.world.evaluate.evaluate_concept`): concept similarity
   to the references and background compliance on new-context prompts, for the base model (class noun), TI, and
   NeTI at each truncation. Acceptance: NeTI at full truncation >= TI similarity; lowering the truncation raises
   background compliance and lowers similarity, monotonically over at least 3 settings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines.requests import AdapterRef  # noqa: E402
from pipelines.service import PipelineService  # noqa: E402
from studio.base_models import load_base_model  # noqa: E402
from studio.home import StudioHome  # noqa: E402
from studio.library import AdapterLibrary  # noqa: E402
from studio.testing import tiny_model_path  # noqa: E402
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder  # noqa: E402
from studio.world.evaluate import evaluate_concept  # noqa: E402
from trainers.core.config import load_config  # noqa: E402
from trainers.neti import NetiConfig, train_neti  # noqa: E402


def monotone(values: list[float], rising: bool) -> bool:
    """Whether ``values`` never go the wrong way (ties allowed)."""
    pairs = zip(values, values[1:], strict=False)
    return all((b >= a) if rising else (b <= a) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="robot-toy", choices=sorted(SHIPPED_CONCEPTS))
    parser.add_argument("--ti-steps", type=int, default=300)
    # The strongest TI recipe bench/eval_textual_inversion.py found on tiny, so NeTI is compared with TI at its best.
    parser.add_argument("--ti-lr", type=float, default=5e-3)
    parser.add_argument("--ti-vectors", type=int, default=4)
    parser.add_argument("--truncations", default="128,64,32,16,8")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the evaluation images")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="NeTI config override")
    args = parser.parse_args()
    if not (tiny_model_path() / "model_index.json").is_file():
        raise SystemExit(f"the tiny model is not built yet ({tiny_model_path()}); see studio/world/train_tiny.py")

    concept = SHIPPED_CONCEPTS[args.concept]
    token = f"<{concept.name}>"
    home = StudioHome(Path(tempfile.mkdtemp(prefix="eval-neti-"))).ensure()
    library = AdapterLibrary(home)
    images = home.root / "images"
    write_reference_folder(concept, images)

    # 1. Textual inversion, timed.
    from trainers.textual_inversion import TextualInversionConfig, train_textual_inversion

    ti_config = load_config(
        TextualInversionConfig,
        values={
            "placeholder_token": token,
            "init_word": concept.class_noun,
            "steps": args.ti_steps,
            "lr": args.ti_lr,
            "num_vectors": args.ti_vectors,
            "checkpoint_every": 0,
        },
    )
    started = time.monotonic()
    train_textual_inversion(ti_config, images, "tiny", name="ti", library=library, run_dir=home.runs / "ti")
    seconds = time.monotonic() - started

    # 2. NeTI for the same time.
    overrides = [f"placeholder_token={token}", f"super_category={concept.class_noun}", "steps=1000000"]
    neti_config = load_config(NetiConfig, overrides=[*overrides, f"max_seconds={seconds:.1f}", *args.set])
    started = time.monotonic()
    library.add(train_neti(neti_config, load_base_model("tiny"), images), "neti")
    neti_seconds = time.monotonic() - started

    # 3. Scores through the shared pipeline.
    service = PipelineService(load_base_model("tiny"), adapter_source=library)
    rows = [("base (class noun)", evaluate_concept(service, concept, concept.class_noun, steps=args.steps))]
    rows.append(("textual inversion", evaluate_concept(service, concept, token, [AdapterRef("ti")], steps=args.steps)))
    truncations = [int(value) for value in args.truncations.split(",")]
    for truncation in truncations:
        ref = AdapterRef("neti", options={"truncation": float(truncation)})
        rows.append(
            (f"neti truncation={truncation}", evaluate_concept(service, concept, token, [ref], steps=args.steps))
        )

    print(
        f"concept {concept.name}; TI ({args.ti_vectors} vectors, lr {args.ti_lr:g}) {args.ti_steps} steps in "
        f"{seconds:.0f} s; NeTI trained {neti_seconds:.0f} s"
    )
    print(f"{'adapter':<24}{'similarity':>12}{'background':>12}{'n':>5}")
    for label, score in rows:
        print(f"{label:<24}{score.similarity:>12.3f}{score.background_compliance:>12.3f}{score.n:>5}")
    neti_rows = [score for label, score in rows if label.startswith("neti")]
    similarity = [score.similarity for score in neti_rows]
    background = [score.background_compliance for score in neti_rows]
    print(f"NeTI full >= TI similarity: {neti_rows[0].similarity >= rows[1][1].similarity}")
    print(f"similarity falls as truncation falls: {monotone(similarity, rising=False)}")
    print(f"background compliance rises as truncation falls: {monotone(background, rising=True)}")


if __name__ == "__main__":
    main()
