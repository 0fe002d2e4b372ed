"""The preference benchmark's ceilings: the user's hidden taste (oracle), or what their picks tell (posterior), written
only into what a prompt leaves open."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from studio.world.scene import ObjectSpec, Scene
from studio.world.users import SimulatedUser


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "eval_preference.py"
    spec = importlib.util.spec_from_file_location("eval_preference_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def scene(style: str, colour: str = "blue", background: str = "white") -> Scene:
    return Scene(background, (ObjectSpec("circle", colour),), caption_style=style)


def test_oracle_fills_only_what_the_prompt_leaves_open(bench):
    warm_dark_large = SimulatedUser("u", {"warm_object": 1.0, "dark_background": 1.0, "large_object": 0.5})
    assert bench.oracle_prompt(warm_dark_large, scene("bare")) == "a large red circle on a blue background"
    # The prompt's own colour and background stay; only the open parts take the user's words.
    assert bench.oracle_prompt(warm_dark_large, scene("no_colour")) == "a large red circle on a white background"
    # A blue object never goes on the blue background it would vanish into: the next dark one.
    assert bench.oracle_prompt(warm_dark_large, scene("no_background")) == "a large blue circle on a purple background"
    assert bench.oracle_prompt(warm_dark_large, scene("full")) == "a large blue circle on a white background"


def test_oracle_leaves_open_what_the_user_does_not_care_about(bench):
    small_textured = SimulatedUser("u", {"textured_background": 1.0, "large_object": -0.5})
    # No colour taste: the colour stays open; any texture scores alike, so the first is taken.
    assert bench.oracle_prompt(small_textured, scene("bare")) == "a small circle on a striped background"
    # The favourite colour can be the object's or the background's, whichever scores higher with the rest.
    fan = SimulatedUser("u", {"favourite_colour": 1.0, "cool_object": 0.5}, favourite="orange")
    assert bench.oracle_prompt(fan, scene("bare")) == "a green circle on an orange background"


def reading(colour: str, background: str, coverage: float = 0.15):
    from studio.world.judge import Reading

    return Reading(background, 1, "circle", colour, [], coverage, 1.0)


def test_the_posterior_ceiling_writes_what_the_picks_tell(bench):
    warm = SimulatedUser("warm", {"warm_object": 1.0})
    cool = SimulatedUser("cool", {"cool_object": 1.0})
    dark = SimulatedUser("dark", {"dark_background": 1.0})
    # Red was picked over blue twice: of these three tastes, only the warm one explains it.
    picks = [(reading("red", "white"), reading("blue", "white"))] * 2
    posterior = bench.TastePosterior(picks, [warm, cool, dark])
    assert posterior.prompt(scene("no_colour")) == "a red circle on a white background"
    # No pick at all: the prior alone, where warm and cool cancel and a dark background is liked on average.
    flat = bench.TastePosterior([], [warm, cool, dark])
    assert flat.prompt(scene("no_background")) == "a blue circle on a purple background"


def test_the_proxy_scores_the_starts_choice_by_drawing_it_into_open_slots(tmp_path, capsys):
    import json
    import random
    import re

    path = Path(__file__).resolve().parent.parent / "bench" / "proxy_preference.py"
    spec = importlib.util.spec_from_file_location("proxy_preference_under_test", path)
    proxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proxy)
    from studio.world.judge import Reading

    base = Reading("white", 1, "circle", "blue", [("circle", "blue")], 0.15, 1.0)
    # Drawing fills only what the prompt leaves open.
    assert proxy.drawn(base, "bare", ["red", "dotted background"]).colour == "red"
    assert proxy.drawn(base, "bare", ["red", "dotted background"]).background == "dots"
    # "a circle on a white background" names the background, "a blue circle" the colour.
    assert proxy.drawn(base, "no_colour", ["red", "dotted background"]).background == "white"
    assert proxy.drawn(base, "no_background", ["red", "dotted background"]).colour == "blue"
    fan = SimulatedUser("u", {"textured_background": 1.0})
    evaluation = [("bare", [base]), ("no_colour", [base])]
    assert proxy.win_rate(fan, evaluation, ["dotted background"]) == 0.75  # a win, and a tie where it is named
    assert proxy.win_rate(fan, evaluation, []) == 0.5

    # The whole run on readings made up for it: the oracle is a ceiling of the start.
    rng = random.Random(0)

    def reading() -> dict:
        colour, background = rng.choice(["red", "blue", "green"]), rng.choice(["white", "black", "dots"])
        return Reading(background, 1, "circle", colour, [("circle", colour)], 0.15, 1.0).to_dict()

    cache = {str(seed): [[reading(), reading()] for _ in range(40)] for seed in proxy.POOL_SEEDS}
    cache["eval"] = [[style, [reading(), reading()]] for style in ("bare", "no_colour", "no_background")]
    (tmp_path / "cache.json").write_text(json.dumps(cache))
    assert proxy.main(["--users", "200-203", "--cache", str(tmp_path / "cache.json")]) == 0
    rates = dict(re.findall(r"(\w+): proxy win rate ([\d.]+)", capsys.readouterr().out))
    start, oracle = float(rates["start"]), float(rates["oracle"])
    assert 0.0 <= start <= oracle <= 1.0
