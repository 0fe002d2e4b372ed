"""The web app, driven as a user drives it: through `gradio_client` against the app served on 127.0.0.1.

The app generates with a tiny random SD1.x pipeline saved to a folder (not the embedded model), and the queue runs a
fake textual-inversion "method" that writes a real embedding adapter in a few steps, so no test trains anything.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.cli import main
from studio.errors import InvalidInputError
from studio.home import StudioHome
from studio.jobs import JobContext, JobMethod, JobStore, register_method, run_worker
from trainers.core.progress import ProgressReporter

ADAPTER_HEADERS = ["adapter", "weight", "truncation", "encode_steps", "strength", "region"]


def _fake_textual_inversion(context: JobContext) -> dict:
    """Reports a few steps, then adds a random embedding for the token: what a real run leaves in the library."""
    from studio.adapter_files import AdapterFile, AdapterMetadata
    from studio.library import AdapterLibrary

    config = context.job.config["config"]
    reporter = ProgressReporter(config["steps"], [context.progress])
    for step in range(1, config["steps"] + 1):
        reporter.step(step, loss=1.0 / step)
    width = json.loads((Path(context.job.config["base"]) / "text_encoder" / "config.json").read_text())["hidden_size"]
    tensors = {"emb_params": torch.randn(1, width, generator=torch.Generator().manual_seed(0))}
    metadata = AdapterMetadata(kind="textual_inversion", family="sd1", placeholder_tokens=[config["placeholder_token"]])
    info = AdapterLibrary(context.home).add(AdapterFile(tensors, metadata), context.job.name)
    return {"adapter": info.name}


register_method(JobMethod(name="fake-ti", run=_fake_textual_inversion))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The whole app on a free local port, a job worker beside it, and a client."""
    from gradio_client import Client

    from studio.testing import build_tiny_sd1_pipeline
    from ui.app import build_app, launch_options

    root = tmp_path_factory.mktemp("ui")
    home = StudioHome(root / "home").ensure()
    base = root / "base"
    build_tiny_sd1_pipeline(seed=0).save_pretrained(base)
    app = build_app(home, base_model=str(base))
    app.queue()
    port = _free_port()
    # Gradio checks that the page answers within 3 s before it returns; on a loaded test machine it may not, and the
    # client below proves the app is reachable anyway.
    patch = pytest.MonkeyPatch()
    patch.setattr("gradio.networking.url_ok", lambda url: True)
    app.launch(prevent_thread_lock=True, quiet=True, **launch_options(home, "127.0.0.1", port, None))
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(home,), kwargs={"poll_s": 0.1, "stop": stop}, daemon=True)
    worker.start()
    try:
        yield SimpleNamespace(home=home, root=root, client=Client(f"http://127.0.0.1:{port}/", verbose=False))
    finally:
        stop.set()
        worker.join(30)
        app.close()
        patch.undo()


def _generate(
    client, prompt: str, *, adapters: list[list] | None = None, width: int = 0, seed: int = 3, regions: str = "none"
):
    table = {"headers": ADAPTER_HEADERS, "data": adapters or [], "metadata": None}
    return client.predict(prompt, "", seed, 1, 2, 5.0, width, 0, "default", table, regions, api_name="/generate")


def test_generate_shows_the_image_and_saves_it_with_its_parameters(served):
    from pipelines import read_png_metadata

    gallery, note = _generate(served.client, "a red circle")
    assert len(gallery) == 1
    [saved] = sorted(served.home.outputs.rglob("*-3.png"))
    metadata = read_png_metadata(saved)
    assert metadata["prompt"] == "a red circle" and metadata["seed"] == 3
    assert str(saved.parent) in note
    # Latent regions from the Regions menu: the saved parameters say how the image was made.
    _generate(served.client, "a red circle BREAK a blue square", width=64, seed=4, regions="columns (latent)")
    [regional] = sorted(served.home.outputs.rglob("*-4.png"))
    metadata = read_png_metadata(regional)
    assert (metadata["regions"], metadata["region_mode"], metadata["width"]) == ("columns", "latent", 64)


def test_the_adapter_table_gives_the_options_of_the_cli_form():
    from pipelines import AdapterRef
    from ui.generate import ADAPTER_COLUMNS, adapter_rows, parse_adapters

    assert ADAPTER_COLUMNS == ADAPTER_HEADERS
    rows = [["neti-cat", 0.8, "64", "3", "", ""], ["style", 1.0, "", "", "0.5", "2"], ["plain", None, "", "", "", ""]]
    table = {"headers": ADAPTER_HEADERS, "data": rows, "metadata": None}
    assert parse_adapters(table) == [
        AdapterRef.parse("neti-cat:0.8,truncation=64,encode_steps=3"),
        AdapterRef.parse("style:1,strength=0.5,region=2"),
        AdapterRef.parse("plain"),
    ]
    # A new row has every option blank; a row already there keeps what was typed.
    assert adapter_rows(["neti-cat", "new"], table) == [rows[0], ["new", 1.0, "", "", "", ""]]
    with pytest.raises(InvalidInputError, match="expected a number for the encode_steps of adapter 'x', found 'two'"):
        parse_adapters({"data": [["x", 1.0, "", "two", "", ""]]})


