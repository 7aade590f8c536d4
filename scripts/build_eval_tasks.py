"""Builds the data of the shipped lm-eval tasks (analysis/evaluation/tasks/*.jsonl) from held-out real text.

    python3 scripts/build_eval_tasks.py

Sources (no sentence is written by us; every context, choice and answer is cut from these texts):
- `pydoc`: the pydoc topics' validation split (`gateskip_core.data.pydoc_texts("validation")`), text no
  training, calibration or gate fitting reads;
- `legal`: Python's own LICENSE.txt (legal prose, a domain in no training data).

Per source, three files (each line one JSON document):
- `<source>_nextsent.jsonl`: next-sentence multiple choice. Context: up to two sentences of a paragraph;
  choices: the sentence that follows them and three sentences drawn from other paragraphs of the same source.
- `<source>_lastword.jsonl`: last-word cloze. Context: up to two sentences and the next sentence without its
  last word; target: that word (scored as a loglikelihood and, by the `_gen` task, generated greedily).
- `<source>_paragraphs.jsonl`: whole prose paragraphs, for rolling perplexity.
The order and the distractors are drawn with a fixed seed: rerunning the script rewrites the same files.
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

from gateskip_core.data import paragraphs, pydoc_texts

OUT_DIR = Path(__file__).resolve().parent.parent / "analysis" / "evaluation" / "tasks"
SEED = 1234
N_CHOICES = 4
CONTEXT_SENTENCES = 2
MIN_WORDS, MAX_WORDS = 6, 45
# A sentence ends at . ! or ? followed by whitespace and an upper-case letter or a quote.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
ABBREVIATION = re.compile(r"\b(e\.g|i\.e|etc|vs|Inc|U\.S|No|Mr|Dr|cf)\.$")


def source_texts() -> dict[str, list[str]]:
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return {"pydoc": pydoc_texts("validation"), "legal": [license_file.read_text(encoding="utf-8")]}


def is_prose(paragraph: str) -> bool:
    """Running text: no code (an interpreter prompt, a grammar rule, a block indented past a note's
    three spaces), no heading underline, mostly letters."""
    if re.search(r">>>|::=|^ {4,}\S|^[*=\-]{3,}$", paragraph, re.M):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return letters / len(paragraph) > 0.85 and len(paragraph.split()) >= 12


def sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences, lines joined; a split after an abbreviation is undone."""
    flat = " ".join(paragraph.split())
    out: list[str] = []
    for piece in SENTENCE_END.split(flat):
        if out and ABBREVIATION.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def usable(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and sentence.endswith(".")


def prose_paragraphs(texts: list[str]) -> list[list[str]]:
    """Each prose paragraph as its sentence list, duplicates (the LICENSE repeats clauses) kept once."""
    seen, out = set(), []
    for text in texts:
        for para in paragraphs(text):
            key = " ".join(para.split())
            if is_prose(para) and key not in seen:
                seen.add(key)
                out.append(sentences(para))
    return out


def next_sentence_items(paras: list[list[str]], rng: random.Random) -> list[dict]:
    pool = [(i, s) for i, para in enumerate(paras) for s in para if usable(s)]
    items = []
    for i, para in enumerate(paras):
        for k in range(1, len(para)):
            if not usable(para[k]):
                continue
            others = sorted({s for j, s in pool if j != i and s != para[k]})
            if len(others) < N_CHOICES - 1:
                continue
            choices = rng.sample(others, N_CHOICES - 1) + [para[k]]
            rng.shuffle(choices)
            context = " ".join(para[max(0, k - CONTEXT_SENTENCES) : k])
            items.append({"context": context, "choices": choices, "label": choices.index(para[k])})
    return items


def last_word_items(paras: list[list[str]]) -> list[dict]:
    items = []
    for para in paras:
        for k, sentence in enumerate(para):
            if not usable(sentence):
                continue
            head, _, last = sentence[:-1].rpartition(" ")
            if not (last.isalpha() and len(last) >= 3):
                continue  # a number, a quoted name or a fragment: not a word to predict
            context = " ".join(para[max(0, k - CONTEXT_SENTENCES) : k] + [head])
            items.append({"context": context, "target": last})
    return items


def paragraph_items(paras: list[list[str]]) -> list[dict]:
    return [{"text": " ".join(para)} for para in paras]


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, texts in source_texts().items():
        rng = random.Random(f"{SEED}-{name}")
        paras = prose_paragraphs(texts)
        files = {
            "nextsent": next_sentence_items(paras, rng),
            "lastword": last_word_items(paras),
            "paragraphs": paragraph_items(paras),
        }
        for kind, items in files.items():
            write_jsonl(OUT_DIR / f"{name}_{kind}.jsonl", items)
            print(f"{name}_{kind}.jsonl: {len(items)} items")


if __name__ == "__main__":
    main()
