"""The web page in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

Fills the form, generates on the tiny checkpoint (tests/tiny_pipeline.py), sees the progress
bar move and the image appear with its parameters and download link, then cancels a long job.
A screenshot of the page goes to $QWEN_MLX_ARTIFACTS (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from server_helpers import png_metadata

CHROMIUM = os.environ.get("QWEN_MLX_CHROMIUM", "/usr/bin/chromium")
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]
WATCH_BAR = """() => {
  window.barValues = [];
  const bar = document.getElementById("bar");
  new MutationObserver(() => window.barValues.push(Number(bar.value)))
    .observe(bar, { attributes: true });
}"""


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.set_default_timeout(60_000)
        page.goto(server.url)
        yield page
        browser.close()


def fill(page, steps: int, seed: int | None = None) -> None:
    page.fill("#prompt", "a red cube on a table")
    page.fill("#negative", "blurry")
    page.select_option("#aspect", "custom")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", str(steps))
    page.fill("#cfg", "4")
    page.fill("#seed", "" if seed is None else str(seed))


def test_generate_shows_progress_and_the_image(page, server, tmp_path):
    page.wait_for_function("document.getElementById('model').textContent.includes('text-to')")
    assert page.is_hidden("#image-row")  # no upload on a text-to-image checkpoint
    options = page.locator("#aspect option").all_inner_texts()
    assert "16:9 (1664×928)" in options and "1:1 (1328×1328)" in options
    fill(page, steps=40, seed=5)
    page.evaluate(WATCH_BAR)
    page.click("#generate")
    page.wait_for_selector("#gallery figure img")
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth === 64")
    seen = page.evaluate("window.barValues")
    moving = sorted({v for v in seen if 0 < v < 1})
    assert len(moving) >= 2, seen  # the bar moved through the steps before it filled
    assert seen[-1] == 1
    assert page.inner_text("#status").startswith("done: 1 image(s)")
    caption = page.inner_text("#gallery figcaption")
    assert "seed 5 · 64×64 · 40 steps · CFG 4" in caption and "negative: blurry" in caption
    href = page.get_attribute("#gallery figcaption a", "href")
    png = httpx.get(server.url + href, timeout=30)
    meta = png_metadata(png.content)
    assert (meta["seed"], meta["steps"], meta["negative_prompt"]) == (5, 40, "blurry")
    out = Path(os.environ.get("QWEN_MLX_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "server-page.png"), full_page=True)


def test_cancel_a_long_job(page, server):
    fill(page, steps=1000)
    page.click("#generate")
    page.wait_for_function(
        "/step [1-9][0-9]*\\/1000 · ETA/.test(document.getElementById('status').textContent)"
    )
    assert 0 < float(page.get_attribute("#bar", "value") or page.evaluate("bar.value")) < 1
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'cancelled'")
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert page.locator("#gallery figure").count() == 1  # nothing added by the cancelled job
    last = server.health()["last_job"]
    assert last["state"] == "cancelled" and re.search(r"at step \d+/1000", last["error"])
