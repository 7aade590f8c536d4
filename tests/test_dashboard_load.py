"""The dashboard under load: a real Streamlit server, four Chromium sessions at once (loopback only).

One session runs a sweep while the others move sliders, switch gates and models and upload a
damaged checkpoint. Nothing may crash, no session may see another's prompt or gates, a bad upload
stays in its session, and the server's memory must stay bounded over 50 different prompts and 10
uploads (the process-wide caches are bounded). Figures (memory, slowest response) are printed and
written to artifacts/dashboard_load.json.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil
import pytest
import torch

from gateskip_core import GateCheckpoint, GateSet, load_model, save_gates

from .test_browser import CHROMIUM, SCREENSHOT_DIR, require_browser

pytestmark = pytest.mark.browser
SESSIONS = ["alpha", "bravo", "charlie", "delta"]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def settle(page, timeout_s: float = 120) -> float:
    """Wait until the session's rerun has finished (the 'running' widget gone twice in a row)."""
    start = time.time()
    quiet = 0
    while time.time() - start < timeout_s:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        quiet = 0 if running else quiet + 1
        if quiet >= 2:
            return time.time() - start
        page.wait_for_timeout(200)
    raise AssertionError(f"a rerun did not finish within {timeout_s} s")


def choose(page, label: str, option: str) -> None:
    box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text=label)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()


def selected(page, label: str) -> str:
    box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text=label)
    return box.locator('input[role="combobox"]').input_value()


def type_prompt(page, text: str) -> None:
    area = page.locator("textarea").first
    area.fill(text)
    area.press("Control+Enter")


def strip_text(page) -> str:
    """The text the browser rendered in the Explore token strip (inline tokens), whitespace dropped:
    the tiny model's tokens are characters."""
    text = page.locator(".gs-tokens").first.inner_text()
    return re.sub(r"\s", "", text)


