"""End to end in real headless Chromium: start the server, type a prompt, move the budget slider."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT_DIR = Path(os.environ.get("GATESKIP_SCREENSHOT_DIR", ROOT / "artifacts"))


def require_browser():
    """playwright's sync API; skips, saying what to install, where playwright or Chromium is missing
    (scripts/setup.sh installs both where it can: .ci/run's machine has them)."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("the browser tests need playwright: pip install -e '.[test]' (or bash scripts/setup.sh)")
    if not Path(CHROMIUM).exists():
        pytest.skip("the browser tests need Chromium: apt-get install chromium (or bash scripts/setup.sh)")
    return sync_api


def skipped_count(page) -> int:
    metric = page.locator('[data-testid="stMetric"]', has_text="Skipped branch evaluations")
    return int(re.sub(r"\D", "", metric.locator('[data-testid="stMetricValue"]').inner_text()))


def wait_until_idle(page, timeout_s: float = 120) -> None:
    """Until the app has no run in flight and none starts within a second (a slider moved several
    steps queues several reruns). The state is the one Streamlit's own browser tests read."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        page.locator('[data-test-script-state="notRunning"]').wait_for(timeout=timeout_s * 1000)
        page.wait_for_timeout(1000)
        if page.locator('[data-test-script-state="notRunning"]').count():
            return
    raise AssertionError(f"the app was still running after {timeout_s:.0f} s")


def test_prompt_and_slider_in_real_chromium(server):
    playwright = require_browser()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        page.get_by_text("Skipped branch evaluations").wait_for(timeout=90_000)
        prompt = page.locator("textarea").first
        prompt.fill("The browser test types this prompt, and then it moves the budget slider to the right.")
        prompt.press("Control+Enter")

        def shown_prompt() -> str:  # the token strip's text, without the spaces tokens carry
            return re.sub(r"\s", "", page.locator(".gs-tokens").first.inner_text())

        # The rerun is seen in the token strip (a skip count can stay the same across prompts, and
        # can change before or after it is first read).
        deadline = time.time() + 60
        while time.time() < deadline and "movesthebudgetslidertotheright" not in shown_prompt():
            page.wait_for_timeout(300)
        assert "movesthebudgetslidertotheright" in shown_prompt(), "the dashboard did not rerun on the typed prompt"
        page.wait_for_timeout(1500)
        before = skipped_count(page)
        slider = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"] input').first
        slider.focus()
        for _ in range(6):
            slider.press("ArrowRight")
        deadline = time.time() + 30
        after = before
        while time.time() < deadline and after == before:
            page.wait_for_timeout(500)
            after = skipped_count(page)
        wait_until_idle(page)  # the last slider step's rerun, before the screenshot and the download
        after = skipped_count(page)
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / "dashboard-browser-test.png"), full_page=False)
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name="Trace (CSV)").click()
        csv_path = SCREENSHOT_DIR / "dashboard-browser-trace.csv"
        download.value.save_as(str(csv_path))
        browser.close()
    header = csv_path.read_text().splitlines()[0]
    assert header.startswith("sequence_id,position,token_id,token,layer,branch,gate,threshold,skipped")
    assert after > before, f"skipped count did not change after moving the slider ({before} -> {after})"


def launch(p):
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
    )


def open_app(p, server, width: int = 1400):
    """A new page of the app in headless Chromium, after its first render."""
    browser = launch(p)
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.goto(server.url)
    page.get_by_text("Skipped branch evaluations").wait_for(timeout=90_000)
    return browser, page


def test_clicking_a_heatmap_cell_explains_that_gate_in_real_chromium(server):
    """A click on a cell of the Explore heatmap opens the attribution panel on that very cell: the
    position, layer and branch of its hover label are the ones the panel's caption names."""
    playwright = require_browser()
    with playwright.sync_playwright() as p:
        browser, page = open_app(p, server)
        # The token strip is text, the heatmap the first figure shown (the other tabs' figures are
        # in the page too, hidden, and may be drawn before it).
        heatmap = page.locator(".js-plotly-plot:visible").first
        heatmap.wait_for(state="visible", timeout=60_000)
        heatmap.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        # The cell markers: invisible (opacity 0), one per (layer, token); pick one in the middle.
        cells = heatmap.locator(".scatterlayer path.point[style*='opacity: 0']")
        assert cells.count() > 10, "the heatmap has no clickable cells"
        target = cells.nth(cells.count() // 3)
        box = target.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        hover = heatmap.locator(".hoverlayer .hovertext")
        hover.first.wait_for(timeout=10_000)
        label = hover.first.text_content()  # SVG: no inner_text
        page.mouse.click(x, y)
        caption = page.get_by_text(re.compile(r"token .* \(position \d+\) (ran|skipped) layer \d+'s (attn|mlp)"))
        caption.wait_for(timeout=60_000)
        text = caption.inner_text()
        browser.close()
    position = re.search(r"position (\d+)", label).group(1)
    layer = re.search(r"layer (\d+)", label).group(1)
    branch = re.search(r"branch (attn|mlp)", label).group(1)
    assert f"(position {position})" in text and f"layer {layer}'s {branch}" in text, (label, text)


def test_tokens_and_corpus_contexts_read_as_text_in_real_chromium(server, tmp_path):
    """The Explore token strip is the prompt's text at body size (read back from the page), and the
    Corpus view lists the data folder's datasets, opens the sample and shows its contexts as text."""
    playwright = require_browser()
    with playwright.sync_playwright() as p:
        browser, page = open_app(p, server, width=1280)
        prompt = page.locator("textarea").first
        typed = "Readable tokens: the strip shows this sentence as text."
        prompt.fill(typed)
        prompt.press("Control+Enter")
        strip = page.locator(".gs-tokens").first
        deadline = time.time() + 60
        while time.time() < deadline and "Readable tokens" not in strip.inner_text():
            page.wait_for_timeout(300)
        shown = strip.inner_text()
        size = float(strip.locator(".gs-tok").nth(1).evaluate("e => parseFloat(getComputedStyle(e).fontSize)"))
        page.get_by_role("tab", name="Corpus").click()
        page.get_by_role("button", name="Collect a sample dataset").click()
        rows = page.locator(".gs-row")
        rows.first.wait_for(timeout=180_000)
        context = rows.first.inner_text()
        chosen = page.locator(
            '[data-testid="stSelectbox"]', has_text="Dataset"
        ).last.inner_html()  # value in the markup
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / "dashboard-corpus-contexts.png"), full_page=True)
        browser.close()
    assert typed in shown.replace("\n", "")  # BOS first, then the sentence as written
    assert size >= 14, f"tokens render at {size}px"
    assert "sample-pydoc-tiny-llama-" in chosen, chosen  # the collected sample, chosen from the list
    # The first context row reads as the text of its example: the sample's lowest-gate occurrence at
    # the view's default cell (last layer, MLP), computed here from the dataset the page collected.
    from analysis.traces.tracedb import TraceDB

    (folder,) = [f for f in (tmp_path / "data").iterdir() if not f.name.startswith(".")]
    db = TraceDB(folder)
    contexts = db.example_contexts(db.counts()["layers"] - 1, "mlp", n=8, lowest=True)
    expected = "".join(contexts[contexts.example == 1].sort_values("offset").token).replace("\n", "↵\n")
    assert context.removeprefix("#1").strip() == expected.strip(), (context, expected)
