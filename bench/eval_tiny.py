"""Prompt compliance of the embedded base model `tiny` on held-out captions (issue: the embedded default).

Over captions whose (shape, colour, background) combinations never appear together in tiny's training data, the
judge checks that the generated image has the right shape, colour and background (single-object scenes), and both
objects plus the background (two-object scenes). Prints a JSON report and writes a sample sheet.

    python bench/eval_tiny.py --single 200 --double 100 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.service import PipelineService
from studio.base_models import load_base_model
from studio.world.evaluate import contact_sheet, held_out_scenes, prompt_compliance
from studio.world.judge import Judge
from studio.world.scene import caption_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--double", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--sheet", type=Path, default=Path("runs/eval_tiny.png"))
    args = parser.parse_args()

    start = time.time()
    service = PipelineService(load_base_model(args.base), "cpu")
    judge = Judge.load()
    single_scenes = held_out_scenes(args.single, seed=args.seed)
    double_scenes = held_out_scenes(args.double, two_objects=True, seed=args.seed)
    single = prompt_compliance(
        service, single_scenes, seed=args.seed, steps=args.steps, guidance=args.guidance, judge=judge
    )
    double = prompt_compliance(
        service, double_scenes, seed=args.seed, steps=args.steps, guidance=args.guidance, judge=judge
    )
    rows = [(caption_for(s), [im]) for s, im in zip(single_scenes[:8], single["images"][:8], strict=True)]
    contact_sheet([(f"{i}: {c}", ims) for i, (c, ims) in enumerate(rows)], args.sheet)
    report = {
        "base": args.base,
        "steps": args.steps,
        "guidance": args.guidance,
        "single_object": {k: v for k, v in single.items() if k != "images"},
        "two_objects": {k: v for k, v in double.items() if k != "images"},
        "seconds": round(time.time() - start, 1),
        "sheet": str(args.sheet),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
