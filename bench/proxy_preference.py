"""A no-U-Net proxy of per-user preference mode on `tiny`: how good is the start's choice of attributes?

`bench/eval_preference.py` measures the whole method through the U-Net (about a minute per user). This proxy
separates the choice from the drawing, for hundreds of users in seconds:

1. The judge reads, once, the base model's images of the eval's own pick pools (``training_pool`` seeds 100-107:
   user ``i`` of an eval run labels pool ``100 + i``) and of the eval's held-out prompts and seeds, and caches the
   readings (``--cache``; about five minutes on 2 CPU cores the first time).
2. Each simulated user labels pairs as in the eval (ties skipped, Bradley-Terry picks) until it has ``--pairs``.
3. The start chooses attributes from those picks exactly as the trainer does (the judge reader's presence
   differences, `reading_presence`, `fit_attribute_utilities` with the shipped population's prior, `liked_attributes`).
4. Scoring assumes perfect drawing: a chosen attribute replaces what the base drew in the slot a prompt leaves open
   (a colour for prompts that name none, a background likewise); the user's score decides each comparison, a tie
   counts half.

Beside the start it prints the ``oracle`` choice (the best attribute pair for each user, chosen knowing their taste:
what a perfect reading of the picks could reach under this protocol) and, with ``--posterior N``, the choice that
maximises the expected proxy win rate under Bayes' rule over ``N`` users of the world's true prior (slow: about ten
seconds a user for N=3000). Measured (session 14, dev users 200-499, 16 picks): start 0.748, oracle 0.821; users
200-239 with ``--posterior 3000``: start 0.775, posterior 0.780.

Run: ``python bench/proxy_preference.py --users 200-499 --cache /tmp/preference-readings.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.kinds.preference import attribute_slot  # noqa: E402
from studio.adapter_files import load_adapter  # noqa: E402
from studio.world.judge import Reading  # noqa: E402
from studio.world.scene import BACKGROUNDS, background_phrase  # noqa: E402
from studio.world.users import SimulatedUser, random_user  # noqa: E402
from trainers.preference import (  # noqa: E402
    SHIPPED_STARTS,
    UTILITIES_KEY,
    UtilityPrior,
    fit_attribute_utilities,
    liked_attributes,
    reading_presence,
)

POOL_SEEDS = range(100, 108)
Pick = tuple[Reading, Reading]
Evaluation = list[tuple[str, list[Reading]]]
"""Per held-out prompt: its caption style and the base's readings of its seeds."""


def readings(cache: Path, pool_prompts: int) -> tuple[dict[int, list[tuple[Reading, Reading]]], Evaluation]:
    """The judge's readings of the pick pools and of the eval's base images, from ``cache`` or made and cached."""
    if not cache.is_file():
        import eval_preference as ep

        setup = ep.Setup(argparse.Namespace(smoke=False, base="tiny", steps=20, guidance=7.5, prompt_style="open"))
        data: dict[str, list] = {}
        for seed in POOL_SEEDS:
            pool = ep.training_pool(setup, pool_prompts, seed=seed)
            data[str(seed)] = [[r.to_dict() for r in setup.read([a, b])] for _, a, b in pool]
        data["eval"] = [
            [scene.caption_style, [r.to_dict() for r in setup.read(setup.base_images(ep.caption_for(scene)))]]
            for scene in ep.evaluation_scenes(24, "open")
        ]
        cache.write_text(json.dumps(data))
    data = json.loads(cache.read_text())
    pools = {
        int(seed): [(Reading.from_dict(a), Reading.from_dict(b)) for a, b in rows]
        for seed, rows in data.items()
        if seed != "eval"
    }
    return pools, [(style, [Reading.from_dict(r) for r in rows]) for style, rows in data["eval"]]


def user_picks(user: SimulatedUser, pool: Sequence[tuple[Reading, Reading]], count: int) -> list[Pick]:
    """(preferred, other) readings as the eval labels them: ties skipped, noisy picks, until ``count``."""
    rng = random.Random(f"picks:{user.name}")
    picks: list[Pick] = []
    for first, second in pool:
        a, b = user.score_reading(first), user.score_reading(second)
        if a == b:
            continue
        picks.append((first, second) if user.pick(a, b, rng) == 0 else (second, first))
        if len(picks) == count:
            break
    return picks


