"""The sample text files the README's and the docs' commands name (docs/examples/), cut from real text.

python3 scripts/doc_examples.py [--out docs/examples]

Each file is whole topics of Python's own documentation (`pydoc_data.topics`), from the held-out
split the gates never trained on (`gateskip_core.data.pydoc_texts("validation")`), paragraphs
separated by blank lines as `gateskip collect --file` reads them. They are short on purpose:
tests/test_docs.py runs every documented command on them with the real model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from pydoc_data.topics import topics

from gateskip_core.files import atomic_write

# file name -> pydoc topics (all in the validation split: see gateskip_core.data._bucket)
EXAMPLES = {
    "notes.txt": ["return"],  # the README tour's `collect --file`
    "corpus.txt": ["raise"],  # docs/analysis.md's corpus-scale `collect --file`
}


def text_of(topic_names: list[str]) -> str:
    return "\n\n".join(topics[name].strip() for name in topic_names) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/examples")
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, topic_names in EXAMPLES.items():
        text = text_of(topic_names)
        atomic_write(folder / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {folder / name} ({len(text)} characters, pydoc topics {', '.join(topic_names)})")


if __name__ == "__main__":
    main()
