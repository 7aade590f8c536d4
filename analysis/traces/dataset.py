"""Trace files and datasets on disk, read back: a dataset is a folder of Parquet shards plus a manifest.

Layout of a dataset folder (written by `analysis.experiments.collect.collect_dataset`):

    manifest.json          what the traces are (model, gates and their fingerprint, skip settings,
                           max tokens, batch and shard size), where they come from (each source file's
                           name, sha256, paragraph count, first sequence id and shard range) and, once
                           complete, the shard list and token count
    shard-000000.parquet   the traces of paragraphs [k*S, (k+1)*S) of one source: a trace file of its
    shard-000001.parquet   own (`read_trace` reads it), sequence ids global to the dataset

Every reader opens a dataset through `open_dataset`, which refuses an incomplete one, a shard its
manifest does not list, a damaged shard and a shard whose stamped settings differ from the manifest's.
`iter_traces` reads a trace file or a dataset back a bounded chunk at a time, in complete sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from gateskip_core import GateSkipError, Trace
from gateskip_core.files import atomic_write
from gateskip_core.traces.trace import read_trace_frames

FORMAT = "gateskip-trace-dataset/1"
MANIFEST = "manifest.json"
STAMP = b"gateskip.dataset"  # Parquet key-value metadata of every shard


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def is_dataset_path(path: str | Path) -> bool:
    """A folder (existing, or named without a .csv/.parquet suffix) is a dataset; a file is a trace file."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() not in (".csv", ".parquet", ".pq")


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Source:
    file: str
    sha256: str
    paragraphs: int
    first_sequence: int
    first_shard: int
    shards: int


@dataclass
class Manifest:
    settings: dict
    sources: list[Source]
    complete: bool = False
    shards: list[dict] = dataclasses.field(default_factory=list)  # once complete: name, sequences, tokens, rows
    tokens: int = 0

    @property
    def digest(self) -> str:
        return settings_digest(self.settings)

    @property
    def n_shards(self) -> int:
        return sum(s.shards for s in self.sources)

    @property
    def n_sequences(self) -> int:
        return sum(s.paragraphs for s in self.sources)

    def to_json(self) -> str:
        body = {"format": FORMAT, **dataclasses.asdict(self)}
        return json.dumps(body, indent=1, sort_keys=False)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise GateSkipError(f"{folder} is not a trace dataset (no {MANIFEST}); collect one with `gateskip collect`")
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            if body.get("format") != FORMAT:
                raise GateSkipError(f"{path}: not a GateSkip dataset manifest (format {body.get('format')!r})")
            return cls(
                settings=body["settings"],
                sources=[Source(**s) for s in body["sources"]],
                complete=bool(body["complete"]),
                shards=list(body.get("shards", [])),
                tokens=int(body.get("tokens", 0)),
            )
        except GateSkipError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise GateSkipError(f"damaged dataset manifest {path}: {err}") from None

    def write(self, folder: Path) -> None:
        atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(self.to_json(), encoding="utf-8"))


def shard_stamp(path: Path) -> dict | None:
    """The stamp a shard was written with, or None if the file is not a readable Parquet file."""
    try:
        meta = pq.read_metadata(path)
    except Exception:  # pyarrow raises several types for damaged files
        return None
    raw = (meta.metadata or {}).get(STAMP)
    try:
        return {**json.loads(raw), "rows": meta.num_rows} if raw else {"rows": meta.num_rows}
    except ValueError:
        return None


@dataclass
class Dataset:
    """A complete trace dataset, checked: every shard present, readable and of the manifest's settings."""

    folder: Path
    manifest: Manifest

    @property
    def shard_paths(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.manifest.shards]

    @property
    def n_tokens(self) -> int:
        return self.manifest.tokens

    @property
    def n_sequences(self) -> int:
        return self.manifest.n_sequences


def open_dataset(folder: str | Path) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise GateSkipError(f"dataset folder not found: {folder}")
    manifest = Manifest.read(folder)
    if not manifest.complete:
        raise GateSkipError(
            f"dataset {folder} is incomplete ({_count_present(folder, manifest)} of {manifest.n_shards} shards);"
            " rerun the same `gateskip collect` to finish it"
        )
    expected = {s["name"] for s in manifest.shards}
    strays = sorted(p.name for p in folder.glob("shard-*.parquet") if p.name not in expected)
    if strays:
        raise GateSkipError(f"dataset {folder} holds shards its manifest does not list: {', '.join(strays[:3])}")
    for entry in manifest.shards:
        stamp = shard_stamp(folder / entry["name"])
        if stamp is None:
            raise GateSkipError(f"damaged shard in dataset {folder}: {entry['name']} (not a readable Parquet file)")
        if stamp.get("settings") != manifest.digest:
            raise GateSkipError(
                f"shard {entry['name']} in {folder} was collected with other settings than the dataset's manifest"
            )
        if stamp["rows"] != entry["rows"]:
            raise GateSkipError(
                f"damaged shard in dataset {folder}: {entry['name']} has {stamp['rows']} rows, "
                f"the manifest says {entry['rows']}"
            )
    return Dataset(folder, manifest)


def _count_present(folder: Path, manifest: Manifest) -> int:
    return sum((folder / shard_name(k)).is_file() for k in range(manifest.n_shards))


def iter_traces(path: str | Path, chunk_rows: int = 200_000) -> Iterator[Trace]:
    """Yield Traces of complete sequences from a trace file or a dataset folder, a bounded chunk at a time."""
    if is_dataset_path(path):
        for shard in open_dataset(path).shard_paths:  # a sequence never spans two shards
            yield from iter_traces(shard, chunk_rows)
        return
    carry = None
    any_rows = False
    for chunk in read_trace_frames(path, chunk_rows):
        if chunk.empty:
            continue
        any_rows = True
        if carry is not None:
            chunk = pd.concat([carry, chunk], ignore_index=True)
        last = chunk["sequence_id"].iloc[-1]
        carry = chunk[chunk["sequence_id"] == last]  # may continue in the next chunk
        complete = chunk[chunk["sequence_id"] != last]
        if len(complete):
            yield Trace.from_dataframe(complete)
    if carry is not None and len(carry):
        yield Trace.from_dataframe(carry)
    if not any_rows:
        raise GateSkipError(f"trace file {path} holds no rows")
