"""Textual inversion on `tiny` with a shipped concept: concept similarity and background compliance vs the base model.

For 1 and 4 vectors, with and without CoRe context regularisation, trains a placeholder token on the concept's five
reference images (CPU, 2 threads, a fixed step count sized to stay under the 2-minute budget), then generates
``a <token> on a <colour> background`` for backgrounds the references never show, through the shared pipeline, and
scores the images with the judge (`studio.world.evaluate.evaluate_concept`). The base model's attempt uses the class
noun instead of the token. With ``--compose``, each 4-vector token is scored again while a second concept's token
and a DreamBooth LoRA are loaded in the same requests (their similarity should stay close to the solo value), at
each of ``--lora-weights``.

    python bench/eval_textual_inversion.py --concept robot-toy --steps 300
    python bench/eval_textual_inversion.py --variants 1,4 --core-weight 0.5 --compose

Needs the embedded model (``studio/assets/tiny``) and the judge (``studio/assets/judge.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipelines.requests import AdapterRef  # noqa: E402
from pipelines.service import PipelineService  # noqa: E402
from studio.base_models import load_base_model  # noqa: E402
from studio.home import StudioHome  # noqa: E402
from studio.library import AdapterLibrary  # noqa: E402
from studio.testing import ASSETS, tiny_model_path  # noqa: E402
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder  # noqa: E402
from studio.world.evaluate import evaluate_concept  # noqa: E402
from studio.world.judge import Judge  # noqa: E402
from trainers.textual_inversion import TextualInversionConfig, train_textual_inversion  # noqa: E402

BUDGET_S = 120.0
REGION_SEEDS = tuple(range(100, 116))  # 16: the most one request takes


def _train(concept, images: Path, library: AdapterLibrary, runs: Path, *, name: str, token: str, **options) -> dict:
    config = TextualInversionConfig(placeholder_token=token, init_word=concept.class_noun, **options)
    wall, cpu = time.perf_counter(), time.process_time()
    train_textual_inversion(config, images, load_base_model("tiny"), name=name, library=library, run_dir=runs / name)
    return {"train_wall_s": round(time.perf_counter() - wall, 1), "train_cpu_s": round(time.process_time() - cpu, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="robot-toy", choices=sorted(SHIPPED_CONCEPTS))
    parser.add_argument("--variants", default="1,4", help="comma-separated vector counts")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--core-weight", type=float, default=0.5, help="CoRe weight of the with-CoRe runs (0: none)")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compose", action="store_true", help="also score tokens next to a second token and a LoRA")
    parser.add_argument("--lora-weights", default="1.0,0.5", help="LoRA weights the --compose scores use")
    parser.add_argument("--skip-pairs", action="store_true", help="with --compose, skip the two-concept prompts")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here too")
    args = parser.parse_args()

    if not (tiny_model_path() / "model_index.json").is_file() or not (ASSETS / "judge.safetensors").is_file():
        print("needs studio/assets/tiny/model_index.json and studio/assets/judge.safetensors; build them first")
        return 2
    torch.set_num_threads(args.threads)
    concept = SHIPPED_CONCEPTS[args.concept]
    judge = Judge.load()
    work = Path(tempfile.mkdtemp(prefix="eval-ti-"))
    images = work / "images"
    write_reference_folder(concept, images)
    library = AdapterLibrary(StudioHome(work / "home"))
    options = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "checkpoint_every": 0}

    # 1. Train every variant: (vectors, CoRe weight).
    report: dict = {"concept": concept.name, "class_noun": concept.class_noun, "options": options, "variants": {}}
    variants = [(int(n), core) for n in args.variants.split(",") for core in dict.fromkeys((0.0, args.core_weight))]
    for vectors, core in variants:
        name = f"ti-{vectors}v" + ("-core" if core else "")
        token = f"<{concept.name}-{vectors}v{'-core' if core else ''}>"
        timing = _train(
            concept, images, library, work, name=name, token=token, num_vectors=vectors, core_weight=core, **options
        )
        report["variants"][name] = {"token": token, "vectors": vectors, "core_weight": core, **timing}
        print(f"trained {name}: {timing}", file=sys.stderr)

    # 2. Score the base model (class noun) and every token through the shared pipeline.
    service = PipelineService(load_base_model("tiny"), "cpu", adapter_source=library)
    base = evaluate_concept(service, concept, concept.class_noun, [], steps=args.eval_steps, judge=judge)
    report["base"] = {"similarity": round(base.similarity, 4), "background_compliance": base.background_compliance}
    for name, entry in report["variants"].items():
        score = evaluate_concept(
            service, concept, entry["token"], [AdapterRef(name)], steps=args.eval_steps, judge=judge
        )
        entry.update(
            similarity=round(score.similarity, 4),
            background_compliance=round(score.background_compliance, 4),
            similarity_vs_base=round(score.similarity / max(base.similarity, 1e-6), 2),
            within_budget=entry["train_wall_s"] <= BUDGET_S,
        )

    # 3. Composition: a second concept's token and a DreamBooth LoRA of a third, all in the same requests.
    if args.compose:
        report["compose"] = _compose(args, concept, images, library, work, service, judge, report, options)

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def _compose(args, concept, images, library, work, service, judge, report, options) -> dict:
    """Three concepts at once: this concept's 4-vector token, a second concept's token and a DreamBooth LoRA of a
    third, all loaded in every request. Each is scored alone (only its own adapter), beside the other two (all three
    loaded, a one-concept prompt), and in two-concept prompts ("a <A> and a <B> on a ... background", each concept
    scored on its own object). The base model's two-object score (class nouns, no adapters) is the floor.

    Tokens never touch the U-Net, so two of them compose exactly; a LoRA changes the U-Net every token goes through,
    so its weight sets how much it moves the others. Each ``--lora-weights`` value is scored, the LoRA's "alone" at the
    same weight (as a user would set ``<lora:name:0.5>`` in AUTOMATIC1111 when combining)."""
    from studio.demo import DEMO_TRAINING
    from studio.world.evaluate import evaluate_concept_pair, evaluate_concepts_in_regions
    from trainers.core.config import load_config
    from trainers.dreambooth import BASE_RECIPES, DreamBoothConfig, train_dreambooth

    main = max((e for e in report["variants"].items() if not e[1]["core_weight"]), key=lambda e: e[1]["vectors"])
    other = next(c for c in SHIPPED_CONCEPTS.values() if c.name != concept.name)
    third = next(c for c in SHIPPED_CONCEPTS.values() if c.name not in (concept.name, other.name))
    other_images, lora_images = work / "other", work / "lora"
    write_reference_folder(other, other_images)
    write_reference_folder(third, lora_images, with_captions=True)
    _train(other, other_images, library, work, name="other-ti", token=f"<{other.name}>", num_vectors=4, **options)
    values = {**DEMO_TRAINING, "token": "sks", "class_noun": third.class_noun}
    db = load_config(DreamBoothConfig, recipe=BASE_RECIPES["tiny"], values=values)
    train_dreambooth(db, lora_images, load_base_model("tiny"), name="db-lora", library=library, run_dir=work / "db")

    members = {  # concept, prompt words, its adapter, whether it is the LoRA
        concept.name: (concept, main[1]["token"], main[0], False),
        other.name: (other, f"<{other.name}>", "other-ti", False),
        third.name: (third, f"sks {third.class_noun}", "db-lora", True),
    }
    kw = {"steps": args.eval_steps, "judge": judge}
    out: dict = {"adapters": {name: member[2] for name, member in members.items()}, "by_lora_weight": {}}
    solo_tokens = {  # a token alone does not depend on the LoRA's weight
        name: evaluate_concept(service, c, words, [AdapterRef(adapter)], **kw)
        for name, (c, words, adapter, is_lora) in members.items()
        if not is_lora
    }
    names = list(members)
    same_backgrounds: dict[tuple[str, float | None], float] = {}
    for weight in [float(w) for w in args.lora_weights.split(",")]:

        def ref(adapter: str, is_lora: bool, weight: float = weight) -> AdapterRef:
            return AdapterRef(adapter, weight=weight if is_lora else 1.0)

        everything = [ref(adapter, is_lora) for _, _, adapter, is_lora in members.values()]
        entry: dict = {"concepts": {}, "pairs": {}}
        for name, (c, words, adapter, is_lora) in members.items():
            solo = solo_tokens.get(name) or evaluate_concept(service, c, words, [ref(adapter, is_lora)], **kw)
            together = evaluate_concept(service, c, words, everything, **kw)
            entry["concepts"][name] = {
                "alone": round(solo.similarity, 4),
                "all_three_loaded": round(together.similarity, 4),
                "ratio": round(together.similarity / max(solo.similarity, 1e-6), 3),
                "background_alone": round(solo.background_compliance, 4),
                "background_all_three_loaded": round(together.background_compliance, 4),
            }
        # All three in one prompt, one latent region each; the LoRA given only its own region (region=3), then
        # applied to every region, to show what scoping it buys.
        tokens = [words for _, words, _, _ in members.values()]
        region_kw = {**kw, "seeds": REGION_SEEDS}  # few backgrounds are new to all three: more seeds
        concepts = [c for c, _, _, _ in members.values()]
        for scoped in (True, False):
            refs = [
                AdapterRef(adapter, weight=weight, options={"region": index + 1} if scoped else {})
                if is_lora
                else AdapterRef(adapter)
                for index, (_, _, adapter, is_lora) in enumerate(members.values())
            ]
            scores = evaluate_concepts_in_regions(service, concepts, tokens, refs, **region_kw)
            label = "one_prompt_latent_regions" + ("" if scoped else "_lora_everywhere")
            entry[label] = {
                "prompt": " BREAK ".join(f"a {words} on a <colour> background" for words in tokens),
                "adapters": [ref.describe() for ref in refs],
                "n": scores[0].n,
            }
            for name, score in zip(members, scores, strict=True):
                # "Alone": the concept's own adapter only, one concept per image, same backgrounds and seeds.
                c, words, adapter, is_lora = members[name]
                key = (name, weight if is_lora else None)
                if key not in same_backgrounds:
                    backgrounds = sorted({row["background"] for row in score.per_prompt})
                    same_backgrounds[key] = evaluate_concept(
                        service, c, words, [ref(adapter, is_lora)], backgrounds=backgrounds, **region_kw
                    ).similarity
                alone = same_backgrounds[key]
                entry[label][name] = {
                    "alone": round(alone, 4),
                    "in_region": round(score.similarity, 4),
                    "ratio": round(score.similarity / max(alone, 1e-6), 3),
                    "background_in_region": round(score.background_compliance, 4),
                }
            print(f"one prompt at LoRA weight {weight}: {json.dumps(entry[label])}", file=sys.stderr)
        if args.skip_pairs:
            out["by_lora_weight"][str(weight)] = entry
            continue
        for a, b in [(names[0], names[1]), (names[0], names[2]), (names[1], names[2])]:
            (ca, wa, _, _), (cb, wb, _, _) = members[a], members[b]
            for regions in (None, "columns"):  # one sentence, then regional prompting (one column per concept)
                pair_kw = {**kw, "regions": regions}
                base_a, base_b = evaluate_concept_pair(service, (ca, cb), (ca.class_noun, cb.class_noun), [], **pair_kw)
                score_a, score_b = evaluate_concept_pair(service, (ca, cb), (wa, wb), everything, **pair_kw)
                prompt = f"a {wa} and a {wb} on a <colour> background"
                if regions:
                    prompt += f" ADDBASE a {wa} on a <colour> background BREAK a {wb} on a <colour> background"
                entry["pairs"][f"{a} + {b}" + (f" ({regions})" if regions else "")] = {
                    "prompt": prompt,
                    a: {"base_two_object": round(base_a.similarity, 4), "composed": round(score_a.similarity, 4)},
                    b: {"base_two_object": round(base_b.similarity, 4), "composed": round(score_b.similarity, 4)},
                    "background_compliance_base": round(base_a.background_compliance, 4),
                    "background_compliance": round(score_a.background_compliance, 4),
                    "n": score_a.n,
                }
        out["by_lora_weight"][str(weight)] = entry
        print(f"compose at LoRA weight {weight}: {json.dumps(entry['concepts'])}", file=sys.stderr)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
