"""Show a Plotly figure in a notebook so that it reads both with and without a kernel.

`show(fig)` displays ONE output holding two renderings of the figure: Plotly's own JSON (JupyterLab,
VS Code and Colab draw it interactively) and a PNG of the same figure, which is what a stored
notebook shows where no JavaScript runs (GitHub, `jupyter nbconvert --to html`, a text editor's
preview). The PNG is rendered by kaleido with the system's Chromium (the `[notebooks]` extra); where
either is missing the figure is shown interactively only, with a one-line notice on stderr.
"""

from __future__ import annotations

import atexit
import base64
import json
import sys
import warnings

import plotly.graph_objects as go

PLOTLY_MIME = "application/vnd.plotly.v1+json"
NO_PNG_NOTICE = (
    "gateskip: static figure images need kaleido and Chromium (pip install -e '.[notebooks]'; "
    "apt-get install chromium); figures are shown interactively only"
)

# kaleido keeps one headless Chromium per process once started (about 5 s), after which a figure
# renders in well under a second; None until the first figure, False once it is known to fail.
_renderer_state: dict[str, bool | None] = {"ready": None}


def _start_renderer() -> bool:
    """Start kaleido's Chromium once per process; False (and one notice) where it cannot run."""
    if _renderer_state["ready"] is None:
        try:
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
            atexit.register(kaleido.stop_sync_server, silence_warnings=True)
            _renderer_state["ready"] = True
        except Exception:  # kaleido absent, no Chromium, or a Chromium that will not start
            print(NO_PNG_NOTICE, file=sys.stderr)
            _renderer_state["ready"] = False
    return bool(_renderer_state["ready"])


# A notebook draws a figure without a width of its own across the page; Plotly's static default
# (700 px) would crowd side-by-side panels and their titles.
STATIC_WIDTH, STATIC_HEIGHT = 1000, 500


def figure_png(fig: go.Figure) -> bytes | None:
    """The figure as PNG bytes at its own size (STATIC_WIDTH x STATIC_HEIGHT where it sets none), or
    None where no renderer is available."""
    if not _start_renderer():
        return None
    width, height = fig.layout.width or STATIC_WIDTH, fig.layout.height or STATIC_HEIGHT
    try:
        with warnings.catch_warnings():  # plotly warns that kaleido's options are ignored by a running server
            warnings.simplefilter("ignore")
            return fig.to_image(format="png", width=width, height=height)
    except Exception:  # Chromium missing or failing at render time: the figure stays interactive
        print(NO_PNG_NOTICE, file=sys.stderr)
        _renderer_state["ready"] = False
        return None


def figure_bundle(fig: go.Figure) -> dict[str, object]:
    """The mime bundle `show` displays: Plotly JSON, a PNG where it can be rendered, and a text line."""
    title = fig.layout.title.text or "figure"
    bundle: dict[str, object] = {
        PLOTLY_MIME: json.loads(fig.to_json()),  # numpy arrays as plain JSON lists
        "text/plain": f"<Plotly figure: {title}>",
    }
    png = figure_png(fig)
    if png is not None:
        bundle["image/png"] = base64.b64encode(png).decode("ascii")
    return bundle


def show(fig: go.Figure) -> None:
    """Display the figure interactively with a static PNG beside it in the same output."""
    from IPython.display import display

    display(figure_bundle(fig), raw=True)
