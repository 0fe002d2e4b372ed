"""The web app in a real browser: headless Debian Chromium driven by Playwright, at a 1280x800 window.

A user uploads the reference images of a shipped concept, trains a textual inversion on `tiny` from the Train page,
watches the job finish, then generates with the new adapter and sees the image in the gallery. Each page must fit
the window's width with its main buttons reachable, and bad input must show a message, never a traceback.

Run with `.ci/browser` (installs Chromium from apt and the `browser` extra) or `pytest -m browser`. Screenshots go to
``$STUDIO_TEST_ARTIFACTS`` (default ``artifacts/browser/``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from studio.home import StudioHome

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
PAGES = ("Generate", "Train", "Library", "Taste")
# The buttons a user comes to each page for.
MAIN_BUTTONS = {
    "Generate": ["Generate", "Refresh adapter list"],
    "Train": ["Queue training", "Cancel job", "Resume job"],
    "Library": ["Prepare download", "Delete adapter", "Import"],
    "Taste": ["Show two", "Left is better", "Right is better", "Train my taste"],
}
CONCEPT = "robot-toy"
TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("STUDIO_TEST_ARTIFACTS") or REPO / "artifacts" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifacts):
    """``studio ui`` on tiny, in a fresh home, as its own process (with the worker it starts)."""
    from ui.process import UIProcess, free_port

    root = tmp_path_factory.mktemp("browser")
    home = StudioHome(root / "home").ensure()
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    ui = UIProcess.start(home, port=free_port(), log_path=root / "ui.log", env=env)
    try:
        yield ui
    finally:
        ui.stop()
        for log in (ui.log_path, home.root / "worker.log"):
            if log.is_file():
                shutil.copyfile(log, artifacts / log.name)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"expected Debian's Chromium at {CHROMIUM}; run .ci/browser (apt-get install -y chromium)")
    # Fail, not skip: whoever runs -m browser asked for this check, and a skip would pass unseen.
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("expected Playwright; install the browser extra (pip install -e '.[browser]') or run .ci/browser")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server, artifacts, request):
    failed_before = request.session.testsfailed
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    # The tiny model on a shared 2-core CPU answers slowly; waits below name their own longer limits.
    tab.set_default_timeout(60_000)
    tab.goto(server.url)
    tab.get_by_role("tab", name="Generate").wait_for()
    try:
        yield tab
        if request.session.testsfailed > failed_before:  # what the page showed when the test failed
            tab.screenshot(path=artifacts / f"failed-{request.node.name}.png", full_page=True)
    finally:
        context.close()


def _open(page, title: str):
    """Click a page's tab and return its panel."""
    page.get_by_role("tab", name=title, exact=True).click()
    panel = page.locator(f"#page-{title.lower()}")
    panel.wait_for(state="visible")
    return panel


def _settle(page) -> None:
    """Wait until no component shows Gradio's "processing" or queue overlay (page loads, refreshes)."""
    page.wait_for_function(
        "![...document.querySelectorAll('[data-testid=status-tracker]')]"
        ".some(e => !e.classList.contains('hide') && /processing|queue/.test(e.textContent))",
        timeout=60_000,
    )
    page.wait_for_timeout(300)


def _no_failed_component(page) -> None:
    """No component shows Gradio's red "Error" badge: a handler that raised something other than a user error."""
    failed = page.locator("[data-testid=status-tracker] .error")
    assert failed.count() == 0, f"{failed.count()} component(s) show 'Error'; see the server log"


def _textbox(panel, label: str):
    return panel.get_by_label(label, exact=True)


def _close_toasts(page) -> None:
    for button in page.locator("[data-testid=toast-close]").all():
        button.click()
    page.locator("[data-testid=toast-body]").first.wait_for(state="detached", timeout=10_000)


def _expect_message(page, click, text: str) -> None:
    """Do ``click``; the page must show an error message containing ``text`` and no traceback."""
    click()
    page.locator("[data-testid=toast-text]", has_text=text).wait_for(timeout=60_000)
    assert "Traceback" not in page.inner_text("body")
    _close_toasts(page)


