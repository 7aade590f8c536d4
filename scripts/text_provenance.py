"""Which Python's texts the figures used: the held-out and calibration texts are Python's own pydoc topics
and LICENSE.txt, which change between Python versions, so the figures depend on the Python that ran them.
Writes one row per text set (the Python version, the file it comes from, its length and SHA-256) for the
Python running this script; docs/data.md quotes the rows the shipped figures were made with.

    python3 scripts/text_provenance.py --out docs/results/texts.csv
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sysconfig
from pathlib import Path

import pandas as pd

from gateskip_core.data import pydoc_texts


def license_text() -> tuple[str, Path]:
    """Python's LICENSE.txt, read as scripts/reproduce_results.sh reads it (the legal held-out text)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return path.read_text(), path


def rows() -> list[dict]:
    import pydoc_data.topics

    texts = {f"pydoc {split}": ("\n\n".join(pydoc_texts(split)), Path(pydoc_data.topics.__file__))
             for split in ("validation", "calibration", "train")}  # fmt: skip
    texts["LICENSE"] = license_text()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [
        {
            "text": name,
            "python": platform.python_version(),
            "source": f"stdlib/{source.relative_to(stdlib)}",
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
        for name, (text, source) in texts.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/texts.csv")
    args = parser.parse_args()
    pd.DataFrame(rows()).to_csv(args.out, index=False)
    print(pd.read_csv(args.out).to_string(index=False))


if __name__ == "__main__":
    main()
