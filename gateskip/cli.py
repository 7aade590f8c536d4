"""`gateskip`: one entry point for the commands each package keeps for itself.

    gateskip_core.cli   models, trace, train, fit-fill (and the runner: one-line errors, exit 2)
    analysis.cli        quality, sweep, collect, stats, faithfulness, lens, settled, ...
    gateskip.bench.cli  bench
    dashboard.cli       dashboard

The core imports nothing from the packages built on it; this module is the only place that
knows them all. `python -m gateskip ...` is the same as the `gateskip` console script.
"""

from __future__ import annotations

import argparse

from gateskip_core import cli as core


def build_parser() -> argparse.ArgumentParser:
    from analysis.cli import register as register_analysis
    from dashboard.cli import register as register_dashboard
    from gateskip.bench.cli import register as register_bench

    parser, sub = core.new_parser()
    core.register(sub)
    register_analysis(sub, core.COMMANDS, core.add_model_args, core.add_skip_args, core.budget_type)
    register_bench(sub, core.COMMANDS)
    register_dashboard(sub, core.COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return core.run(build_parser, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
