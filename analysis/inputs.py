"""Checks of command-line inputs shared by the analysis commands (`analysis.cli` and the commands
kept in modules of their own), made before any model work."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateskip_core.data import paragraphs_of  # noqa: F401  (the analysis commands import it from here)
from gateskip_core.errors import GateSkipError
from gateskip_core.files import check_writable


def check_out(path: str | None, suffixes=(".csv",), option: str = "--out") -> Path | None:
    """Checked before any work: the suffix, and that the file can be written."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise GateSkipError(f"{option} must end in {' or '.join(suffixes)}, got {path!r}")
    return check_writable(out, option)


def budget_list(text: str) -> list[float]:
    """`--budgets 0,0.1,0.2`: comma-separated numbers in [0, 1] (an argparse type)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must lie in [0, 1], got {text!r}")
    return values
