"""Cold (first load: GGUF dequantised and converted) and warm (from the cache) load times.

    python gateskip/bench/load_times.py [--models smollm2-135m-instruct gemma3-270m] [--out docs/results/bench_load_times.json]

Cold loads use a fresh temporary cache directory (`GATESKIP_CACHE`, read by
`gateskip_core.backbone.registry.cache_root` at each load), so your own cache is untouched. The GGUF
itself is read from the local Hugging Face cache. `--out` also writes the times as JSON, which
scripts/doc_tables.py renders into docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from analysis.inputs import check_out
from gateskip.bench.clock import clock
from gateskip_core.backbone.registry import CACHE_ENV, DEFAULT_MODEL
from gateskip_core.cli import add_device_dtype_args, run_script, script_parser


def main() -> None:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "gemma3-270m"])
    add_device_dtype_args(parser)
    parser.add_argument("--out", default=None, help="also write the times as JSON (the figures the docs quote)")
    args = parser.parse_args()
    check_out(args.out, (".json",))  # before minutes of loading
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ[CACHE_ENV] = cache
        from gateskip_core import load_model

        print(f"{'model':24s} {'cold (s)':>9s} {'warm (s)':>9s}")
        for name in args.models:
            start = clock()
            load_model(name, device=args.device, dtype=args.dtype)
            cold = clock() - start
            start = clock()
            load_model(name, device=args.device, dtype=args.dtype)
            warm = clock() - start
            print(f"{name:24s} {cold:9.1f} {warm:9.2f}")
            rows.append({"model": name, "cold_s": cold, "warm_s": warm})
    if args.out:
        from gateskip.bench.suite import machine

        results = {
            "script": "load_times",
            "command": shlex.join(["python", "gateskip/bench/load_times.py", *sys.argv[1:]]),
            "machine": machine(),
            "device": args.device,
            "dtype": args.dtype,
            "loads": rows,
            "date": time.strftime("%Y-%m-%d"),
        }
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def summary(results: dict) -> str:
    """One line of a `--out` file's times, as docs/benchmarks.md shows them."""
    return "; ".join(
        f"{row['model']}: cold {row['cold_s']:.1f} s (GGUF → cache), warm {row['warm_s']:.2f} s"
        for row in results["loads"]
    )


if __name__ == "__main__":
    raise SystemExit(run_script(main))
