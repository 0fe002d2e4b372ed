"""The taste quiz: which pair of a fixed pool to show a new user next, and the pool and answers it keeps."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from PIL import Image, ImageColor

from studio.adapter_files import AdapterFile, AdapterMetadata, load_adapter
from studio.errors import InvalidInputError
from studio.home import StudioHome
from studio.preferences import PreferenceStore
from studio.quiz import QuizAnswers, draw_pool, quiz_prompts
from studio.world.scene import COLOURS
from trainers.preference import SHIPPED_STARTS, TasteQuiz, informative_pair

NAMED = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "gray")


class ColourReader:
    """Reads an image's object colour (its centre) and background (its corner) by name, as the judge reads them."""

    name = "judge"

    def presence(self, images: Sequence[Image.Image], attributes: Sequence[str]) -> torch.Tensor:
        rows = []
        for image in images:
            colour, background = (_name(image.getpixel(xy)) for xy in ((4, 4), (0, 0)))
            rows.append([float(a == colour or a == f"{background} background") for a in attributes])
        return torch.tensor(rows)


def _name(rgb: tuple[int, ...]) -> str:
    return next(c for c in NAMED if ImageColor.getrgb(c) == rgb)


def solid(colour: str, background: str | None = None) -> Image.Image:
    """An object of ``colour`` (the centre) on ``background`` (the rest; the object's colour when not given)."""
    image = Image.new("RGB", (8, 8), background or colour)
    image.paste(colour, (2, 2, 6, 6))
    return image


def test_the_quiz_asks_what_the_population_still_disagrees_on():
    # Four people: each likes or dislikes attribute 0 and attribute 1. Pair 0 differs in attribute 0, pair 1 in
    # attribute 1, pair 2 in nothing.
    committee = torch.tensor([[3.0, 3.0], [3.0, -3.0], [-3.0, 3.0], [-3.0, -3.0]])
    differences = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    first = informative_pair(differences, committee, [], set())
    assert first in (0, 1)
    # Once the user has answered about one attribute, the committee agrees on that pair: ask about the other.
    assert informative_pair(differences, committee, [(first, 1.0)], {first}) == 1 - first
    # A pair that differs in nothing is asked only when nothing else is left; then the pool is used up.
    assert informative_pair(differences, committee, [(0, 1.0), (1, -1.0)], {0, 1}) == 2
    assert informative_pair(differences, committee, [(0, 1.0), (1, -1.0)], {0, 1, 2}) is None


def test_a_skip_tells_the_quiz_to_ask_about_something_else():
    # Two people care about the colour only, two about the background only. Pairs 0 and 1 differ in the colour,
    # pair 2 in the background.
    committee = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    differences = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert informative_pair(differences, committee, [], set()) == 0
    # Skipping the colour pair says this person does not mind the colour: ask about the background next.
    assert informative_pair(differences, committee, [(0, 0.0)], {0}) == 2
    # Picking in it says they do: the other colour pair tells nothing more, the background pair still does.
    assert informative_pair(differences, committee, [(0, 1.0)], {0}) == 2


def test_the_quiz_on_the_shipped_start_shows_pairs_that_tell_something_and_never_the_same_twice():
    pool = [
        ("a circle", solid("red", "white"), solid("red", "white")),  # the same image: a pick says nothing
        ("a square", solid("red", "white"), solid("blue", "white")),
        ("a star", solid("gray", "white"), solid("gray", "white")),
        ("a triangle", solid("green", "white"), solid("orange", "white")),
    ]
    quiz = TasteQuiz(load_adapter(SHIPPED_STARTS["tiny"]), pool, ColourReader())
    answers: dict[int, int | None] = {}
    asked = []
    while (index := quiz.next_pair(answers)) is not None:
        asked.append(index)
        answers[index] = 0 if len(asked) % 2 else None  # a pick, then a skip
    assert sorted(asked) == [0, 1, 2, 3]
    assert set(asked[:2]) == {1, 3}


