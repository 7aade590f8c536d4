"""The README's dashboard screenshot (docs/images/dashboard.png): a real `gateskip dashboard` on SmolLM2 with
the shipped default gates, driven in headless Chromium (Debian's chromium + playwright).

    python3 scripts/dashboard_screenshot.py [--out docs/images/dashboard.png]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Python language reference describes the syntax and core semantics of the language."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "dashboard.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "gateskip.cli", "dashboard", "--port", str(port)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(180):
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1500})  # down to the heatmap
            page.goto(url)
            page.get_by_text("Skipped branch evaluations").wait_for(timeout=300_000)
            prompt = page.locator("textarea").first
            prompt.fill(PROMPT)
            prompt.press("Control+Enter")
            page.locator(".gs-tokens").first.get_by_text("reference").wait_for(timeout=120_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
