"""The notebooks are stored executed, with a static image in every figure, and their stored outputs are
those the code produces now (re-executed on the real model by `scripts/run_notebooks.py`'s functions)."""

from __future__ import annotations

import base64
import importlib.util
import sys
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import pytest

from analysis.traces import display

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
sys.modules["run_notebooks"] = run_notebooks
_spec.loader.exec_module(run_notebooks)

NOTEBOOKS = run_notebooks.notebook_paths()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_notebooks_stored_executed_with_static_figures():
    """Every code cell ran (in order, without an error), and every Plotly figure carries a PNG that a
    viewer without a kernel (GitHub, nbconvert) shows."""
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name} not run in order"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], f"{path.name} stored an error"
        figures = [o for o in outputs if run_notebooks.PLOTLY_MIME in o.get("data", {})]
        assert figures, f"{path.name} shows no figure"
        for output in figures:
            assert base64.b64decode(output.data["image/png"])[:8] == PNG_MAGIC, f"{path.name}: a figure has no PNG"


def test_show_puts_a_png_beside_the_interactive_figure(capsys):
    pytest.importorskip("kaleido")
    fig = go.Figure(go.Bar(x=["attn", "mlp"], y=[0.3, 0.7]), layout={"title": "skip rate"})
    bundle = display.figure_bundle(fig)
    if "image/png" not in bundle:
        pytest.fail("kaleido is installed but no PNG was rendered: " + capsys.readouterr().err)
    assert base64.b64decode(bundle["image/png"])[:8] == PNG_MAGIC
    assert bundle[display.PLOTLY_MIME]["data"][0]["y"] == [0.3, 0.7]
    assert bundle["text/plain"] == "<Plotly figure: skip rate>"


def test_show_without_a_renderer_is_interactive_with_one_notice(monkeypatch, capsys):
    """No kaleido (or no Chromium): the figure still shows, and one line says why there is no image."""
    monkeypatch.setitem(display._renderer_state, "ready", None)
    monkeypatch.setitem(sys.modules, "kaleido", None)  # `import kaleido` raises ImportError
    fig = go.Figure(go.Bar(y=[1, 2]))
    first, second = display.figure_bundle(fig), display.figure_bundle(fig)
    assert "image/png" not in first and "image/png" not in second and display.PLOTLY_MIME in first
    assert capsys.readouterr().err.strip() == display.NO_PNG_NOTICE  # once, not once per figure


@pytest.mark.parametrize(
    ("stored", "fresh", "agree"),
    [
        ("KL 0.1234, 36% of 120 cells", "KL 0.1235, 37% of 121 cells", True),  # one unit of the last digit
        ("KL 0.1234", "KL 0.1236", False),
        ("KL 0.1234", "KL 0.123", False),  # printed at another precision
        ("ratio 1.2e-05", "ratio 1.3e-05", True),
        ("skip rate of attention", "skip rate of MLP", False),
    ],
)
def test_outputs_compare_at_the_printed_precision(stored, fresh, agree):
    assert (run_notebooks.text_difference(stored, fresh) is None) == agree


def test_volatile_text_is_normalised():
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output(
            "stream", name="stdout", text="wrote /tmp/gateskip-notebook-x1/a.csv at 0x7f3a2b1c9d80\n"
        ),
        nbformat.v4.new_output("stream", name="stderr", text="progress 10%\n"),
    ]
    assert run_notebooks.cell_texts(cell, "/tmp/gateskip-notebook-x1") == ["wrote <OUT>/a.csv at 0x<address>\n"]


@pytest.mark.real
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_what_the_code_produces_now(path, tmp_path):
    fresh, seconds = run_notebooks.execute(path, tmp_path)
    problems = run_notebooks.differences(nbformat.read(path, as_version=4), fresh, str(tmp_path))
    assert not problems, (
        f"{path.name} ({seconds:.0f} s): "
        + "; ".join(problems[:3])
        + ("\nregenerate with `python scripts/run_notebooks.py " + path.stem + "` if the change is intended")
    )
    assert any(tmp_path.glob("*.csv"))


def test_show_survives_a_chromium_that_fails_at_render_time(monkeypatch, capsys):
    """kaleido started but the browser fails on a figure (crashed, removed): one notice, no PNG, no error."""

    def broken(*args, **kwargs):
        raise RuntimeError("browser closed")

    monkeypatch.setitem(display._renderer_state, "ready", True)
    monkeypatch.setattr(go.Figure, "to_image", broken)
    fig = go.Figure(go.Bar(y=[1, 2]))
    first, second = display.figure_bundle(fig), display.figure_bundle(fig)
    assert "image/png" not in first and "image/png" not in second and display.PLOTLY_MIME in second
    assert capsys.readouterr().err.strip() == display.NO_PNG_NOTICE