def drawn(reading: Reading, style: str, chosen: Sequence[str]) -> Reading:
    """``reading`` with the chosen attributes drawn in the slots a prompt of ``style`` leaves open."""
    for attribute in chosen:
        words = attribute.split()
        if len(words) == 2 and style in ("bare", "no_background"):
            reading = replace(reading, background=next(b for b in BACKGROUNDS if background_phrase(b) == words[0]))
        elif len(words) == 1 and style in ("bare", "no_colour"):
            reading = replace(reading, colour=attribute)
    return reading


def win_rate(user: SimulatedUser, evaluation: Evaluation, chosen: Sequence[str]) -> float:
    """The user's proxy win rate of ``chosen`` against the base (a tie counts half)."""
    scores = []
    for style, base_readings in evaluation:
        for base in base_readings:
            ours, theirs = user.score_reading(drawn(base, style, chosen)), user.score_reading(base)
            scores.append(1.0 if ours > theirs else 0.5 if ours == theirs else 0.0)
    return float(np.mean(scores))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="200-499", help="random_user seeds, FIRST-LAST (development: below 1000)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=Path("preference-readings.json"))
    parser.add_argument("--pool-prompts", type=int, default=64, help="prompts per pick pool when the cache is made")
    parser.add_argument("--posterior", type=int, default=0, help="also the Bayes choice over N true-prior users")
    args = parser.parse_args(argv)
    first, _, last = args.users.partition("-")
    pools, evaluation = readings(args.cache, args.pool_prompts)
    start = load_adapter(SHIPPED_STARTS["tiny"])
    candidates = [str(c) for c in start.metadata.config["candidates"]]
    prior = UtilityPrior.from_population(start.tensors[UTILITIES_KEY].float())
    margin, top = float(start.metadata.config["init_margin"]), 2
    options = [[]] + [[c] for c in candidates]
    options += [list(p) for p in itertools.combinations(candidates, 2) if attribute_slot(p[0]) != attribute_slot(p[1])]
    prior_users = [random_user(seed) for seed in range(500_000, 500_000 + args.posterior)]
    results: dict[str, list[float]] = {"start": [], "oracle": [], **({"posterior": []} if prior_users else {})}
    used: list[int] = []
    for seed in range(int(first), int(last or first) + 1):
        user = random_user(seed)
        picks = user_picks(user, pools[POOL_SEEDS[seed % len(POOL_SEEDS)]], args.pairs)
        used.append(len(picks))  # fewer than --pairs when the cached pool runs out
        differences = torch.stack([reading_presence(a, candidates) - reading_presence(b, candidates) for a, b in picks])
        utilities = fit_attribute_utilities(differences, 3.0, prior)
        results["start"].append(win_rate(user, evaluation, liked_attributes(candidates, utilities, margin, top)))
        results["oracle"].append(max(win_rate(user, evaluation, chosen) for chosen in options))
        if prior_users:
            log_likelihood = np.array([
                -sum(np.logaddexp(0.0, -(u.score_reading(a) - u.score_reading(b)) / u.temperature) for a, b in picks)
                for u in prior_users
            ])  # fmt: skip
            weights = np.exp(log_likelihood - log_likelihood.max())
            likely = np.argsort(-weights)[:300]

            def expected(chosen: list[str], likely: np.ndarray = likely, weights: np.ndarray = weights) -> float:
                total = sum(weights[i] * win_rate(prior_users[i], evaluation, chosen) for i in likely)
                return float(total / weights[likely].sum())

            results["posterior"].append(win_rate(user, evaluation, max(options, key=expected)))
    for name, rates in results.items():
        print(
            f"{name:>9}: proxy win rate {np.mean(rates):.3f} over {len(rates)} users ({np.mean(used):.1f} picks each)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
