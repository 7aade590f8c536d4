"""Real text that ships with Python: the pydoc topics (~113k tokens of English prose); and the
one reader of a user's text file (`read_text_file`, `paragraphs_of`).

Topics are split deterministically (by a hash of the topic name) into train,
validation and calibration sets, so no text is used for two purposes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch

from gateskip_core.errors import GateSkipError

Split = Literal["train", "validation", "calibration"]


def _bucket(topic: str) -> int:
    return int(hashlib.sha256(topic.encode()).hexdigest(), 16) % 10


def pydoc_texts(split: Split | None = None) -> list[str]:
    """Topic texts (sorted by topic name); `validation` = bucket 0, `calibration` = 1, `train` = the rest."""
    from pydoc_data.topics import topics

    wanted = {"validation": {0}, "calibration": {1}, "train": set(range(2, 10)), None: set(range(10))}[split]
    return [topics[name].strip() for name in sorted(topics) if _bucket(name) in wanted and topics[name].strip()]


def paragraphs(text: str) -> list[str]:
    """Non-empty blank-line separated paragraphs."""
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents; a missing, unreadable or undecodable file is one line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateSkipError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GateSkipError(f"cannot read {path}: {err}") from None


def paragraphs_of(path: str | Path) -> list[str]:
    """The paragraphs of a UTF-8 text file; a missing, unreadable or empty file is one line."""
    paras = paragraphs(read_text_file(path))
    if not paras:
        raise GateSkipError(f"{path} holds no text")
    return paras


def token_blocks(tokenizer, texts: Iterable[str], seq_len: int, bos: bool = True) -> Iterator[torch.Tensor]:
    """Concatenate texts (separated by EOS) into blocks of `seq_len` token ids, each starting with BOS."""
    body = seq_len - 1 if bos and tokenizer.bos_token_id is not None else seq_len
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False).input_ids)
        buffer.append(tokenizer.eos_token_id)
        while len(buffer) >= body:
            block, buffer = buffer[:body], buffer[body:]
            if body < seq_len:
                block = [tokenizer.bos_token_id] + block
            yield torch.tensor(block, dtype=torch.long, device="cpu")  # host data: moved where it runs


def first_blocks(tokenizer, texts: Iterable[str], seq_len: int, n_blocks: int) -> torch.Tensor:
    """The first `n_blocks` blocks of `token_blocks` as one [n, seq_len] tensor (fewer if the text is short)."""
    blocks = []
    for block in token_blocks(tokenizer, texts, seq_len):
        blocks.append(block)
        if len(blocks) == n_blocks:
            break
    if not blocks:
        from gateskip_core.errors import GateSkipError

        raise GateSkipError(f"the text is shorter than one block of {seq_len} tokens")
    return torch.stack(blocks)
