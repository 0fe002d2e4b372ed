"""Taste: teach the studio what you like. A/B picks become preference pairs (`studio.preferences`), which train your
preference adapter in the job queue; liked and disliked attributes become an attribute-guidance adapter at once.
"Show two" compares two generations of your own prompt; "Quiz me" shows the pair of a fixed pool that tells the most
about your taste given your answers so far (`studio.quiz`, `trainers.preference.TasteQuiz`; on `tiny`).

>>> build_page(PageContext.create(StudioHome(Path("studio-home")))).launch()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import InvalidInputError, NotAvailableError
from studio.home import StudioHome
from ui.common import DEVICE, PageContext, user_errors

# Preference training needs a few pairs to say anything (PPD's encoder reads 4 per user).
MIN_PAIRS = 4


def available() -> bool:
    """Whether the preference store exists in this installation."""
    return importlib.util.find_spec("studio.preferences") is not None


# -- handlers ---------------------------------------------------------------------------------------------------------


def _store(context: PageContext) -> Any:
    if not available():
        raise NotAvailableError("collecting preferences is not available yet")
    from studio.preferences import PreferenceStore

    return PreferenceStore(context.home)


def show_pair(context: PageContext, user: str, prompt: str, steps: float) -> tuple[Any, Any, dict[str, Any], str]:
    """Two generations of ``prompt`` from different seeds; the pair waits in the session until a pick."""
    from pipelines import GenerationRequest
    from studio.preferences import sanitize_user

    sanitize_user(user)
    if not prompt or not prompt.strip():
        raise InvalidInputError("expected a prompt to compare images for, found an empty one")
    seed = random.randrange(2**31)
    result = context.service().generate(GenerationRequest(prompt=prompt, seeds=[seed, seed + 1], steps=int(steps)))
    left, right = result.images
    return left, right, {"prompt": prompt, "images": [left, right]}, "which one do you like better?"


# The quiz of each (home, base model, pool size): its pool is drawn and read by the judge once per process.
_QUIZZES: dict[tuple[str, str, int], Any] = {}


def quiz_pair(context: PageContext, user: str, count: int | None = None) -> tuple[Any, Any, dict[str, Any] | None, str]:
    """The next pair the taste quiz asks ``user`` about: of the base model's fixed pool of pairs (`studio.quiz`), the
    one that tells most about their taste given their answers so far (`trainers.preference.TasteQuiz`). The first
    call in a studio home draws the pool (``count`` prompts, two images each: a few minutes on a CPU)."""
    from pipelines import GenerationRequest
    from studio.adapter_files import load_adapter
    from studio.preferences import sanitize_user
    from studio.quiz import QUIZ_PROMPTS, QUIZ_STEPS, QuizAnswers, draw_pool, pool_folder
    from trainers.preference import SHIPPED_STARTS, TasteQuiz, shipped_start

    user = sanitize_user(user)
    count = count or QUIZ_PROMPTS
    service = context.service()
    start = shipped_start(service.base_model)
    if not start:
        raise NotAvailableError(
            f"the taste quiz is not available yet for base model '{context.base_model}': it needs an attributes "
            "population shipped for that model (tiny has one); 'Show two' compares your own prompts"
        )
    key = (str(context.home.root), service.fingerprint, count)
    if key not in _QUIZZES:

        def generate(prompt: str, seeds: Sequence[int]) -> list[Any]:
            return service.generate(GenerationRequest(prompt=prompt, seeds=list(seeds), steps=QUIZ_STEPS)).images

        pool = draw_pool(generate, count, pool_folder(context.home, service.fingerprint))
        _QUIZZES[key] = TasteQuiz(load_adapter(SHIPPED_STARTS[start]), pool)
    quiz = _QUIZZES[key]
    index = quiz.next_pair(QuizAnswers(context.home, user).load())
    if index is None:
        return None, None, None, f"'{user}' has answered every pair of the quiz"
    prompt, left, right = quiz.pool[index]
    pending = {"prompt": prompt, "images": [left, right], "quiz": index, "pool": count}
    return left, right, pending, f"quiz: which one do you like better? ({prompt})"


def pick(context: PageContext, user: str, pending: dict[str, Any] | None, choice: int | None) -> tuple[Any, ...]:
    """Record the pick (0 left, 1 right, None skip) as a preference pair and clear the pair; after a quiz pair, its
    answer is kept and the quiz's next pair is shown at once."""
    from studio.quiz import QuizAnswers

    if not pending or len(pending.get("images", [])) != 2:
        raise InvalidInputError("expected two images to choose from, found none: press 'Show two' or 'Quiz me' first")
    store = _store(context)
    store.add_choice(user, pending["prompt"], tuple(pending["images"]), choice)
    count = store.count(user)
    message = "skipped" if choice is None else f"recorded; {count} pair(s) for '{user}'"
    if pending.get("quiz") is None:
        return None, None, None, message
    QuizAnswers(context.home, user).record(int(pending["quiz"]), choice)
    left, right, following, question = quiz_pair(context, user, pending.get("pool"))
    return left, right, following, f"{message}; {question}"