def test_user_errors_show_as_one_line_messages(served):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="expected a prompt"):
        _generate(served.client, "  ")
    with pytest.raises(AppError, match="width should be a multiple of 8, got 12"):
        _generate(served.client, "a circle", width=12)
    with pytest.raises(AppError, match="expected an adapter named 'nobody'|nobody"):
        _generate(served.client, "a circle", adapters=[["nobody", 1.0, "", "", "", ""]])


def test_an_unreadable_training_image_is_refused_before_anything_is_queued(served):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = served.root / "not-an-image.png"
    fake.write_bytes(b"this is text")
    with pytest.raises(AppError, match="Pillow cannot read"):
        served.client.predict(
            [handle_file(str(fake))], "fake-ti", "bad", "<bad>", "toy", 3, 0, 1, 4, 0, "", api_name="/queue_training"
        )
    assert "bad" not in [job.name for job in JobStore(served.home).list()]


def test_queue_a_job_watch_it_finish_generate_with_it_and_download_it(served):
    from gradio_client import handle_file

    # 1. Upload two photos and queue the run.
    photos = []
    for index, color in enumerate(("red", "blue")):
        photos.append(served.root / f"photo{index}.png")
        Image.new("RGB", (64, 64), color).save(photos[-1])
    status, _, _ = served.client.predict(
        [handle_file(str(p)) for p in photos], "fake-ti", "toy", "<toy>", "toy", 3, 0, 1, 4, 0, "",
        api_name="/queue_training",
    )  # fmt: skip
    assert status.startswith("queued job")
    job_id = status.split()[2].rstrip(":")

    # 2. Poll until the worker finished it.
    deadline = time.monotonic() + 120
    job = served.client.predict(job_id, api_name="/job")
    while job["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = served.client.predict(job_id, api_name="/job")
    assert job["state"] == "succeeded", job["error"]
    assert (job["step"], job["total_steps"]) == (3, 3)
    uploaded = Path(job["config"]["images"])
    assert sorted(p.name for p in uploaded.iterdir()) == ["photo0.png", "photo1.png"]

    # 3. Generate with the new adapter: the embedding changes the image of its token.
    with_token, _ = _generate(served.client, "a photo of <toy>", adapters=[["toy", 1.0, "", "", "", ""]], seed=5)
    without, _ = _generate(served.client, "a photo of <toy>", adapters=[["toy", 0.0, "", "", "", ""]], seed=5)
    assert len(with_token) == len(without) == 1
    saved = sorted(served.home.outputs.rglob("*-5*.png"))
    assert len(saved) == 2
    assert Image.open(saved[0]).tobytes() != Image.open(saved[1]).tobytes()

    # 4. Download it for A1111: a file the client gets back, with the embedding in it.
    files = served.client.predict("toy", "a1111", api_name="/export_adapter")
    [downloaded] = files if isinstance(files, list) else [files]
    tensors = load_file(downloaded)
    assert list(tensors) == ["emb_params"]
    assert all(served.home.outputs in Path(p).parents for p in (served.home.outputs / "exports").rglob("*"))


def test_launch_refuses_to_open_the_studio_to_the_network_without_a_login(capsys, home):
    from ui.app import launch_options

    with pytest.raises(InvalidInputError, match="expected --auth USER:PASSWORD with --host 0.0.0.0"):
        launch_options(home, "0.0.0.0", 7860, None)
    with pytest.raises(InvalidInputError, match="expected --auth USER:PASSWORD, found 'admin'"):
        launch_options(home, "0.0.0.0", 7860, "admin")
    options = launch_options(home, "0.0.0.0", 7860, "admin:secret")
    assert options["auth"] == ("admin", "secret")
    assert options["allowed_paths"] == [str(home.outputs)]
    assert options["max_file_size"] and options["share"] is False

    code = main(["--home", str(home.root), "ui", "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: expected --auth") and err.count("\n") == 1


def test_training_a_taste_from_the_ui_takes_the_base_models_recipe_unless_steps_are_typed(home):
    from studio.preferences import PreferenceStore
    from ui.common import PageContext
    from ui.taste import train_taste

    context = PageContext.create(home)
    store = PreferenceStore(home)
    for user in ("alice", "bob", "carol"):
        for index in range(4):
            red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
            store.add(user, f"a circle {index}", preferred=red, other=blue)
    train_taste(context, "alice", None)
    train_taste(context, "bob", 50)
    train_taste(context, "carol", 0)  # what the page shows and sends when the field is left alone
    recipe, typed, shown = sorted(JobStore(home).list(), key=lambda job: job.id)
    # Left empty or 0, no step count is queued: the trainer resolves it (on tiny: the shipped start alone).
    for job in (recipe, shown):
        assert job.config["config"]["steps"] is None and job.config["config"]["init_from"] == "auto"
    assert typed.config["config"]["steps"] == 50
