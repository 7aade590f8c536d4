"""Trace datasets (shards + manifest), resumable and sharded collection, and DuckDB queries over them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.experiments.collect import collect_dataset
from analysis.traces.dataset import MANIFEST, iter_traces, open_dataset, shard_name
from analysis.traces.flow import token_type
from analysis.traces.tracedb import TraceDB, context_strings, wilson
from gateskip_core import GateSkipError, read_trace
from gateskip_core.data import paragraphs, pydoc_texts

from .conftest import accelerate_launch, run_cli

SKIP = 0.3


@pytest.fixture(scope="module")
def paras() -> list[str]:
    return [p for t in pydoc_texts("validation")[:8] for p in paragraphs(t)][:120]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, paras):
    from gateskip_core import load_model

    from .conftest import spread_gates

    folder = tmp_path_factory.mktemp("ds") / "traces"
    model = spread_gates(load_model("tiny-llama"))
    counts = collect_dataset(
        model, [("pydoc", paras)], folder, batch_size=4, max_tokens=48, shard_size=32, show_progress=False, skip=SKIP
    )
    return folder, counts, model


def _rows(folder: Path) -> pd.DataFrame:
    """Every shard's rows, in shard order (a dataset's content, for comparisons)."""
    return pd.concat([pd.read_parquet(p) for p in open_dataset(folder).shard_paths], ignore_index=True)


def test_a_dataset_is_shards_plus_a_manifest_and_each_shard_is_a_trace_file(dataset, paras):
    folder, counts, model = dataset
    ds = open_dataset(folder)
    assert counts["shards"] == 4 and [p.name for p in ds.shard_paths] == [shard_name(k) for k in range(4)]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["complete"] and manifest["settings"]["model"] == "tiny-llama"
    assert manifest["settings"]["skip"]["skip"] == SKIP and manifest["sources"][0]["paragraphs"] == len(paras)
    assert manifest["tokens"] == counts["tokens"] == sum(s.n_tokens for t in iter_traces(folder) for s in t.sequences)
    second = read_trace(ds.shard_paths[1])  # a shard reads back as a trace; sequence ids run on
    first_ids = _rows(folder)["sequence_id"].unique()
    np.testing.assert_array_equal(first_ids, np.arange(len(paras)))
    direct = model.trace(paras[32:64], batch_size=4, max_tokens=48, skip=SKIP)
    for ours, theirs in zip(second.sequences, direct.sequences, strict=True):
        np.testing.assert_array_equal(ours.token_ids, theirs.token_ids)
        np.testing.assert_allclose(ours.gate, theirs.gate, atol=1e-5)


def test_one_engine_gives_the_same_stats_from_a_dataset_a_csv_file_and_traces_in_memory(dataset, tmp_path):
    folder, _, _ = dataset
    in_memory = TraceDB(list(iter_traces(folder)))
    single = tmp_path / "one.csv"  # the same rows as one CSV file
    _rows(folder).to_csv(single, index=False)
    for source in (folder, single):
        db = TraceDB(source)
        assert db.counts() == in_memory.counts()
        pd.testing.assert_frame_equal(db.layer_table(), in_memory.layer_table(), check_dtype=False)
        pd.testing.assert_frame_equal(db.bos_table(), in_memory.bos_table(), check_dtype=False)
        pd.testing.assert_frame_equal(db.token_type_table(), in_memory.token_type_table(), check_dtype=False)
        ours = db.token_table(min_count=3).sort_values("token_id", ignore_index=True)
        theirs = in_memory.token_table(min_count=3).sort_values("token_id", ignore_index=True)
        pd.testing.assert_frame_equal(ours, theirs, check_dtype=False)


def test_ready_made_queries_match_pandas_on_the_same_rows(dataset):
    folder, _, _ = dataset
    rows = _rows(folder)
    db = TraceDB(folder)
    rates = db.skip_rates()
    expected = rows.assign(hit=rows["skipped"] * rows["eligible"]).groupby(["layer", "branch"])
    np.testing.assert_array_equal(rates["skipped"], expected["hit"].sum().to_numpy())
    np.testing.assert_array_equal(rates["eligible"], expected["eligible"].sum().to_numpy())
    assert (rates["ci_low"] <= rates["skip_rate"]).all() and (rates["skip_rate"] <= rates["ci_high"]).all()

    cell = rows[(rows["layer"] == 2) & (rows["branch"] == "mlp") & (rows["eligible"] == 1)]
    by_token = cell.groupby("token")["skipped"].agg(["sum", "count"])
    by_token = by_token[by_token["count"] >= 5]
    board = db.token_leaderboard(2, "mlp", min_count=5, limit=1000)
    assert len(board) == len(by_token)
    for r in board.itertuples():
        assert (r.skipped, r.eligible) == tuple(by_token.loc[r.token])
    assert board["skip_rate"].is_monotonic_decreasing
    assert db.token_leaderboard(2, "mlp", min_count=5, limit=1000, most_skipped=False)[
        "skip_rate"
    ].is_monotonic_increasing
    only = db.token_leaderboard(2, "mlp", min_count=1, token_types=["punctuation"], limit=1000)
    assert len(only) and all(token_type(t, 1) == "punctuation" for t in only["token"])

    positions = db.position_profile()
    assert positions["eligible"].sum() == rows["eligible"].sum()
    assert positions.loc[positions["positions"] == "0", "eligible"].sum() == 0  # BOS is protected
    types = db.type_profile()
    assert types["eligible"].sum() == rows["eligible"].sum()

    contexts = db.example_contexts(2, "mlp", n=4, lowest=True, window=3, cells="all")  # every eligible token
    centres = contexts[contexts["offset"] == 0]
    # the four lowest gates at (2, mlp) of distinct contexts: every lower occurrence repeats a shown context
    assert centres["gate"].iloc[0] == cell["gate"].min() and centres["gate"].is_monotonic_increasing
    assert (cell["gate"] <= centres["gate"].iloc[-1]).sum() <= centres["duplicates"].sum()
    for r in contexts.itertuples():
        row = rows[(rows["sequence_id"] == r.sequence_id) & (rows["position"] == r.position)]
        assert r.token == row["token"].iloc[0] and r.skipped_cells == row["skipped"].sum()
        assert r.gate == row[(row["layer"] == 2) & (row["branch"] == "mlp")]["gate"].iloc[0]
        assert abs(r.offset) <= 3
    highest = db.example_contexts(2, "mlp", n=2, lowest=False, cells="all")
    assert highest[highest["offset"] == 0]["gate"].iloc[0] == cell["gate"].max()
    texts = context_strings(contexts)
    assert len(texts) == 4 and all(f"[{t}]" in c for t, c in zip(texts["token"], texts["context"]))

    sql = db.sql("SELECT token_type, count(*) AS n FROM tokens GROUP BY ALL").df()
    assert sql["n"].sum() == rows[(rows["layer"] == 0) & (rows["branch"] == "attn")].shape[0]
    with pytest.raises(GateSkipError, match="query failed"):
        db.sql("SELECT nonsense FROM traces")


def test_wilson_interval_known_values():
    low, high = wilson([0, 5, 10], [10, 10, 10])
    assert low[0] == 0 and high[0] == pytest.approx(0.2775, abs=1e-4)  # textbook values
    assert low[1] == pytest.approx(0.2366, abs=1e-4) and high[1] == pytest.approx(0.7634, abs=1e-4)
    assert np.isnan(wilson([0], [0])[0][0])


def _collect_cmd(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "collect",
        "--model",
        "tiny-llama",
        "--gates",
        "untrained:lowrank:4",
        "--file",
        str(corpus),
        "--out",
        str(out),
        "--skip",
        str(SKIP),
        "--max-tokens",
        "24",
        "--shard-size",
        "6",
        "--batch-size",
        "3",
        *extra,
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, paras) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("straight") / "ds"
    done = run_cli(*_collect_cmd(out, corpus))
    assert done.returncode == 0, done.stderr
    return out


def test_a_collect_killed_mid_run_resumes_to_the_uninterrupted_dataset(straight, corpus, tmp_path):
    killed = tmp_path / "ds"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateskip", *_collect_cmd(killed, corpus)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("shard-*.parquet"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    present = len(list(killed.glob("shard-*.parquet")))
    assert 3 <= present < 20, "the collection was not killed mid-run"
    with pytest.raises(GateSkipError, match="incomplete"):
        open_dataset(killed)
    done = run_cli(*_collect_cmd(killed, corpus))
    assert done.returncode == 0, done.stderr
    assert f"wrote {20 - present} shard(s)" in done.stdout  # only the missing ones
    pd.testing.assert_frame_equal(_rows(killed), _rows(straight))
    assert json.loads((killed / MANIFEST).read_text()) == json.loads((straight / MANIFEST).read_text())
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_other_settings_foreign_and_damaged_shards_are_refused_with_one_line(straight, corpus, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(straight, ds)
    before = _rows(ds)
    done = run_cli(*_collect_cmd(ds, corpus)[:-6], "--skip", "0.5", "--max-tokens", "24", "--shard-size", "6")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "other settings" in lines[0] and "0.5" in lines[0], done.stderr
    pd.testing.assert_frame_equal(_rows(ds), before)  # nothing touched

    other = tmp_path / "other"
    assert run_cli(*_collect_cmd(other, corpus, "--policy", "random")).returncode == 0
    shutil.copy(other / shard_name(3), ds / shard_name(3))  # a shard of another setting slipped in
    done = run_cli("query", str(ds), "SELECT count(*) FROM traces")
    assert done.returncode == 2 and "shard-000003.parquet" in done.stderr and "other settings" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    shutil.copy(straight / shard_name(3), ds / shard_name(3))
    data = (ds / shard_name(5)).read_bytes()
    (ds / shard_name(5)).write_bytes(data[: len(data) // 2])
    done = run_cli("stats", "--trace", str(ds), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 2 and "damaged shard" in done.stderr and shard_name(5) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = run_cli(*_collect_cmd(ds, corpus))  # collect repairs it
    assert done.returncode == 0 and "damaged; collecting it again" in done.stdout, done.stderr
    pd.testing.assert_frame_equal(_rows(ds), before)


def test_a_second_source_is_appended_with_sequence_ids_running_on(straight, corpus, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(straight, ds)
    extra = tmp_path / "extra.txt"
    extra.write_text("First new paragraph here.\n\nAnd a second one, a little longer than that.")
    done = run_cli(*_collect_cmd(ds, corpus)[:6], str(corpus), str(extra), *_collect_cmd(ds, corpus)[7:])
    assert done.returncode == 0, done.stderr
    manifest = json.loads((ds / MANIFEST).read_text())
    assert [s["file"] for s in manifest["sources"]] == ["corpus.txt", "extra.txt"]
    rows = _rows(ds)
    n = manifest["sources"][0]["paragraphs"]
    assert sorted(rows["sequence_id"].unique()) == list(range(n + 2))
    assert "".join(rows[(rows["sequence_id"] == n + 1) & (rows["layer"] == 0) & (rows["branch"] == "attn")]["token"])
    pd.testing.assert_frame_equal(rows[rows["sequence_id"] < n].reset_index(drop=True), _rows(straight))


def test_two_gloo_processes_under_accelerate_launch_collect_the_one_process_dataset(straight, corpus, tmp_path):
    out = tmp_path / "ds"
    cmd = [*accelerate_launch(2), *_collect_cmd(out, corpus)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "in 2 process(es)" in done.stdout and "wrote 20 shard(s)" in done.stdout
    assert "collect [2/2]" in done.stderr  # the second process did collect
    pd.testing.assert_frame_equal(_rows(out), _rows(straight))
    assert json.loads((out / MANIFEST).read_text()) == json.loads((straight / MANIFEST).read_text())


def test_query_cli_writes_sql_and_ready_made_results(straight, tmp_path):
    out = tmp_path / "q.parquet"
    done = run_cli(
        "query", str(straight), "SELECT layer, avg(skipped) AS rate FROM traces GROUP BY layer", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert len(pd.read_parquet(out)) == 4 and "rate" in done.stdout
    csv = tmp_path / "t.csv"
    done = run_cli(
        "query",
        str(straight),
        "--ready",
        "tokens",
        "--layer",
        "1",
        "--branch",
        "attn",
        "--min-count",
        "2",
        "--out",
        str(csv),
    )
    assert done.returncode == 0, done.stderr
    assert {"token", "skip_rate", "ci_low", "ci_high"} <= set(pd.read_csv(csv, keep_default_na=False).columns)
    done = run_cli("query", str(straight), "--ready", "contexts", "--layer", "1", "--branch", "mlp", "--limit", "2")
    assert done.returncode == 0 and "[" in done.stdout, done.stderr
    for argv, message in [
        (["query", str(straight), "SELECT nope FROM traces"], "query failed"),
        (["query", str(straight)], "give either SQL or --ready"),
        (["query", str(straight), "--ready", "contexts"], "needs --layer and --branch"),
        (["query", str(tmp_path / "none"), "SELECT 1"], "dataset folder not found"),
        (
            ["query", str(straight), "--ready", "tokens", "--layer", "1", "--branch", "attn", "--token-types", "x"],
            "unknown token type 'x'",
        ),
    ]:
        done = run_cli(*argv)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (argv, done.stderr)


def test_bad_dataset_outputs_are_refused_before_loading_with_one_line(corpus, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a dataset")
    cluttered = tmp_path / "cluttered"
    cluttered.mkdir()
    (cluttered / "notes.txt").write_text("mine")
    for out, message in [
        (tmp_path / "no" / "ds", "does not exist"),
        (Path("/sys/ds"), "cannot write"),
        (a_file, "is a file, not a dataset folder"),
        (cluttered, "holds files but no dataset"),
    ]:
        done = run_cli(*_collect_cmd(out, corpus))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (out, done.stderr)
    assert a_file.read_text() == "not a dataset" and [p.name for p in cluttered.iterdir()] == ["notes.txt"]