def test_the_quiz_asks_about_one_thing_at_a_time_before_pairs_that_change_two():
    pool = [
        ("a circle", solid("red", "white"), solid("blue", "black")),  # colour and background both differ
        ("a square", solid("red", "white"), solid("blue", "white")),  # only the colour
        ("a star", solid("green", "white"), solid("green", "black")),  # only the background
    ]
    quiz = TasteQuiz(load_adapter(SHIPPED_STARTS["tiny"]), pool, ColourReader())
    assert quiz.one_slot.tolist() == [False, True, True]
    first = quiz.next_pair({})
    second = quiz.next_pair({first: 0})
    assert {first, second} == {1, 2}
    assert quiz.next_pair({first: 0, second: 1}) == 0


def test_the_quiz_needs_an_attributes_population():
    user = AdapterFile({"tokens": torch.zeros(4, 8)}, AdapterMetadata(kind="preference", family="sd1", config={}))
    with pytest.raises(InvalidInputError, match="expected an 'attributes' population model") as error:
        TasteQuiz(user, [("a circle", solid("red"), solid("blue"))], ColourReader())
    assert "\n" not in str(error.value)


def test_the_pool_is_drawn_once_and_read_back(tmp_path):
    calls = []

    def generate(prompt: str, seeds: Sequence[int]) -> list[Image.Image]:
        calls.append((prompt, tuple(seeds)))
        return [solid("red"), solid("blue")]

    folder = tmp_path / "quiz"
    pool = draw_pool(generate, 3, folder)
    assert [(prompt, seeds) for prompt, seeds in calls] == quiz_prompts(3)
    again = draw_pool(generate, 3, folder)
    assert len(calls) == 3  # read from the folder, not drawn again
    assert [p for p, _, _ in again] == [p for p, _, _ in pool]
    assert again[1][2].getpixel((0, 0)) == (0, 0, 255)
    # Every prompt leaves the colour, the background or both to the model.
    for prompt, _ in quiz_prompts(32):
        assert not (prompt.split()[1] in COLOURS and "background" in prompt), prompt


def test_quiz_answers_are_kept_per_user(tmp_path):
    home = StudioHome(tmp_path).ensure()
    answers = QuizAnswers(home, "alice")
    assert answers.load() == {}
    answers.record(4, 0)
    assert QuizAnswers(home, "alice").record(7, None) == {4: 0, 7: None}
    assert QuizAnswers(home, "bob").load() == {}
    with pytest.raises(InvalidInputError, match="expected the choice 0, 1 or none"):
        answers.record(1, 2)
    answers.path.write_text("{not json")
    with pytest.raises(InvalidInputError, match="expected quiz answers as JSON"):
        answers.load()


def test_the_taste_page_quizzes_a_user_on_the_embedded_model_and_never_asks_twice(home):
    from ui.common import PageContext
    from ui.taste import pick, quiz_pair

    context = PageContext.create(home)
    left, right, pending, message = quiz_pair(context, "alice", count=3)
    assert left.size == right.size and message.startswith("quiz: which one")
    first = pending["quiz"]
    # A pick records the pair and the answer, and the next quiz pair follows at once.
    *_, following, message = pick(context, "alice", pending, 0)
    assert QuizAnswers(home, "alice").load() == {first: 0}
    assert PreferenceStore(home).count("alice") == 1 and "quiz: which one" in message
    assert following["quiz"] != first
    # A skip stores no pair, but the pair is not asked again.
    *_, last, _ = pick(context, "alice", following, None)
    assert last["quiz"] not in (first, following["quiz"])
    *_, done, message = pick(context, "alice", last, 1)
    assert done is None and message.endswith("'alice' has answered every pair of the quiz")
    assert PreferenceStore(home).count("alice") == 2


def test_the_quiz_is_not_available_yet_for_a_base_model_without_a_population(home, tmp_path, tiny_sd1_pipe):
    from studio.errors import NotAvailableError
    from ui.common import PageContext
    from ui.taste import quiz_pair

    tiny_sd1_pipe.save_pretrained(tmp_path / "base")
    with pytest.raises(NotAvailableError, match="not available yet for base model"):
        quiz_pair(PageContext.create(home, str(tmp_path / "base")), "alice", count=3)
