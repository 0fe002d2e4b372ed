"""Train: upload photos, choose a method and its main options, queue the run; watch the queue live.

Training never runs in this process: "Queue training" checks the upload and the options and submits a job
(`studio.jobs.submit`); the background worker trains. A timer polls the job database for progress, ETA, the loss
curve and sample images.

>>> build_page(PageContext.create(StudioHome(Path("studio-home")))).launch()  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import InvalidInputError
from studio.home import StudioHome
from studio.jobs import METHODS, Job, JobStore, submit
from ui.common import PageContext, save_training_uploads, seconds_text, user_errors

JOB_COLUMNS = ["id", "state", "method", "name", "progress", "ETA", "message"]
# Page fields -> each method's config keys (configs are strict: a key a method lacks is an error, so map per method).
FIELDS = {
    "textual-inversion": {"token": "placeholder_token", "init_word": "init_word", "num_vectors": "num_vectors"},
    "dreambooth": {"token": "token", "class_noun": "class_noun", "rank": "rank"},
    "neti": {"token": "placeholder_token", "super_category": "super_category"},
}
COMMON_FIELDS = {"steps": "steps", "lr": "lr", "seed": "seed"}
# Number fields where 0 means "the method's default" (its measured recipe for the base model, else the field default).
DEFAULT_WHEN_ZERO = ("steps", "lr", "num_vectors", "rank")
POLL_SECONDS = 2.0
MAX_SAMPLES = 8


# -- handlers ---------------------------------------------------------------------------------------------------------


def trainable_methods() -> list[str]:
    """Methods the queue can run from uploaded images (preference runs start from the Taste page)."""
    return [name for name, method in METHODS.items() if method.needs_images]


def queue_training(
    context: PageContext,
    files: list[Any] | None,
    method: str,
    name: str,
    token: str,
    word: str,
    steps: float,
    lr: float,
    num_vectors: float,
    rank: float,
    seed: float,
    overrides: str,
) -> tuple[str, list[list[Any]], Any]:
    """Check the upload and options, queue the job; returns a message, the refreshed job list and the job picker."""
    if not name or not name.strip():
        raise InvalidInputError("expected a name for the new adapter, found an empty one")
    if method not in METHODS:
        raise InvalidInputError(f"expected a method ({', '.join(trainable_methods())}), found '{method}'")
    # 1. The page's fields as config values, only the keys this method has; the rest as `key=value` lines.
    given = {"token": token, "init_word": word, "class_noun": word, "super_category": word}
    given.update({"steps": steps, "lr": lr, "num_vectors": num_vectors, "rank": rank, "seed": seed})
    # A method registered by a plugin gets the textual-inversion fields (token and init word).
    mapping = {**COMMON_FIELDS, **FIELDS.get(method, FIELDS["textual-inversion"])}
    values = {}
    for field, key in mapping.items():
        value = given.get(field)
        if value in (None, "") or (field in DEFAULT_WHEN_ZERO and not value):
            continue
        values[key] = int(value) if isinstance(value, float) and value.is_integer() and field != "lr" else value
    lines = [line.strip() for line in (overrides or "").splitlines() if line.strip()]

    # 2. The uploads, checked and copied into the studio home; then one call into the queue.
    images = save_training_uploads(files, context.home)
    job = submit(
        context.home, method, name=name.strip(), images=images, base=context.base_model, values=values, overrides=lines
    )
    return (
        f"queued job {job.id}: {job.method} '{job.name}'",
        job_rows(context),
        gr.Dropdown(choices=job_choices(context), value=str(job.id)),
    )


def job_rows(context: PageContext) -> list[list[Any]]:
    """The job table: newest first."""
    return [_row(job) for job in JobStore(context.home).list(limit=50)]


def job_choices(context: PageContext) -> list[str]:
    """Job ids for the picker, newest first."""
    return [str(job.id) for job in JobStore(context.home).list(limit=50)]


def job_details(context: PageContext, job_id: str | None) -> tuple[str, Any, list[Any]]:
    """One job: a progress line, its loss curve (step, loss) and its sample images (loaded, not served as files)."""
    import pandas as pd
    from PIL import Image

    empty = pd.DataFrame({"step": [], "loss": []})
    if not job_id:
        return "no job selected", empty, []
    store = JobStore(context.home)
    job = store.get(_job_id(job_id))
    losses = store.losses(job.id)
    bar = _bar(job.fraction)
    text = f"job {job.id} {job.state}: {bar} {job.step}/{job.total_steps} ({job.fraction:.0%})"
    text += f", ETA {seconds_text(job.eta_s)}"
    if job.error:
        text += f"\nerror: {job.error}"
    elif job.message:
        text += f"\n{job.message}"
    if job.state == "succeeded" and job.outputs.get("adapter"):
        text += f"\nadapter '{job.outputs['adapter']}' is in the library"
    curve = pd.DataFrame({"step": [s for s, _ in losses], "loss": [v for _, v in losses]}) if losses else empty
    # Samples live in the run folder, outside what the app serves: hand Gradio the pixels, not the paths.
    samples = []
    for path in job.outputs.get("samples", [])[-MAX_SAMPLES:]:
        if Path(path).is_file():
            with Image.open(path) as image:
                samples.append((image.convert("RGB"), Path(path).stem))
    return text, curve, samples


def cancel_job(context: PageContext, job_id: str | None) -> tuple[str, list[list[Any]]]:
    """Cancel the picked job (a running one stops after its current step)."""
    if not job_id:
        raise InvalidInputError("expected a job to cancel, found none selected")
    job = JobStore(context.home).cancel(_job_id(job_id))
    message = f"cancelled job {job.id}" if job.state == "cancelled" else f"job {job.id} stops after its current step"
    return message, job_rows(context)


def resume_job(context: PageContext, job_id: str | None) -> tuple[str, list[list[Any]]]:
    """Queue an interrupted, failed or cancelled job again (from its last checkpoint)."""
    if not job_id:
        raise InvalidInputError("expected a job to resume, found none selected")
    job = JobStore(context.home).resume(_job_id(job_id))
    return f"queued job {job.id} again", job_rows(context)


def _job_id(text: Any) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise InvalidInputError(f"expected a job id (a number), found '{text}'") from None


def _row(job: Job) -> list[Any]:
    progress = f"{job.step}/{job.total_steps} ({job.fraction:.0%})" if job.total_steps else "-"
    return [job.id, job.state, job.method, job.name, progress, seconds_text(job.eta_s), job.error or job.message]


def _bar(fraction: float, width: int = 20) -> str:
    done = int(round(fraction * width))
    return "[" + "#" * done + "." * (width - done) + "]"


# -- layout and wiring ------------------------------------------------------------------------------------------------


def build_page(context: PageContext) -> gr.Blocks:
    """The Train page, runnable alone or rendered into the app."""
    methods = trainable_methods()
    with gr.Blocks(title="Train") as page:
        with gr.Row():
            with gr.Column(scale=2):
                # A short drop zone and the rarely changed options folded keep "Queue training" on screen at 1280x800.
                files = gr.File(
                    label="Training images (and .txt captions with the same names)",
                    file_count="multiple",
                    file_types=["image", ".txt"],
                    height=140,
                    elem_id="train-images",
                )
                method = gr.Radio(methods, value=methods[0] if methods else None, label="Method")
                with gr.Row():
                    name = gr.Textbox(label="Adapter name", placeholder="my-toy", scale=2)
                    steps = gr.Number(label="Steps (0: method default)", value=0, precision=0, scale=1)
                with gr.Row():
                    token = gr.Textbox(label="Trigger word / placeholder token", placeholder="<my-toy>")
                    word = gr.Textbox(label="Init word / class noun / super-category", placeholder="toy")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        lr = gr.Number(label="Learning rate (0: method default)", value=0)
                        seed = gr.Number(label="Seed", value=0, precision=0)
                    with gr.Row():
                        num_vectors = gr.Number(
                            label="Vectors per token (textual inversion; 0: method default)", value=0, precision=0
                        )
                        rank = gr.Number(label="LoRA rank (DreamBooth; 0: method default)", value=0, precision=0)
                    overrides = gr.Textbox(label="More options, one key=value per line", lines=3)
                submit_button = gr.Button("Queue training", variant="primary")
                status = gr.Textbox(label="Status", interactive=False)
            with gr.Column(scale=3):
                jobs = gr.Dataframe(headers=JOB_COLUMNS, label="Jobs", interactive=False, wrap=True)
                with gr.Row():
                    picked = gr.Dropdown([], label="Job", scale=2, allow_custom_value=True)
                    cancel = gr.Button("Cancel job", variant="stop", scale=1)
                    resume = gr.Button("Resume job", scale=1)
                progress = gr.Textbox(label="Progress", interactive=False, lines=2)
                curve = gr.LinePlot(x="step", y="loss", label="Loss", height=220)
                samples = gr.Gallery(label="Samples", columns=4, fit_columns=False, height=200, object_fit="contain")
        timer = gr.Timer(POLL_SECONDS)

        # -- wiring
        def refresh(job_id: str | None) -> tuple[Any, ...]:
            picker = gr.Dropdown(choices=job_choices(context), value=job_id)
            return (job_rows(context), picker, *job_details(context, job_id))

        page.load(refresh, inputs=picked, outputs=[jobs, picked, progress, curve, samples])
        timer.tick(refresh, inputs=picked, outputs=[jobs, picked, progress, curve, samples], show_progress="hidden")
        picked.change(
            user_errors(lambda job_id: job_details(context, job_id)), inputs=picked, outputs=[progress, curve, samples]
        )
        submit_button.click(
            user_errors(lambda *values: queue_training(context, *values)),
            inputs=[files, method, name, token, word, steps, lr, num_vectors, rank, seed, overrides],
            outputs=[status, jobs, picked],
            api_name="queue_training",
        )
        cancel.click(user_errors(lambda job_id: cancel_job(context, job_id)), inputs=picked, outputs=[status, jobs])
        resume.click(user_errors(lambda job_id: resume_job(context, job_id)), inputs=picked, outputs=[status, jobs])

        # For scripts and tests: one job's state as JSON, without the page.
        def job_state(job_id: str) -> dict:
            info = JobStore(context.home).get(_job_id(job_id)).to_dict()
            # Gradio takes any dict with a "path" key for a file to serve, and the library is not served (a client
            # then fails with 403): the adapter's path travels under another key.
            outputs = dict(info["outputs"])
            if "path" in outputs:
                outputs["adapter_path"] = outputs.pop("path")
            return {**info, "outputs": outputs}

        gr.api(user_errors(job_state), api_name="job")
    return page


if __name__ == "__main__":
    build_page(PageContext.create(StudioHome(Path("studio-home").resolve()))).launch()
