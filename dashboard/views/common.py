"""Shared by the views: the models offered, the process-wide model hub, cached gate views, downloads."""

from __future__ import annotations

import os

import streamlit as st

from dashboard import service
from gateskip_core import DEFAULT_MODEL, REGISTRY


def start_model() -> str:
    """The model the app opens with (`gateskip dashboard --model`), read per run."""
    return os.environ.get("GATESKIP_DASHBOARD_MODEL", DEFAULT_MODEL)


def start_gates() -> str | None:
    """The gate checkpoint given on the command line (`gateskip dashboard --gates FILE`), read per run."""
    return os.environ.get("GATESKIP_DASHBOARD_GATES") or None


def start_weights() -> str:
    """The backbone's weights the app opens with (`gateskip dashboard --weights`), read per run."""
    return os.environ.get("GATESKIP_DASHBOARD_WEIGHTS", "fp32")


def model_names() -> list[str]:
    """The registry's models, and a local checkpoint directory given on the command line (visitors
    cannot name other paths)."""
    start = start_model()
    return list(REGISTRY) + ([start] if start not in REGISTRY else [])


def start_device() -> tuple[str, str]:
    """(device, dtype) every model of this process loads on (`gateskip dashboard --device/--dtype`)."""
    return os.environ.get("GATESKIP_DASHBOARD_DEVICE", "cpu"), os.environ.get("GATESKIP_DASHBOARD_DTYPE", "float32")


@st.cache_resource(show_spinner=False)
def hub() -> service.ModelHub:
    return service.ModelHub(*start_device())


@st.cache_resource(show_spinner=False, max_entries=16)
def gated_view(model_name: str, gates: str, upload_digest: str | None, _upload: bytes | None, weights: str = "fp32"):
    """One view per (model, gates, weights) per process, shared by all sessions (views are read-only)."""
    return hub().view(model_name, gates, _upload, weights)


def download(container, label: str, data, file_name: str, mime: str, key: str | None = None) -> None:
    """A download button that does not rerun the app when clicked.

    `data` is usually a callable, run only when clicked (keeps the slider path light). Streamlit
    answers that click over the websocket, and a rerun starting before the answer is sent drops it
    from the outgoing queue: the button then spins for three minutes and downloads nothing. A rerun
    on click is Streamlit's default, so every download here turns it off.
    """
    container.download_button(label, data, file_name, mime, key=key, on_click="ignore")


def figure_download(container, label: str, fig, file_name: str) -> None:
    """A figure as a standalone HTML file; serialised only when clicked."""
    download(
        container, label, lambda: fig.to_html(include_plotlyjs="cdn"), file_name, "text/html", f"download_{file_name}"
    )


def explored_trace():
    """The trace the Explore view shows, or None (with a hint) before it has run."""
    shown = st.session_state.get("shown_trace")
    if shown is None:
        st.info("Run a prompt in the Explore view first.")
    return shown
