"""Execute the notebooks and store them with their outputs, or check that the stored outputs are the
ones the code produces now.

    python scripts/run_notebooks.py                 # re-execute all eight and store them executed
    python scripts/run_notebooks.py 03_budgets      # one (or several) by name
    python scripts/run_notebooks.py --check         # re-execute, compare with the stored, store nothing

Each notebook runs on one torch thread with the sample sizes written in its first code cell (the
same settings as tests/test_notebooks.py, which calls `execute` and `differences` from here), writes
its CSV files to a temporary folder, and prints how long it took. The comparison reads every text
output (stdout, Markdown, HTML and plain text); it ignores stderr (progress bars, notices), the
figures' JSON and PNG (their numbers are printed elsewhere), and normalises what may legitimately
differ between runs: memory addresses, the temporary output folder, and each number by one unit of
its last printed digit (a value on a rounding boundary).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
TEXT_MIMES = ("text/markdown", "text/html", "text/plain")
# One torch thread, as the shared CI machine and the stored outputs use (results are reproducible
# bit for bit at a fixed thread count, not across thread counts).
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

NUMBER = re.compile(r"[-+]?\d+(?:\.(\d+))?(?:[eE]([-+]?\d+))?")
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if names:
        paths = [p for p in paths if any(p.stem.startswith(n) or p.name == n for n in names)]
    return paths


def execute(path: Path, out_dir: Path, timeout: int = 900) -> tuple[nbformat.NotebookNode, float]:
    """The notebook executed in a fresh kernel (working directory and CSV outputs in `out_dir`),
    with how many seconds it took."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # start from a clean slate: nothing stored survives a re-execution
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {**os.environ, **KERNEL_ENV, "GATESKIP_NOTEBOOK_OUT": str(out_dir)}
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(out_dir)}}
    )
    start = time.perf_counter()
    client.execute(env=env)  # the kernel's environment; this process's own is left as it is
    return nb, time.perf_counter() - start


def _normalised(text: str, out_dir: str | None) -> str:
    if out_dir:
        text = text.replace(out_dir, "<OUT>")
    return ADDRESS.sub("0x<address>", text)


def cell_texts(cell: nbformat.NotebookNode, out_dir: str | None = None) -> list[str]:
    """The text outputs of one code cell that the comparison reads, normalised."""
    texts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            if output.name == "stdout":
                texts.append(_normalised(output.text, out_dir))
        elif output.output_type == "error":
            texts.append(f"{output.ename}: {output.evalue}")
        elif PLOTLY_MIME not in output.get("data", {}):
            texts += [_normalised(_joined(output.data[m]), out_dir) for m in TEXT_MIMES if m in output.data]
    return texts


def _joined(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else value


def _numbers_agree(a: re.Match, b: re.Match) -> bool:
    """Two printed numbers agree when printed alike, or one unit of their last printed digit apart."""
    if a.group(0) == b.group(0):
        return True
    decimals_a, decimals_b = len(a.group(1) or ""), len(b.group(1) or "")
    if decimals_a != decimals_b or (a.group(2) or "0") != (b.group(2) or "0"):
        return False
    unit = 10.0 ** (int(a.group(2) or 0) - decimals_a)
    return abs(float(a.group(0)) - float(b.group(0))) <= unit * 1.0001


def text_difference(stored: str, fresh: str) -> str | None:
    """None when the two texts agree at the printed precision, otherwise where they first differ."""
    stored_numbers, fresh_numbers = list(NUMBER.finditer(stored)), list(NUMBER.finditer(fresh))
    if NUMBER.sub("#", stored) != NUMBER.sub("#", fresh) or len(stored_numbers) != len(fresh_numbers):
        lines = [(s, f) for s, f in zip(stored.splitlines(), fresh.splitlines()) if s != f]
        first = lines[0] if lines else (stored[:200], fresh[:200])
        return f"text differs: stored {first[0]!r} / now {first[1]!r}"
    for a, b in zip(stored_numbers, fresh_numbers):
        if not _numbers_agree(a, b):
            return (
                f"number differs: stored {a.group(0)} / now {b.group(0)} (…{stored[max(0, a.start() - 60) : a.end()]})"
            )
    return None


def differences(stored: nbformat.NotebookNode, fresh: nbformat.NotebookNode, out_dir: str) -> list[str]:
    """Every code cell whose text outputs differ between the stored and a fresh execution."""
    found = []
    stored_cells = [c for c in stored.cells if c.cell_type == "code"]
    fresh_cells = [c for c in fresh.cells if c.cell_type == "code"]
    if len(stored_cells) != len(fresh_cells):
        return [f"{len(stored_cells)} code cells stored, {len(fresh_cells)} now"]
    for index, (old, new) in enumerate(zip(stored_cells, fresh_cells)):
        if old.source != new.source:
            found.append(f"code cell {index}: source changed since the notebook was stored")
            continue
        old_texts, new_texts = cell_texts(old), cell_texts(new, out_dir)
        if len(old_texts) != len(new_texts):
            found.append(f"code cell {index}: {len(old_texts)} text outputs stored, {len(new_texts)} now")
            continue
        for old_text, new_text in zip(old_texts, new_texts):
            problem = text_difference(old_text, new_text)
            if problem:
                found.append(f"code cell {index}: {problem}")
                break
    return found


def store(nb: nbformat.NotebookNode, path: Path, out_dir: str) -> None:
    """Write the executed notebook with the temporary folder's path replaced, so that nothing
    machine-specific is stored."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                output.text = output.text.replace(out_dir, "<OUT>")
            for mime in TEXT_MIMES:
                if mime in output.get("data", {}):
                    output.data[mime] = _joined(output.data[mime]).replace(out_dir, "<OUT>")
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run, by name or prefix (default: all)")
    parser.add_argument("--check", action="store_true", help="compare with the stored outputs, store nothing")
    args = parser.parse_args(argv)
    failed = False
    for path in notebook_paths(args.names):
        with tempfile.TemporaryDirectory(prefix="gateskip-notebook-") as out_dir:
            fresh, seconds = execute(path, Path(out_dir))
            if args.check:
                problems = differences(nbformat.read(path, as_version=4), fresh, out_dir)
                failed |= bool(problems)
                print(f"{path.name}: {seconds:.0f} s, " + ("; ".join(problems) if problems else "outputs as stored"))
            else:
                store(fresh, path, out_dir)
                print(f"{path.name}: executed in {seconds:.0f} s and stored")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
