"""Concurrent calls on one loaded model get correct, separate traces."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gateskip_core.data import pydoc_texts


def test_eight_threads_match_serial_runs(tiny):
    texts = [t[:300] for t in pydoc_texts("validation")[:8]]
    jobs = [
        dict(
            text_or_texts=texts[i],
            skip=0.1 + 0.08 * i,  # eight different budgets, none of them zero
            policy=["quantile", "random", "calibrated"][i % 3],
            path=["masked", "physical"][i % 2],
        )
        for i in range(8)
    ]
    tiny.calibrate(tiny.make_plan(0.3).budget)  # warm the memo path too
    serial = [tiny.trace(**job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda job: tiny.trace(**job), jobs * 2))
    for i, trace in enumerate(parallel):
        ref = serial[i % 8]
        assert trace.policy == ref.policy
        for a, b in zip(trace.sequences, ref.sequences):
            np.testing.assert_array_equal(a.token_ids, b.token_ids)
            np.testing.assert_array_equal(a.skipped, b.skipped)
            assert a.skipped.any()  # every job skips something, so that a mix-up would show
            np.testing.assert_allclose(a.gate, b.gate, atol=1e-6)
