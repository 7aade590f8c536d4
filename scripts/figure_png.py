"""Render a Plotly HTML figure (as written by `gateskip sweep --figure`) to PNG with headless Chromium.

python scripts/figure_png.py docs/results/sweep.html docs/images/sweep.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(src: str, dst: str, width: int = 1000, height: int = 480) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    html = Path(src).read_text().replace('src="https://cdn.plot.ly', 'data-cdn="https://cdn.plot.ly')
    import plotly.offline

    inline = f"<script>{plotly.offline.get_plotlyjs()}</script>"
    page_html = inline + html  # no network here: inline plotly.js
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_content(page_html, wait_until="load")
        page.wait_for_timeout(1500)
        page.screenshot(path=dst, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
