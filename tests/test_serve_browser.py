"""The web page end to end in headless Chromium: upload a real file, read the result."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from conftest import encode, synthetic_xray
from serve_util import running_server

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


def test_page_shows_label_probability_heatmap_and_limits(
    browser, tiny_model: Path, tmp_path: Path
) -> None:
    image = tmp_path / "chest_xray.jpeg"
    image.write_bytes(encode(synthetic_xray(1, 17, 320)))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with running_server(tiny_model, tmp_path) as server:
        expected = httpx.post(
            server.url + "/predict", files={"file": ("chest_xray.jpeg", image.read_bytes())}
        ).json()
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(server.url + "/")
        assert "Not a diagnostic device" in page.inner_text("#disclaimer")
        page.wait_for_function("document.querySelectorAll('#limitations li').length > 0")

        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result:not([hidden])", timeout=20_000)
        assert page.inner_text("#label") == expected["prediction"]
        shown = page.inner_text("#probability")
        assert f"P(PNEUMONIA) {100 * expected['probability']:.1f}" in shown
        assert f"threshold {100 * expected['threshold']:.1f}" in shown
        loaded = page.eval_on_selector("#heatmap", "img => img.complete && img.naturalWidth")
        assert loaded == 320
        if os.environ.get("SERVE_SCREENSHOT"):
            page.screenshot(path=os.environ["SERVE_SCREENSHOT"], full_page=True)

        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#error:not([hidden])", timeout=20_000)
        assert "not a recognised image" in page.inner_text("#error")
        assert page.is_hidden("#result")
        page.close()


def test_an_unlike_training_answer_reads_as_unvalidated(
    browser, tiny_model: Path, tmp_path: Path
) -> None:
    """Regression (issue 19): the page showed "100.0% probability of PNEUMONIA" right under an
    "unlike the training films" warning."""
    image = tmp_path / "odd.jpeg"
    image.write_bytes(encode(synthetic_xray(1, 3, 128)))
    with running_server(tiny_model, tmp_path) as server:
        answer = httpx.post(
            server.url + "/predict", files={"file": ("odd.jpeg", image.read_bytes())}
        ).json()
        # The tiny model has no fitted feature check, so the service's own answer is given the
        # outcome a film unlike the training films gets; the page must read it as unvalidated.
        answer["input_check"] = {
            "outcome": "unlike_training",
            "score": 2.5,
            "refusal_score": 0.4,
            "message": "a radiograph unlike the films the model was trained on",
        }
        answer["probability"] = answer["probabilities"]["PNEUMONIA"] = 0.999
        answer["probabilities"]["NORMAL"] = 0.001
        answer["prediction"] = "PNEUMONIA"
        page = browser.new_page()
        page.route(
            "**/predict?heatmap=true",
            lambda route: route.fulfill(status=200, json=answer),
        )
        page.goto(server.url + "/")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result:not([hidden])", timeout=20_000)
        assert page.inner_text("#label") == "Unvalidated: PNEUMONIA"
        shown = page.inner_text("#probability")
        assert shown.startswith("Not a validated result") and "P(PNEUMONIA) 99.9%" in shown
        assert "probability of PNEUMONIA" not in shown
        assert "unlike the films" in page.inner_text("#input-warning")
        page.close()
