"""Dashboard response times: estimate mode (no model call) and exact mode (model re-run).

    python gateskip/bench/dashboard_latency.py [--tokens 128] [--gates default] [--out docs/results/dashboard_latency.json]

Times the library calls the dashboard makes when a slider moves, then a whole
app rerun (Streamlit script, figures included) through AppTest, as a browser
session would trigger it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import dashboard
from analysis.traces import figures
from dashboard import service
from gateskip.bench.clock import clock
from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.cli import add_device_dtype_args
from gateskip_core.data import pydoc_texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--gates", default="default")
    add_device_dtype_args(parser)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the medians as JSON (the figures the docs quote)")
    args = parser.parse_args()
    hub = service.ModelHub(args.device, args.dtype)
    view = hub.view(args.model, args.gates)
    ids = view.tokenizer(" ".join(pydoc_texts("validation")), add_special_tokens=False).input_ids
    text = view.tokenizer.decode(ids[: args.tokens - 1])  # + BOS = the requested length
    captured, _ = service.capture(view, text, chat=False)
    n = captured.sequences[0].n_tokens
    budgets = [0.1, 0.2, 0.3, 0.4, 0.5]
    est, exact, attribution = [], [], []
    for i in range(args.repeats):
        settings = service.Settings(
            model_name=args.model,
            view=view,
            mode="estimate",
            budget=budgets[i % len(budgets)],
            branches="both",
            policy="quantile",
            protect_bos=True,
            seed=0,
            allocation="auto",
        )
        start = clock()
        service.estimate(view, captured, settings)
        est.append(clock() - start)
        start = clock()
        service.exact(view, text, False, settings)
        exact.append(clock() - start)
        start = clock()  # choosing a cell: one attributed run of its (layer, branch) + the bar chart
        result = service.attribution(view, text, False, settings, view.spec.n_layers // 2 + i % 3, "mlp")
        figures.attribution_figure(result.cell(n // 2))
        attribution.append(clock() - start)
    print(f"{args.model}, {view.gates_label}, prompt of {n} tokens")
    print(f"estimate mode (slider, no model call): median {statistics.median(est) * 1000:.0f} ms")
    print(f"exact mode (model re-run + quality vs ungated): median {statistics.median(exact):.2f} s")
    print(f"gate attribution of one cell (run + bar chart): median {statistics.median(attribution):.2f} s")
    reruns = app_rerun(args.model, text, args.repeats, args.device, args.dtype)
    if args.out:
        medians = {
            "model": args.model,
            "gates": view.gates_label,
            "tokens": n,
            "repeats": args.repeats,
            "estimate_s": statistics.median(est),
            "exact_s": statistics.median(exact),
            "attribution_s": statistics.median(attribution),
            "app_rerun_estimate_s": reruns["estimate"],
            "app_rerun_exact_s": reruns["exact"],
            "date": time.strftime("%Y-%m-%d"),
        }
        Path(args.out).write_text(json.dumps(medians, indent=1) + "\n")


def app_rerun(model: str, text: str, repeats: int, device: str = "cpu", dtype: str = "float32") -> dict[str, float]:
    """The whole app's rerun after a slider move, median seconds per mode."""
    import os

    from streamlit.testing.v1 import AppTest

    os.environ["GATESKIP_DASHBOARD_MODEL"] = model
    os.environ["GATESKIP_DASHBOARD_DEVICE"], os.environ["GATESKIP_DASHBOARD_DTYPE"] = device, dtype
    at = AppTest.from_file(str(Path(dashboard.__file__).parent / "app.py"), default_timeout=300)
    at.run()
    at.text_area[0].set_value(text).run()
    times = {}
    for mode in ("estimate", "exact"):
        at.sidebar.radio(key="mode").set_value(mode).run()
        samples = []
        for i in range(repeats):
            start = clock()
            at.sidebar.slider(key="global_budget").set_value([0.1, 0.2, 0.3, 0.4, 0.5][i % 5]).run()
            samples.append(clock() - start)
        times[mode] = statistics.median(samples)
    print(f"whole app rerun after a slider move: estimate {times['estimate']:.2f} s, exact {times['exact']:.2f} s")
    return times


if __name__ == "__main__":
    main()
