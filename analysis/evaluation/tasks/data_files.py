"""Absolute paths of the shipped tasks' data, read by the YAMLs as `!function data_files.<name>`.

lm-eval resolves `!function` against the YAML's own folder (here: any attribute, a path string
too), whereas a plain relative `data_files` path would be resolved by `datasets` against the
current directory. So the tasks run from anywhere, through `gateskip eval` or `lm_eval --include_path`.
The data is built by scripts/build_eval_tasks.py.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

pydoc_nextsent = str(_HERE / "pydoc_nextsent.jsonl")
pydoc_lastword = str(_HERE / "pydoc_lastword.jsonl")
pydoc_paragraphs = str(_HERE / "pydoc_paragraphs.jsonl")
legal_nextsent = str(_HERE / "legal_nextsent.jsonl")
legal_lastword = str(_HERE / "legal_lastword.jsonl")
legal_paragraphs = str(_HERE / "legal_paragraphs.jsonl")