def shows(page, word: str, timeout_s: float = 60) -> bool:
    """Whether the session's token strip comes to show `word` (from its current prompt)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if word in strip_text(page):
            return True
        page.wait_for_timeout(250)
    return False


def budget_asked(page) -> str:
    metric = page.locator('[data-testid="stMetric"]', has_text="Skipped fraction")
    return metric.locator('[data-testid="stMetricDelta"]').inner_text()


def no_exception(page) -> bool:
    return page.locator('[data-testid="stException"]').count() == 0


def gate_files(tmp_path: Path, n: int) -> list[Path]:
    model = load_model("tiny-llama")
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        gates = GateSet(model.spec.n_layers, model.spec.d_model, "scalar")
        ckpt = GateCheckpoint(gates=gates, model="tiny-llama", fingerprint=model.spec.fingerprint())
        paths.append(save_gates(ckpt, tmp_path / f"gates_{seed}.safetensors"))
    return paths


LOAD_GROWTH_LIMIT_MB = 10
WORDS = "apple river candle orange window silver garden planet rocket forest".split()


def test_four_sessions_at_once_stay_apart_and_memory_stays_bounded(server, tmp_path):
    playwright = require_browser()
    server_proc = psutil.Process(server.pid)
    bad_upload = tmp_path / "damaged.safetensors"
    bad_upload.write_bytes(b"\x00not a checkpoint" * 64)
    uploads = gate_files(tmp_path, 10)
    slowest = 0.0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pages = {}
        for name in SESSIONS:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(server.url)
            pages[name] = page
        for page in pages.values():
            page.get_by_text("Skipped branch evaluations").wait_for(timeout=120_000)
            settle(page)
        prompts = {name: f"Session {name} writes its own prompt about gates and layers." for name in SESSIONS}
        for name, page in pages.items():
            type_prompt(page, prompts[name])
        for page in pages.values():
            slowest = max(slowest, settle(page))
        for name, page in pages.items():  # each session renders its own prompt's tokens, nobody else's
            assert shows(page, f"Session{name}writes"), f"session {name} does not show its prompt"
            assert not any(other in strip_text(page) for other in SESSIONS if other != name)
        rss_start = server_proc.memory_info().rss

        # All at once: alpha sweeps while the others change settings, gates and models.
        alpha, bravo, charlie, delta = (pages[n] for n in SESSIONS)
        alpha.get_by_role("tab", name="Sweep").click()
        alpha.get_by_role("button", name="Run sweep").click()
        assert "25.0%" in budget_asked(bravo)
        slider = bravo.locator('[data-testid="stSidebar"] [data-testid="stSlider"] input').first
        slider.focus()
        slider.press("ArrowRight")
        choose(bravo, "Gates", "untrained:scalar")
        choose(charlie, "Model", "tiny-gemma3")
        choose(delta, "Gates", "upload")
        delta.locator('[data-testid="stSidebar"] input[type="file"]').set_input_files(str(bad_upload))
        for page in pages.values():
            slowest = max(slowest, settle(page, 300))
        for name, page in pages.items():
            assert no_exception(page), f"session {name} shows an exception"
            assert page.locator("textarea").first.input_value() == prompts[name]  # its own prompt, nobody else's
        assert "30.0%" in budget_asked(bravo)  # the slider's move reran bravo with the new budget
        assert "25.0%" in budget_asked(charlie) and "25.0%" in budget_asked(delta)  # and only bravo
        assert alpha.get_by_role("button", name="Sweep (CSV)").count() == 1  # the sweep finished
        assert delta.get_by_text("not a valid safetensors gate checkpoint").count() >= 1
        for name in ("alpha", "bravo", "charlie"):
            assert pages[name].get_by_text("not a valid safetensors").count() == 0  # the bad upload stayed in delta
        assert selected(bravo, "Gates") == "untrained:scalar" and selected(alpha, "Gates") != "untrained:scalar"
        assert selected(charlie, "Model") == "tiny-gemma3"
        assert all(selected(pages[n], "Model") == "tiny-llama" for n in ("alpha", "bravo", "delta"))

        # 50 different prompts and 10 uploads, spread over the sessions.
        rss_loaded = server_proc.memory_info().rss
        alpha.get_by_role("tab", name="Explore").click()  # back from the sweep, to the prompt
        for i in range(50):
            page = pages[SESSIONS[i % 4]]
            word = WORDS[i % len(WORDS)] + ("" if i < len(WORDS) else "s" * (i // len(WORDS)))
            type_prompt(page, f"Prompt number {i} asks about the {word} and layer {i % 5} of the gated model.")
            slowest = max(slowest, settle(page))
            assert shows(page, f"the{word}and"), f"prompt {i} did not rerun its session with its text"
        for i, path in enumerate(uploads):
            delta.locator('[data-testid="stSidebar"] input[type="file"]').set_input_files(str(path))
            slowest = max(slowest, settle(delta))
            assert no_exception(delta), f"upload {i} raised"
        assert delta.get_by_text("not a valid safetensors").count() == 0  # a good upload replaced the bad one
        rss_end = server_proc.memory_info().rss
        for name, page in pages.items():
            assert no_exception(page), f"session {name} shows an exception after the load"
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        alpha.screenshot(path=str(SCREENSHOT_DIR / "dashboard-load-alpha.png"))
        browser.close()
    figures = {
        "sessions": len(SESSIONS),
        "server_rss_mb_after_warmup": rss_start / 2**20,
        "server_rss_mb_after_concurrent_phase": rss_loaded / 2**20,
        "server_rss_mb_after_50_prompts_10_uploads": rss_end / 2**20,
        "growth_mb_over_prompts_and_uploads": (rss_end - rss_loaded) / 2**20,
        "slowest_response_s": slowest,
    }
    (SCREENSHOT_DIR / "dashboard_load.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    # Bounded, in proportion to the tiny model (0.66 MB of weights, ~70-token prompts): measured here
    # ~3 MB of growth over the 50 prompts and 10 uploads; an app that kept each prompt's traces and
    # figures in a process-wide cache grew by 13.5 MB (checked once by adding such a cache).
    assert rss_end - rss_loaded < LOAD_GROWTH_LIMIT_MB * 2**20, figures