def test_train_a_shipped_concept_watch_it_finish_and_generate_with_it(page, server, artifacts, tmp_path):
    from pipelines import read_png_metadata
    from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder

    concept = SHIPPED_CONCEPTS[CONCEPT]
    photos = write_reference_folder(concept, tmp_path / "photos")

    # 1. Train page: upload the concept's photos, name the adapter and its token, queue a short run.
    train = _open(page, "Train")
    train.locator("#train-images input[type=file]").set_input_files([str(p) for p in photos])
    for photo in photos:  # the list scrolls inside the drop zone: wait for each row, seen or not
        train.locator(f'#train-images td.filename[aria-label="{photo.name}"]').wait_for(state="attached")
    train.get_by_label("textual-inversion").check()
    _textbox(train, "Adapter name").fill("robot")
    _textbox(train, "Trigger word / placeholder token").fill("<robot>")
    _textbox(train, "Init word / class noun / super-category").fill(concept.class_noun)
    _textbox(train, "Steps (0: method default)").fill(str(TRAIN_STEPS))
    train.get_by_role("button", name="Queue training").click()
    status = _textbox(train, "Status")
    page.wait_for_function("el => el.value.startsWith('queued job')", arg=status.element_handle(), timeout=60_000)

    # 2. The page follows the job (timer) until the worker reports it done.
    progress = _textbox(train, "Progress")
    page.wait_for_function(
        "el => /succeeded|failed|cancelled/.test(el.value)", arg=progress.element_handle(), timeout=300_000
    )
    text = progress.input_value()
    assert "succeeded" in text and f"{TRAIN_STEPS}/{TRAIN_STEPS}" in text, text
    assert "adapter 'robot' is in the library" in text
    train.locator("#train-images").scroll_into_view_if_needed()
    page.screenshot(path=artifacts / "train-done.png", full_page=True)

    # 3. Generate page: pick the new adapter, write a prompt with its token, generate.
    generate = _open(page, "Generate")
    generate.get_by_role("button", name="Refresh adapter list").click()
    _settle(page)
    picker = generate.get_by_label("Adapters from the library")
    picker.click()
    page.get_by_role("option", name="robot", exact=True).click()
    page.keyboard.press("Escape")
    # The weight table gets a row for it, weight 1.
    generate.get_by_role("gridcell", name="robot", exact=True).wait_for()
    _textbox(generate, "Prompt").fill("a photo of <robot> on a blue background")
    generate.get_by_role("button", name="Generate", exact=True).click()

    # 4. The image appears in the gallery and was made with the adapter.
    generate.locator("#generate-gallery img").first.wait_for(timeout=180_000)
    details = _textbox(generate, "Details")
    page.wait_for_function("el => el.value.includes('image(s)')", arg=details.element_handle())
    assert "Traceback" not in page.inner_text("body")
    _no_failed_component(page)
    page.screenshot(path=artifacts / "gallery.png", full_page=True)
    [saved] = sorted(server.home.outputs.rglob("*.png"))
    metadata = read_png_metadata(saved)
    assert "<robot>" in metadata["prompt"]
    assert "robot" in str(metadata.get("adapters")), metadata


@pytest.mark.parametrize("title", PAGES)
def test_each_page_fits_a_1280x800_window_with_its_main_buttons_reachable(page, artifacts, title):
    _open(page, title)
    _settle(page)
    page.screenshot(path=artifacts / f"{title.lower()}.png", full_page=True)
    _no_failed_component(page)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= VIEWPORT["width"], f"the {title} page scrolls sideways: {width}px wide"
    for name in MAIN_BUTTONS[title]:
        button = page.locator(f"#page-{title.lower()}").get_by_role("button", name=name, exact=True)
        button.scroll_into_view_if_needed()
        box = button.bounding_box()
        assert box is not None and button.is_visible(), f"'{name}' is not visible on the {title} page"
        assert box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"], f"'{name}' is off screen: {box}"
        assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], f"'{name}' is off screen: {box}"


def test_every_column_of_the_generate_pages_adapter_table_shows_without_scrolling_it(page):
    from ui.generate import ADAPTER_COLUMNS

    generate = _open(page, "Generate")
    _settle(page)
    table = generate.locator("table").filter(has_text="encode_steps").first
    # Each header's right edge against the box that clips it (the nearest ancestor that scrolls or hides overflow).
    edges = """el => {
        let box = el.parentElement;
        while (box && !['auto', 'scroll', 'hidden'].includes(getComputedStyle(box).overflowX)) box = box.parentElement;
        const frame = (box || document.documentElement).getBoundingClientRect();
        return [el.getBoundingClientRect().right, Math.min(frame.right, window.innerWidth)];
    }"""
    for column in ADAPTER_COLUMNS:
        header = table.get_by_role("columnheader").filter(has_text=column).first
        right, visible = header.evaluate(edges)
        assert right <= visible + 1, f"the adapter table's '{column}' column is cut off ({right:.0f} > {visible:.0f})"


def test_bad_input_shows_a_message_in_the_page_never_a_traceback(page):
    # Generate with an empty prompt, then with a size the model cannot make.
    generate = _open(page, "Generate")
    _settle(page)
    run = generate.get_by_role("button", name="Generate", exact=True)
    _expect_message(page, run.click, "expected a prompt, found an empty one")
    _textbox(generate, "Prompt").fill("a red circle")
    _textbox(generate, "Width (0: model default)").fill("12")
    _expect_message(page, run.click, "multiple of 8")

    # Train with no photos; download with no adapter picked.
    train = _open(page, "Train")
    _textbox(train, "Adapter name").fill("nothing")
    _expect_message(page, train.get_by_role("button", name="Queue training").click, "expected training images")
    library = _open(page, "Library")
    _expect_message(page, library.get_by_role("button", name="Prepare download").click, "expected an adapter")
    assert "Traceback" not in page.inner_text("body")
