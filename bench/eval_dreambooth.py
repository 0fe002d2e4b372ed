"""Does a DreamBooth LoRA on ``tiny`` learn a shipped concept, and does it still follow the prompt's background?

Trains a LoRA on a shipped concept's reference images (``studio.world.concepts``) on the embedded tiny model, once
without and once with prior preservation, each within a CPU time budget, then asks the judge
(``studio.world.evaluate.evaluate_concept``) about images that put the concept on backgrounds it was never shown on.
Prints concept similarity and background compliance of the base model ("a <class noun> on a <colour> background")
and of each adapter ("a sks <class noun> on a <colour> background")::

    python bench/eval_dreambooth.py [--concept robot-toy] [--steps 300]

Needs ``studio/assets/tiny/model_index.json`` and ``studio/assets/judge.safetensors``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipelines import AdapterRef, PipelineService
from studio.base_models import load_base_model
from studio.home import StudioHome
from studio.library import AdapterLibrary
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder
from studio.world.evaluate import evaluate_concept
from trainers.core.config import load_config
from trainers.dreambooth import DreamBoothConfig, train_dreambooth

BUDGET_S = 120.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="robot-toy", choices=sorted(SHIPPED_CONCEPTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--runs", default="plain,prior", help="which runs: plain (no prior), prior, or both")
    args = parser.parse_args()
    concept = SHIPPED_CONCEPTS[args.concept]

    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        home = StudioHome(work / "home").ensure()
        library = AdapterLibrary(home)
        images = work / "images"
        # Captions name the background, so the background is not bound to the token.
        write_reference_folder(concept, images, with_captions=True)
        # The demo's recipe (rank 8, lr 1e-3, batch 4); with prior preservation, 24 class images at half weight keep
        # the run inside the 2-minute budget (class-image generation is most of its extra cost).
        overrides = [
            f"steps={args.steps}",
            f"lr={args.lr}",
            f"rank={args.rank}",
            "batch_size=4",
            "num_class_images=24",
            "prior_loss_weight=0.5",
            "checkpoint_every=0",
            *args.set,
        ]
        rows = []
        for prior in [run == "prior" for run in args.runs.split(",")]:
            name = f"{concept.name}-{'prior' if prior else 'plain'}"
            config = load_config(
                DreamBoothConfig,
                values={"class_noun": concept.class_noun, "prior_preservation": prior},
                overrides=overrides,
            )
            started = time.perf_counter()
            train_dreambooth(
                config, images, load_base_model("tiny"), name=name, library=library, run_dir=home.runs / name
            )
            seconds = time.perf_counter() - started
            rows.append((name, seconds))
            if seconds > BUDGET_S:
                print(f"warning: {name} took {seconds:.0f} s, over the {BUDGET_S:.0f} s budget")

        service = PipelineService(load_base_model("tiny"), adapter_source=library)
        base_score = evaluate_concept(service, concept, concept.class_noun, [])
        print(f"{'run':<28} {'train s':>8} {'similarity':>10} {'background':>10}")
        print(f"{'base model':<28} {'':>8} {base_score.similarity:>10.3f} {base_score.background_compliance:>10.2%}")
        for name, seconds in rows:
            token = f"sks {concept.class_noun}"
            score = evaluate_concept(service, concept, token, [AdapterRef(name)])
            print(f"{name:<28} {seconds:>8.0f} {score.similarity:>10.3f} {score.background_compliance:>10.2%}")
            print(f"{'':<28} {'':>8} {score.similarity / max(base_score.similarity, 1e-6):>9.2f}x of base")


if __name__ == "__main__":
    main()
