"""Cold (first load: GGUF dequantised and converted) and warm (from the cache) load times.

    python gateskip/bench/load_times.py [--models smollm2-135m-instruct gemma3-270m]

Cold loads use a fresh temporary cache directory, so your own cache is untouched.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from gateskip.bench.clock import clock
from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.cli import add_device_dtype_args


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "gemma3-270m"])
    add_device_dtype_args(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["GATESKIP_CACHE"] = cache
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


if __name__ == "__main__":
    main()
