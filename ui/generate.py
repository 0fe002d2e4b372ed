"""Generate: a prompt, the sampling options and any adapters from the library, each with its own weight.

Every image is saved under ``home/outputs`` with its full generation parameters (A1111 ``parameters`` and the
studio's JSON), so it can be made again.

>>> build_page(PageContext.create(StudioHome(Path("studio-home")))).launch()  # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import InvalidInputError
from studio.home import StudioHome
from ui.common import DEVICE, PageContext, user_errors

ADAPTER_COLUMNS = ["adapter", "weight", "truncation", "encode_steps", "strength", "region"]
# The per-adapter options after the weight, in column order; each goes into `AdapterRef.options` under its name.
OPTION_COLUMNS = ADAPTER_COLUMNS[2:]
SCHEDULERS = ["default", "ddim", "euler", "euler_a", "dpm++", "unipc", "pndm"]
# pipelines.requests.REGION_LAYOUTS, with "none" first, then each in latent mode (one U-Net view per region)
REGIONS = ["none", "columns", "rows", "columns (latent)", "rows (latent)"]
MAX_IMAGES = 4


# -- handlers ---------------------------------------------------------------------------------------------------------


def adapter_choices(context: PageContext) -> list[str]:
    """Library adapters that generation can use (``population`` preference models are only for training)."""
    from studio.library import AdapterLibrary

    return [
        info.name
        for info in AdapterLibrary(context.home).list()
        if not (info.kind == "preference" and '"population"' in info.metadata.get("studio.config", ""))
    ]


def adapter_rows(selected: list[str] | None, table: Any) -> list[list[Any]]:
    """The weight table for the chosen adapters, keeping what the user already typed for each."""
    previous = {row[0]: row for row in _rows(table) if row and row[0]}
    return [previous.get(name, [name, 1.0, *[""] * len(OPTION_COLUMNS)]) for name in selected or []]


def parse_adapters(table: Any) -> list[Any]:
    """`AdapterRef` s from the table: weight, and NeTI ``truncation`` and ``encode_steps`` / preference ``strength`` /
    a LoRA's latent ``region`` when filled in (the same options as the CLI's ``NAME:WEIGHT,KEY=VALUE``)."""
    from pipelines import AdapterRef

    refs = []
    for row in _rows(table):
        if not row or _blank(row[0]):
            continue
        name = str(row[0]).strip()
        weight = _number(row[1] if len(row) > 1 else None, f"the weight of adapter '{name}'", default=1.0)
        options = {}
        for key, value in zip(OPTION_COLUMNS, row[2:], strict=False):
            if not _blank(value):
                options[key] = _number(value, f"the {key} of adapter '{name}'")
        refs.append(AdapterRef(name=name, weight=weight, options=options))
    return refs


def generate(
    context: PageContext,
    prompt: str,
    negative: str,
    seed: float | None,
    num_images: float,
    steps: float,
    guidance: float,
    width: float,
    height: float,
    scheduler: str,
    adapters: Any,
    regions: str | None = None,
) -> tuple[list[tuple[str, str]], str]:
    """Make the images, save them with their parameters under ``home/outputs``; returns the gallery and a note."""
    from pipelines import GenerationRequest, save_png

    # 1. Check what the page sent and build the request (the service validates the rest).
    if not prompt or not prompt.strip():
        raise InvalidInputError("expected a prompt, found an empty one")
    first = int(seed) if seed is not None and int(seed) >= 0 else random.randrange(2**31)
    count = int(num_images)
    if not 1 <= count <= MAX_IMAGES:
        raise InvalidInputError(f"expected 1 to {MAX_IMAGES} images, found {count}")
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative or "",
        seeds=[first + i for i in range(count)],
        steps=int(steps),
        guidance=float(guidance),
        width=int(width) if width else None,
        height=int(height) if height else None,
        scheduler=None if scheduler in (None, "", "default") else scheduler,
        adapters=parse_adapters(adapters),
        regions=None if regions in (None, "", "none") else regions.split()[0],
        region_mode="latent" if regions and regions.endswith("(latent)") else "attention",
    )

    # 2. One call into the shared pipeline.
    result = context.service().generate(request)

    # 3. Save every image with its parameters; the gallery shows the saved files.
    folder = context.home.outputs / time.strftime("%Y-%m-%d")
    stamp = time.strftime("%H%M%S")
    gallery = []
    for image, metadata, image_seed in zip(result.images, result.metadata, request.seeds, strict=True):
        path = _free_path(folder / f"{stamp}-{image_seed}.png")
        save_png(image, path, metadata)
        gallery.append((str(path), f"seed {image_seed}"))
    note = f"{len(gallery)} image(s), seeds {request.seeds[0]}..{request.seeds[-1]}, saved in {folder}"
    if result.timings:
        note += f"; {sum(result.timings.values()):.1f}s"
    for warning in result.warnings:
        note += f"\nwarning: {warning}"
    return gallery, note


def _free_path(path: Path) -> Path:
    counter = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    return candidate


def _rows(table: Any) -> list[list[Any]]:
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):  # a pandas DataFrame
        return [list(row) for row in table.values.tolist()]
    if isinstance(table, dict):
        return [list(row) for row in table.get("data") or []]
    return [list(row) for row in table]


def _blank(value: Any) -> bool:
    # An empty table cell arrives as None, "" or NaN depending on the column type.
    if isinstance(value, float):
        return value != value
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: Any, what: str, default: float | None = None) -> float:
    if _blank(value) and default is not None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"expected a number for {what}, found {value!r}") from None


# -- layout and wiring ------------------------------------------------------------------------------------------------


def build_page(context: PageContext) -> gr.Blocks:
    """The Generate page, runnable alone (``build_page(ctx).launch()``) or rendered into the app."""
    with gr.Blocks(title="Generate") as page:
        # The prompt and its button span the top, so "Generate" is on screen without scrolling (1280x800).
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a photo of <my-toy> on a beach")
                negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Column(scale=1, min_width=160):
                run = gr.Button("Generate", variant="primary", size="lg")
        with gr.Row():
            # Half the page each: the adapter table's six columns need about 560 pixels to show whole at 1280.
            with gr.Column(scale=1):
                with gr.Row():
                    seed = gr.Number(label="Seed (-1: random)", value=0, precision=0)
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
                with gr.Row():
                    width = gr.Number(label="Width (0: model default)", value=0, precision=0)
                    height = gr.Number(label="Height (0: model default)", value=0, precision=0)
                    scheduler = gr.Dropdown(SCHEDULERS, value="default", label="Sampler")
                    regions = gr.Dropdown(
                        REGIONS,
                        value="none",
                        label="Regions (prompt parts split by BREAK)",
                    )
                with gr.Accordion("Adapters", open=True):
                    chosen = gr.Dropdown(
                        [], multiselect=True, label="Adapters from the library", allow_custom_value=True
                    )
                    adapters = gr.Dataframe(
                        headers=ADAPTER_COLUMNS,
                        datatype=["str", "number", *["str"] * len(OPTION_COLUMNS)],
                        column_count=len(ADAPTER_COLUMNS),
                        label="Weight per adapter; NeTI truncation and encode_steps (timesteps the text encoder runs "
                        "at exactly, ends included; 0 = every one), preference strength, a LoRA's latent region "
                        "(1, 2, ...) where they apply",
                        interactive=True,
                    )
                    refresh = gr.Button("Refresh adapter list", size="sm")
            with gr.Column(scale=1):
                # Two columns even for one image: a one-column grid makes a square as wide as the box and taller than
                # it, cut off at the bottom. Two images show whole; more scroll inside the box.
                gallery = gr.Gallery(
                    label="Images",
                    columns=2,
                    fit_columns=False,
                    height=420,
                    object_fit="contain",
                    elem_id="generate-gallery",
                )
                note = gr.Textbox(label="Details", interactive=False, lines=2)

        # -- wiring
        def refresh_choices() -> Any:
            return gr.Dropdown(choices=adapter_choices(context))

        page.load(refresh_choices, outputs=chosen)
        refresh.click(refresh_choices, outputs=chosen)
        chosen.change(adapter_rows, inputs=[chosen, adapters], outputs=adapters)
        run.click(
            user_errors(lambda *values: generate(context, *values)),
            inputs=[prompt, negative, seed, num_images, steps, guidance, width, height, scheduler, adapters, regions],
            outputs=[gallery, note],
            api_name="generate",
            concurrency_id=DEVICE,
            concurrency_limit=1,
        )
    return page


if __name__ == "__main__":
    build_page(PageContext.create(StudioHome(Path("studio-home").resolve()))).launch()
