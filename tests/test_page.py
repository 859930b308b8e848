"""The page in a real browser: Debian's Chromium driven by Playwright, against a live server.

Fails (never skips) when the browser cannot start. ``CHARLSTM_PAGE_CHECKPOINT`` serves another
checkpoint (the README's screenshots use a trained one) and ``CHARLSTM_SCREENSHOTS`` keeps the
screenshots in that folder instead of the test's temporary one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from charlstm import checkpoint
from serve_support import LiveServer, make_model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SPANS = "#samples-out .text span.c"


@pytest.fixture(scope="module")
def page_checkpoint(tmp_path_factory, small_text) -> Path:
    given = os.environ.get("CHARLSTM_PAGE_CHECKPOINT")
    if given:
        return Path(given)
    path = tmp_path_factory.mktemp("page") / "alice.safetensors"
    checkpoint.save(path, make_model(small_text.read_text(encoding="utf-8"), units=64, train_steps=100))
    return path


@pytest.mark.slow
def test_page_generates_tints_stops_and_scores(page_checkpoint, tmp_path, small_text):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("CHARLSTM_SCREENSHOTS") or tmp_path)
    # the model's own one-step module path (same probabilities, a few thousand characters/s): the
    # native kernel writes this tiny model at ~100,000 characters/s per stream on a quiet machine,
    # which ends the long generation before Stop is pressed and floods the page with text
    server = LiveServer(page_checkpoint, "--max-length", "100000", "--backend", "module")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 820}, device_scale_factor=1)
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0")

            # a long generation, stopped by the user: the server's active count returns to 0
            page.fill("#prompt", "alice was beginning to get very tired of sitting by her sister on the bank")
            _set_range(page, "#length", 100000)
            page.fill("#samples", "2")
            page.click("#generate")
            page.wait_for_function(f"document.querySelectorAll('{SPANS}').length > 60")
            page.wait_for_function("document.querySelector('#active-count').textContent === '2'")
            page.click("#stop")
            page.wait_for_function("document.querySelector('#active-count').textContent === '0'", timeout=10000)
            assert server.active() == 0
            stopped = page.locator(SPANS).count()
            page.wait_for_timeout(600)
            assert page.locator(SPANS).count() == stopped
            assert "stopped" in page.locator(".sample .info").first.inner_text()

            # a short one to its end: every character tinted, hovering shows five alternatives
            _set_range(page, "#length", 420)
            page.fill("#seed", "7")
            page.fill("#samples", "2")
            page.click("#generate")
            page.wait_for_function("[...document.querySelectorAll('.sample .info')]"
                                   ".every(e => e.textContent.includes('length'))", timeout=30000)
            assert page.locator(SPANS).count() == 2 * 420
            tints = page.eval_on_selector_all(SPANS, "els => els.map(e => [parseFloat(e.dataset.p), "
                                                     "e.style.backgroundColor])")
            assert all(color.startswith("rgba") for _, color in tints) and len({c for _, c in tints}) > 20
            by_p = sorted((p, float(color.rsplit(",", 1)[1].rstrip(")"))) for p, color in tints)
            # the less likely, the stronger the tint (to the 0.01 that the colours are rounded to)
            assert all(a >= b - 0.011 for (_, a), (_, b) in zip(by_p, by_p[1:]))
            assert by_p[0][1] - by_p[-1][1] > 0.3
            target = page.locator(SPANS).nth(100)
            target.hover()
            tip = page.locator("#tip")
            tip.wait_for(state="visible")
            assert tip.locator(".row").count() == 5 and "%" in tip.inner_text()
            page.screenshot(path=str(shots / "serve-generate.png"))

            # the surprise view: a heat map of the user's text and its bits/char
            page.mouse.move(5, 5)
            page.click("#tab-surprise")
            text = small_text.read_text(encoding="utf-8")[2000:2600]
            page.fill("#score-text", text)
            page.click("#score")
            page.wait_for_selector("#bits-per-char")
            assert "bits/char" in page.inner_text("#bits-per-char")
            heat = page.locator("#heatmap span.c")
            assert heat.count() == len(text)
            heat.nth(40).hover()
            tip.wait_for(state="visible")
            assert "bits" in tip.inner_text()
            page.screenshot(path=str(shots / "serve-surprise.png"))
            browser.close()
        for name in ("serve-generate.png", "serve-surprise.png"):
            assert (shots / name).stat().st_size > 10_000
    finally:
        server.stop()


def _set_range(page, selector: str, value: int) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.max = Math.max(el.max, v); el.value = v;"
                                    " el.dispatchEvent(new Event('input')); }", value)
