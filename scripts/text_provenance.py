"""Which Python's texts the figures used: the held-out and calibration texts are Python's own pydoc topics
and LICENSE.txt, which change between Python versions, so the figures depend on the Python that ran them.
Writes one row per text set (the Python version, the file it comes from, its length and SHA-256) for the
Python running this script; docs/data.md quotes the rows the shipped figures were made with.

    python3 scripts/text_provenance.py --out docs/results/texts.csv
    python3 scripts/text_provenance.py --check-tokens docs/results/tokens.csv

--check-tokens: does a `gateskip stats --tokens-out` file of the held-out pydoc traces (`gateskip collect
--file runs/heldout.txt --max-tokens 128`: each paragraph's BOS and first 127 tokens) count every token
as this Python's validation text does? A text from another Python release changes the counts.
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


def token_counts_matching(tokens_csv: Path, max_tokens: int = 128) -> tuple[int, int]:
    """(rows whose count this Python's validation text reproduces, rows) of a --tokens-out file."""
    from collections import Counter

    from gateskip_core import load_model
    from gateskip_core.data import paragraphs

    tokenizer = load_model("smollm2-135m-instruct", gates="none").tokenizer
    counts: Counter = Counter()
    for paragraph in paragraphs("\n\n".join(pydoc_texts("validation"))):
        ids = tokenizer(paragraph, add_special_tokens=False).input_ids[: max_tokens - 1]
        counts.update([tokenizer.bos_token_id, *ids])
    table = pd.read_csv(tokens_csv)
    return int((table["token_id"].map(counts.__getitem__) == table["count"]).sum()), len(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/texts.csv")
    parser.add_argument("--check-tokens", type=Path, help="a --tokens-out CSV of the held-out pydoc traces")
    args = parser.parse_args()
    if args.check_tokens:
        same, rows = token_counts_matching(args.check_tokens)
        print(f"{same} of {rows} token counts of {args.check_tokens} match Python {platform.python_version()}'s text")
        return
    pd.DataFrame(rows()).to_csv(args.out, index=False)
    print(pd.read_csv(args.out).to_string(index=False))


if __name__ == "__main__":
    main()
