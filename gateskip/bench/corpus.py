"""Corpus scale: collection throughput with 1 and 2 processes, DuckDB query latency and memory.

    python -m gateskip.bench.corpus DATASET      # one JSON line: each ready-made query's seconds and peak RSS

`gateskip bench --sections corpus` collects a real dataset (`gateskip collect`, then the same under
`accelerate launch --num_processes 2`), synthesises larger datasets from it by repeating its shards
(sequence ids offset, so every sequence stays distinct; the README says so), and times the
ready-made queries on each in a fresh process, so that its peak RSS is the query's alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.traces.dataset import STAMP, Manifest, open_dataset, shard_name, shard_stamp

from .clock import clock
from .memory import PeakRSS


def synthesise(source: str | Path, out: str | Path, n_tokens: int) -> Path:
    """A dataset of at least `n_tokens` tokens made of copies of `source`'s shards, sequence ids offset."""
    src = open_dataset(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    manifest = Manifest(settings=src.manifest.settings, sources=[])
    shards, tokens, copy = [], 0, 0
    while tokens < n_tokens:
        offset = copy * src.n_sequences
        for path, entry in zip(src.shard_paths, src.manifest.shards):
            table = pq.read_table(path)
            column = table.column("sequence_id")
            table = table.set_column(table.schema.get_field_index("sequence_id"), "sequence_id", pc.add(column, offset))
            stamp = {**json.loads(table.schema.metadata[STAMP]), "shard": len(shards)}
            table = table.replace_schema_metadata({**table.schema.metadata, STAMP: json.dumps(stamp).encode()})
            name = shard_name(len(shards))
            pq.write_table(table, out / name, compression="zstd", row_group_size=131_072)
            shards.append(
                {
                    "name": name,
                    "sequences": entry["sequences"],
                    "tokens": entry["tokens"],
                    "rows": shard_stamp(out / name)["rows"],
                }
            )
            tokens += entry["tokens"]
        for s in src.manifest.sources:
            manifest.sources.append(
                type(s)(
                    file=f"{s.file} (copy {copy})",
                    sha256=f"{s.sha256}-{copy}",
                    paragraphs=s.paragraphs,
                    first_sequence=s.first_sequence + offset,
                    first_shard=s.first_shard + copy * src.manifest.n_shards,
                    shards=s.shards,
                )
            )
        copy += 1
    manifest.shards, manifest.tokens, manifest.complete = shards, tokens, True
    manifest.write(out)
    return out


QUERIES = ("open", "skip_rates", "layer_table", "tokens", "positions", "types", "contexts")


def query_latencies(dataset: str | Path) -> list[dict]:
    """Seconds and peak RSS of opening the views and of each ready-made query (this process)."""
    from analysis.traces.tracedb import TraceDB

    rows = []
    with PeakRSS() as mem:
        start = clock()
        db = TraceDB(dataset)
        counts = db.counts()
        seconds = clock() - start
    rows.append({"query": "open", "seconds": seconds, "peak_rss_mb": mem.peak / 2**20})
    last = counts["layers"] - 1
    calls = {
        "skip_rates": db.skip_rates,
        "layer_table": db.layer_table,
        "tokens": lambda: db.token_leaderboard(last, "mlp", min_count=20),
        "positions": db.position_profile,
        "types": db.type_profile,
        "contexts": lambda: db.example_contexts(last, "mlp", n=10),
    }
    for name, call in calls.items():
        with PeakRSS() as mem:
            start = clock()
            call()
            seconds = clock() - start
        rows.append({"query": name, "seconds": seconds, "peak_rss_mb": mem.peak / 2**20})
    db.close()
    # The running app has its modules loaded before a view renders (dashboard.service imports torch,
    # the figures Plotly: ~2.4 s here), so the first render is timed without their imports.
    from analysis.traces import figures  # noqa: F401
    from dashboard import service  # noqa: F401

    with PeakRSS() as mem:  # what the dashboard's Corpus view computes on its first render, on a new connection
        start = clock()
        corpus_view_first_render(dataset)
        seconds = clock() - start
    rows.append({"query": "dashboard_first_render", "seconds": seconds, "peak_rss_mb": mem.peak / 2**20})
    for row in rows:
        row.update(tokens=counts["tokens"], trace_rows=counts["tokens"] * counts["layers"] * 2)
    return rows


def corpus_view_first_render(dataset: str | Path) -> None:
    """The library calls and figures of the Corpus view's first render (`dashboard.views.corpus.corpus_view`)."""
    from analysis.traces import figures
    from analysis.traces.flow import TOKEN_TYPES
    from dashboard import service

    path = Path(dataset)
    db = service.DataDir(path.parent).open(path.name)
    counts = db.counts()
    figures.corpus_skip_heatmap(db.skip_rates()).to_json()
    last = counts["layers"] - 1
    db.token_leaderboard(last, "mlp", 20, list(TOKEN_TYPES), 25)
    figures.context_html(db.example_contexts(last, "mlp", n=8, lowest=True))
    db.position_profile()
    db.type_profile()
    db.close()


def query_latencies_in_fresh_process(dataset: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "gateskip.bench.corpus", str(dataset)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"query bench failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def collect_seconds(corpus: Path, out: Path, cfg, processes: int) -> float:
    """Wall seconds of `gateskip collect` into a dataset (model loading included), 1 or N processes, with
    the bench's model, gates, device and dtype (`cfg`: the suite's `BenchConfig`). Several processes on
    the CPU are told to see no GPU; on a GPU each process uses the device `accelerate` gives it."""
    args = [
        "-m",
        "gateskip",
        "collect",
        "--model",
        cfg.model,
        "--gates",
        cfg.gates,
        "--device",
        cfg.device,
        "--dtype",
        cfg.dtype,
        "--file",
        str(corpus),
        "--out",
        str(out),
        "--skip",
        "0.25",
        "--max-tokens",
        "128",
        "--shard-size",
        "32",
    ]
    if processes == 1:
        cmd, env = [sys.executable, *args], dict(os.environ)
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *args,
        ]
        threads = max(1, (os.cpu_count() or 2) // processes)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if cfg.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
    start = clock()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = clock() - start
    if done.returncode != 0:
        raise RuntimeError(f"collect with {processes} process(es) failed: {done.stderr.strip()[-500:]}")
    return seconds


if __name__ == "__main__":
    print(json.dumps(query_latencies(sys.argv[1])))
