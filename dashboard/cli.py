"""`gateskip dashboard` (assembled into the command line by `gateskip.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gateskip_core.errors import GateSkipError
from gateskip_core.registry import DEFAULT_MODEL, REGISTRY

APP = Path(__file__).resolve().parent / "app.py"


def cmd_dashboard(args: argparse.Namespace) -> int:
    if args.model not in REGISTRY:
        raise GateSkipError(f"unknown model {args.model!r}; choose one of {', '.join(REGISTRY)}")
    env = dict(os.environ, GATESKIP_DASHBOARD_MODEL=args.model)
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(args.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    print(f"GateSkip Lens dashboard on http://localhost:{args.port}  (Ctrl-C to stop)", file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)  # the server replaces this process: signals reach it directly
    return 0  # not reached


def register(sub, commands) -> None:
    p = sub.add_parser("dashboard", help="start the Streamlit dashboard")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry model selected when the app opens")
    p.add_argument("--port", type=int, default=8501)
    commands["dashboard"] = cmd_dashboard
