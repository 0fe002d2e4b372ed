"""Library: the adapters in the studio home; details, download for other tools, import of foreign files, delete.

Downloads are written under ``home/outputs/exports`` (the only folder the app serves files from).

>>> build_page(PageContext.create(StudioHome(Path("studio-home")))).launch()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import InvalidInputError
from studio.home import StudioHome
from ui.common import PageContext, upload_path, user_errors

COLUMNS = ["name", "kind", "family", "base_model", "trigger words", "size (KB)", "created"]
EXPORT_FORMATS = ["kohya", "diffusers", "a1111"]
IMPORT_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")


# -- handlers ---------------------------------------------------------------------------------------------------------


def _library(context: PageContext) -> Any:
    from studio.library import AdapterLibrary

    return AdapterLibrary(context.home)


def adapter_rows(context: PageContext) -> list[list[Any]]:
    """One row per adapter in the library."""
    return [
        [
            info.name,
            info.kind,
            info.family,
            info.base_model,
            ", ".join(info.placeholder_tokens),
            round(info.size_bytes / 1024, 1),
            info.created,
        ]
        for info in _library(context).list()
    ]


def adapter_details(context: PageContext, name: str | None) -> dict[str, Any]:
    """Everything the file says about one adapter: kind, base model, trigger words, training config, metadata."""
    if not name:
        return {}
    info = _library(context).show(name).to_dict()
    metadata = info.pop("metadata", {})
    for key in ("studio.config",):
        if key in metadata:
            try:
                info["config"] = json.loads(metadata.pop(key))
            except ValueError:
                pass  # foreign files may hold free text here; it stays in the metadata below
    info["metadata"] = metadata
    return info


def export_adapter(context: PageContext, name: str | None, fmt: str) -> list[str]:
    """Write the adapter in ``fmt`` under ``home/outputs/exports`` and return the files for download."""
    if not name:
        raise InvalidInputError("expected an adapter to download, found none selected")
    if fmt not in EXPORT_FORMATS:
        raise InvalidInputError(f"expected a format ({', '.join(EXPORT_FORMATS)}), found '{fmt}'")
    folder = context.home.outputs / "exports" / f"{name}-{fmt}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    return [str(path) for path in _library(context).export(name, fmt, folder)]


def import_adapter(context: PageContext, upload: Any, name: str) -> tuple[str, list[list[Any]], Any]:
    """Validate an uploaded adapter file (ours, kohya, diffusers, A1111) against the base model and add it."""
    if upload is None:
        raise InvalidInputError("expected an adapter file to import, found no upload")
    path = upload_path(upload)
    if path.suffix.lower() not in IMPORT_SUFFIXES:
        raise InvalidInputError(f"expected an adapter file ({', '.join(IMPORT_SUFFIXES)}), found '{path.name}'")
    # Checked against the base model generation uses: a file that would not load there is refused now.
    base = context.service().base_model
    info = _library(context).import_file(path, name=(name or "").strip() or None, base=base)
    return f"imported '{info.name}' ({info.kind})", adapter_rows(context), gr.Dropdown(choices=_names(context))


def delete_adapter(context: PageContext, name: str | None, confirm: bool) -> tuple[str, list[list[Any]], Any]:
    """Remove an adapter from the library (only with the confirmation box ticked)."""
    if not name:
        raise InvalidInputError("expected an adapter to delete, found none selected")
    if not confirm:
        raise InvalidInputError(f"expected the box 'yes, delete' to be ticked before deleting '{name}'")
    _library(context).remove(name)
    return f"deleted '{name}'", adapter_rows(context), gr.Dropdown(choices=_names(context), value=None)


def _names(context: PageContext) -> list[str]:
    return [info.name for info in _library(context).list()]


# -- layout and wiring ------------------------------------------------------------------------------------------------


def build_page(context: PageContext) -> gr.Blocks:
    """The Library page, runnable alone or rendered into the app."""
    with gr.Blocks(title="Library") as page:
        table = gr.Dataframe(headers=COLUMNS, label="Adapters", interactive=False, wrap=True)
        with gr.Row():
            with gr.Column(scale=2):
                picked = gr.Dropdown([], label="Adapter", allow_custom_value=True)
                details = gr.JSON(label="Details")
            with gr.Column(scale=2):
                fmt = gr.Radio(EXPORT_FORMATS, value="kohya", label="Download format")
                download = gr.Button("Prepare download")
                files = gr.File(label="Download", file_count="multiple", interactive=False)
                with gr.Row():
                    confirm = gr.Checkbox(label="yes, delete", value=False)
                    delete = gr.Button("Delete adapter", variant="stop")
            with gr.Column(scale=2):
                upload = gr.File(label="Import an adapter file", file_types=list(IMPORT_SUFFIXES))
                new_name = gr.Textbox(label="Name (default: from the file name)")
                do_import = gr.Button("Import")
        status = gr.Textbox(label="Status", interactive=False)

        # -- wiring
        def refresh() -> tuple[Any, Any]:
            return adapter_rows(context), gr.Dropdown(choices=_names(context))

        page.load(refresh, outputs=[table, picked])
        picked.change(user_errors(lambda name: adapter_details(context, name)), inputs=picked, outputs=details)
        download.click(
            user_errors(lambda name, f: export_adapter(context, name, f)),
            inputs=[picked, fmt],
            outputs=files,
            api_name="export_adapter",
        )
        do_import.click(
            user_errors(lambda file, name: import_adapter(context, file, name)),
            inputs=[upload, new_name],
            outputs=[status, table, picked],
            api_name="import_adapter",
        )
        delete.click(
            user_errors(lambda name, yes: delete_adapter(context, name, yes)),
            inputs=[picked, confirm],
            outputs=[status, table, picked],
            api_name="delete_adapter",
        )
    return page


if __name__ == "__main__":
    build_page(PageContext.create(StudioHome(Path("studio-home").resolve()))).launch()
