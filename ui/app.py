"""The studio web app: the Generate, Train, Library and Taste pages in one Gradio app, and ``studio ui``.

``studio ui`` listens on 127.0.0.1 unless told otherwise, refuses to listen beyond this machine without a login, and
starts the job queue's worker in the background unless one already serves the studio home.

>>> app = build_app(StudioHome(Path("studio-home")).ensure(), base_model="tiny")  # doctest: +SKIP
>>> app.launch()  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import InvalidInputError
from studio.home import StudioHome
from ui import generate, library, taste, train
from ui.common import MAX_UPLOAD, PageContext

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PAGES = (("Generate", generate), ("Train", train), ("Library", library), ("Taste", taste))
# Handlers import these on first use; Gradio runs the pages' load events in parallel threads, and a first import of
# diffusers' lazy module from two threads at once fails ("cannot import name 'StableDiffusionPipeline'"), which
# showed as "Error" in a page's components. Importing them before serving makes every later import a lookup.
PRELOAD = ("studio.library", "studio.jobs", "pipelines.service", "pipelines.metadata", "pipelines.kinds")


def build_app(home: StudioHome, *, base_model: str | None = None) -> gr.Blocks:
    """All pages as tabs of one app over ``home``; ``base_model`` (else ``$STUDIO_BASE_MODEL``, else ``tiny``) is
    the model generation uses."""
    context = PageContext.create(home, base_model)
    for module in PRELOAD:
        importlib.import_module(module)
    pages = [(title, module.build_page(context)) for title, module in PAGES]
    with gr.Blocks(title="Personalization Studio") as app:
        gr.Markdown(f"## Personalization Studio\nbase model: `{context.base_model}` · home: `{home.root}`")
        with gr.Tabs():
            for title, page in pages:
                # Stable ids let browser tests (and user CSS) address one page.
                with gr.Tab(title, elem_id=f"page-{title.lower()}"):
                    page.render()
    return app


def launch_options(home: StudioHome, host: str, port: int, auth: str | None) -> dict[str, Any]:
    """The keyword arguments of `gr.Blocks.launch` for ``studio ui``, after checking host and login.

    Raises `InvalidInputError` when the app would be reachable from other machines without a login.
    """
    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise InvalidInputError(f"expected --auth USER:PASSWORD, found '{auth}'")
        credentials = (user, password)
    if host not in LOCAL_HOSTS and credentials is None:
        raise InvalidInputError(
            f"expected --auth USER:PASSWORD with --host {host} (the studio would be open to the network), found none"
        )
    return {
        "server_name": host,
        "server_port": port,
        "auth": credentials,
        "max_file_size": MAX_UPLOAD,
        # Only generated images and exports are served as files; uploads and the library stay private.
        "allowed_paths": [str(home.outputs)],
        # gr.Error messages always show in the page; other exceptions only as Gradio's generic "Error".
        "show_error": False,
        "share": False,
        "ssr_mode": False,  # no Node server: one process, nothing else listening
    }


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process, as ``MALLOC_ARENA_MAX`` would; ``False`` where there is no glibc.

    Gradio runs handlers on a thread pool and glibc gives busy threads their own arenas, whose freed blocks are
    rarely returned: a long-running server's memory then creeps up with the request count (seen in
    bench/load_ui.py: about 0.1 MiB per request uncapped, flat with two arenas). The pipeline itself does not grow.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_arena_max = -8  # glibc's mallopt parameter number for M_ARENA_MAX
    return bool(libc.mallopt(m_arena_max, count))


def launch_from_cli(args: argparse.Namespace, home: StudioHome) -> int:
    """``studio ui [--host 127.0.0.1] [--port 7860] [--auth USER:PASSWORD]``: serve the app until Ctrl-C."""
    from studio.jobs import start_worker_process

    options = launch_options(home, args.host, args.port, args.auth)
    home.ensure()
    limit_malloc_arenas()
    worker = start_worker_process(home)
    if worker is None:
        logger.warning("a job worker already serves %s; using it", home.root)
    try:
        app = build_app(home, base_model=getattr(args, "base", None))
        app.queue(default_concurrency_limit=4)
        app.launch(**options)
    finally:
        if worker is not None and worker.poll() is None:
            # SIGTERM lets the worker mark its job interrupted; the next worker resumes it.
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()  # the next worker recovers its job as interrupted
    return 0


if __name__ == "__main__":
    build_app(StudioHome(Path("studio-home").resolve()).ensure()).launch()
