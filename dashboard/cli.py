"""`gateskip dashboard` (assembled into the command line by `gateskip.cli`).

The server listens on the loopback interface unless `--host` says otherwise (with a warning:
the app has no login); the URL printed is the one it listens on. `--gates FILE` adds a gate
checkpoint to the sidebar's choices and opens the app with it (read before the server starts); `--device` and
`--dtype` (checked before it starts) place every model the app loads. Datasets the Corpus view
lists, opens and collects live in `--data-dir` (default: `<cache>/dashboard-data`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from gateskip_core.backbone.registry import DEFAULT_MODEL, REGISTRY, cache_root
from gateskip_core.cli import add_device_dtype_args
from gateskip_core.errors import GateSkipError

APP = Path(__file__).resolve().parent / "app.py"


def default_data_dir() -> Path:
    return cache_root() / "dashboard-data"


def check_host(host: str) -> tuple[str, bool]:
    """(address to bind, whether it is a loopback address); one-line error for anything else."""
    host = host.strip()
    if host == "localhost":
        return "127.0.0.1", True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise GateSkipError(
            f"--host must be an IP address (127.0.0.1, ::1, 0.0.0.0, ...) or localhost, got {host!r}"
        ) from None
    return str(address), address.is_loopback


def check_port(host: str, port: int) -> int:
    """A port in 1..65535 that is free on `host`; one-line error otherwise."""
    if not 1 <= port <= 65535:
        raise GateSkipError(f"--port must be a whole number in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise GateSkipError(f"cannot listen on {host} port {port}: {err.strerror or err}") from None
    return port


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_model(model: str) -> str:
    """A registry name, or a local checkpoint directory of a supported family (made absolute)."""
    from gateskip_core.backbone.registry import check_family, missing_folder

    if model in REGISTRY:
        return model
    path = Path(model).expanduser()
    if missing_folder(model):  # the loader's wording
        raise GateSkipError(missing_folder(model))
    if not path.is_dir():
        raise GateSkipError(
            f"unknown model {model!r}; choose one of {', '.join(REGISTRY)} or a local checkpoint directory"
        )
    check_family(path)
    return str(path.resolve())


def check_weights(weights: str) -> str:
    """fp32, int8 or int4: the app runs quanto's dequantised weights (its kernels are for a GPU)."""
    from gateskip_core.backbone.quantisation import WEIGHTS

    if weights not in WEIGHTS:
        raise GateSkipError(f"--weights must be one of {', '.join(WEIGHTS)} in the dashboard, got {weights!r}")
    return weights


def cmd_dashboard(args: argparse.Namespace) -> int:
    model = check_model(args.model)
    host, loopback = check_host(args.host)
    port = check_port(host, args.port)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise GateSkipError(f"--data-dir {data_dir} is not a folder")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GateSkipError(f"cannot create --data-dir {data_dir}: {err.strerror or err}") from None
    env = dict(os.environ, GATESKIP_DASHBOARD_MODEL=model, GATESKIP_DASHBOARD_DATA=str(data_dir.resolve()))
    env["GATESKIP_DASHBOARD_WEIGHTS"] = check_weights(args.weights)
    env["GATESKIP_DASHBOARD_DEVICE"], env["GATESKIP_DASHBOARD_DTYPE"] = args.device, args.dtype  # checked already
    if args.gates is not None:  # read already (gateskip_core.cli.check_inputs); matched to the model in the app
        env["GATESKIP_DASHBOARD_GATES"] = str(Path(args.gates).expanduser().resolve())
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    if not loopback:
        shown = "every interface of this machine" if ipaddress.ip_address(host).is_unspecified else host
        print(
            f"warning: the dashboard listens on {shown} and has no login: anyone who can reach this machine "
            "can use it and read the datasets in its data folder",
            file=sys.stderr,
        )
    print(f"GateSkip Lens dashboard on {url_of(host, port)}  (data: {data_dir}; Ctrl-C to stop)", file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)  # the server replaces this process: signals reach it directly
    return 0  # not reached


def register(sub, commands) -> None:
    p = sub.add_parser("dashboard", help="start the Streamlit dashboard")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="registry model, or a local checkpoint directory, selected when the app opens",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port to listen on")
    p.add_argument(
        "--gates",
        help="a gate checkpoint (.safetensors, e.g. from `gateskip train`) offered in the sidebar and selected "
        "when the app opens (default: the model's shipped gates)",
    )
    p.add_argument(
        "--weights",
        default="fp32",
        help="the backbone's projections selected when the app opens: fp32 | int8 | int4 (optimum-quanto, weight only)",
    )
    add_device_dtype_args(p)  # every model the app loads; checked before the server starts
    p.add_argument("--data-dir", help="the Corpus view's datasets (default: <cache>/dashboard-data)")
    commands["dashboard"] = cmd_dashboard
