"""A real browser uses the served apps: Playwright drives the system's Chromium (never a downloaded one).
The text app: pick a random prompt, type a prompt, click Generate and wait until the gallery shows the images;
a converted official model: search its class list and generate, with no guidance control."""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import CAPTIONS, pixels

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

# headless, and quiet: no GPU, no background traffic to update or sync servers
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_S = 180  # the longest wait for the final images (2 shared cores); passing runs take a few seconds


def gallery(page) -> tuple[list[str], list[np.ndarray]]:
    """The captions and the pixels of the images the Samples gallery shows now."""
    captions = page.locator("#samples .caption-label").all_inner_texts()
    images = [np.asarray(Image.open(BytesIO(httpx.get(src, timeout=30).content)).convert("RGB"))
              for src in [img.get_attribute("src") for img in page.locator("#samples img").all()]]
    return captions, images


@contextmanager
def open_page(url: str):
    """Chromium (headless, quiet) on url -> its page; the browser is closed after."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def wait_for_final(page, expected: list[np.ndarray], caption: str | None = None) -> tuple[bool, list, list]:
    """Previews come first: wait until the gallery has settled on the expected final images (and captions)
    -> (done, captions, images)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        captions, images = gallery(page)  # captions read first: they may be of the outgoing output
        done = len(images) == len(expected) and all(np.array_equal(a, b) for a, b in zip(images, expected)) \
            and (caption is None or captions == [caption] * len(expected))
        if done or time.monotonic() > deadline:
            return done, captions, images
        page.wait_for_timeout(250)


def test_type_a_prompt_click_generate_and_see_the_images(served_text):
    client, _ = served_text
    prompt = "blue square"
    # the final images of the same request, sent with the UI's defaults (4 images, seed 0) over the API
    expected = [pixels(x) for x in client.predict(prompt=prompt, api_name="/generate")]
    with open_page(client.src) as page:
        box = page.get_by_role("textbox", name="Prompt").first  # the Generate tab's
        page.get_by_role("button", name="🎲 Random prompt").first.click()
        sync_api.expect(box).not_to_have_value("")
        assert box.input_value() in CAPTIONS  # a training caption from prompts.json
        box.fill(prompt)
        page.get_by_role("button", name="Generate", exact=True).click()
        done, captions, images = wait_for_final(page, expected, prompt)
        errors = page.locator(".toast-body.error").all_inner_texts()
    assert not errors, errors
    assert done, f"the gallery shows {len(images)} images captioned {captions}, not the {len(expected)} final ones"
    assert captions == [prompt] * len(expected)


@pytest.fixture(scope="module")
def served_converted(tmp_path_factory):
    """The app around the converted official class fixture (see test_official.py), over HTTP."""
    from conftest import serve_app
    from official.convert import main as convert

    root = tmp_path_factory.mktemp("converted_app")
    fixtures = Path(__file__).parent / "fixtures" / "official"
    convert(["--rqvae", str(fixtures / "stage1"), "--rqtransformer", str(fixtures / "class"),
             "--output_dir", str(root / "weights")])
    with serve_app(root / "weights", root) as client:
        yield client


def test_a_converted_official_model_in_the_browser(served_converted, tmp_path):
    """Search the class list, generate with the official sampling settings; no guidance control is offered."""
    client, shot = served_converted, tmp_path / "converted.png"
    expected = [pixels(x) for x in client.predict(class_name="7", api_name="/generate")]
    with open_page(client.src) as page:
        classes = page.get_by_label("Class").first
        classes.click()
        classes.fill("7")  # the dropdown filters as one types: 1,000 ImageNet names need it
        page.get_by_role("option", name="7", exact=True).click()
        page.get_by_role("button", name="Sampling").first.click()
        sync_api.expect(page.get_by_text("Top-k (0 = the model's)").first).to_be_visible()
        page.screenshot(path=str(shot))
        assert page.get_by_text("Guidance scale").count() == 0  # the null class was never trained
        page.get_by_role("button", name="Generate", exact=True).click()
        done, _, images = wait_for_final(page, expected)
        errors = page.locator(".toast-body.error").all_inner_texts()
    assert not errors, errors
    assert done, f"the gallery shows {len(images)} images, not the {len(expected)} final ones"