def train_taste(context: PageContext, user: str, steps: float | None) -> str:
    """Queue the training of ``user``'s preference adapter from their pairs; ``steps`` left empty or 0 takes the
    trainer's recipe for the base model (on `tiny` its shipped start alone, `trainers.preference.resolve_start`)."""
    from studio.jobs import submit

    count = _store(context).count(user)
    if count < MIN_PAIRS:
        raise InvalidInputError(f"expected at least {MIN_PAIRS} picks from '{user}' before training, found {count}")
    job = submit(
        context.home,
        "preference",
        name=f"taste-{user}",
        base=context.base_model,
        values={"mode": "user", "steps": int(steps)} if steps else {"mode": "user"},
        options={"user": user},
    )
    return f"queued job {job.id}: adapter 'taste-{user}' from {count} pairs (see the Train page)"


def save_attributes(context: PageContext, user: str, liked: str, disliked: str) -> str:
    """Save liked/disliked attributes as the adapter ``attributes-<user>`` (replacing the previous one)."""
    from pipelines.kinds.preference import attribute_preference
    from studio.library import AdapterLibrary
    from studio.preferences import sanitize_user

    user = sanitize_user(user)
    liked_list = [item.strip() for item in (liked or "").split(",") if item.strip()]
    disliked_list = [item.strip() for item in (disliked or "").split(",") if item.strip()]
    if not liked_list and not disliked_list:
        raise InvalidInputError("expected liked or disliked attributes (comma-separated), found none")
    family = context.service().family.name
    adapter = attribute_preference(liked_list, disliked_list, family=family, user_id=user)
    library = AdapterLibrary(context.home)
    name = f"attributes-{user}"
    if library.exists(name):
        library.remove(name)
    library.add(adapter, name)
    return f"saved '{name}': use it on the Generate page (strength sets how much it steers)"


# -- layout and wiring ------------------------------------------------------------------------------------------------


def build_page(context: PageContext) -> gr.Blocks:
    """The Taste page, runnable alone or rendered into the app."""
    with gr.Blocks(title="Taste") as page:
        if not available():
            gr.Markdown("Taste is **not available yet** in this installation (no preference store).")
            return page
        with gr.Row():
            user = gr.Textbox(label="User", value="me", scale=1)
            prompt = gr.Textbox(label="Prompt", placeholder="a red circle on a blue background", scale=3)
            steps = gr.Slider(1, 50, value=20, step=1, label="Steps", scale=1)
            show = gr.Button("Show two", variant="primary", scale=1)
            # Pairs chosen from a fixed pool to learn the most from each pick (4 quiz picks say more than 4 random).
            quiz = gr.Button("Quiz me", scale=1)
        with gr.Row():
            left = gr.Image(label="Left", type="pil", interactive=False, height=320)
            right = gr.Image(label="Right", type="pil", interactive=False, height=320)
        with gr.Row():
            pick_left = gr.Button("Left is better")
            skip = gr.Button("Skip (no preference)")
            pick_right = gr.Button("Right is better")
        status = gr.Textbox(label="Status", interactive=False)
        with gr.Row():
            # 0 (the page shows an empty number as 0): the trainer's recipe for the base model (on tiny, the shipped
            # start alone, no DPO steps), as the Train page's fields at 0 are.
            train_steps = gr.Number(label="Training steps (0: the base model's recipe)", value=0, precision=0)
            train = gr.Button("Train my taste")
        with gr.Accordion("Liked and disliked attributes", open=False):
            liked = gr.Textbox(label="Liked (comma-separated)", placeholder="red, large, centered")
            disliked = gr.Textbox(label="Disliked (comma-separated)", placeholder="dark background")
            save = gr.Button("Save attributes")
        pending = gr.State(None)

        # -- wiring
        show.click(
            user_errors(lambda u, p, s: show_pair(context, u, p, s)),
            inputs=[user, prompt, steps],
            outputs=[left, right, pending, status],
            concurrency_id=DEVICE,
            concurrency_limit=1,
        )
        quiz.click(
            user_errors(lambda u: quiz_pair(context, u)),
            inputs=[user],
            outputs=[left, right, pending, status],
            concurrency_id=DEVICE,
            concurrency_limit=1,
        )
        for button, choice in ((pick_left, 0), (pick_right, 1), (skip, None)):
            button.click(
                user_errors(lambda u, p, c=choice: pick(context, u, p, c)),
                inputs=[user, pending],
                outputs=[left, right, pending, status],
            )
        train.click(user_errors(lambda u, s: train_taste(context, u, s)), inputs=[user, train_steps], outputs=status)
        save.click(
            user_errors(lambda u, a, b: save_attributes(context, u, a, b)),
            inputs=[user, liked, disliked],
            outputs=status,
            concurrency_id=DEVICE,
        )
    return page


if __name__ == "__main__":
    build_page(PageContext.create(StudioHome(Path("studio-home").resolve()))).launch()
