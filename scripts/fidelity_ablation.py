"""Quality of gate sets on held-out pydoc and legal text: budget 0, and matched net FLOPs saved
against ShortGPT (block influence on the evaluated text and on calibration text).

    python scripts/fidelity_ablation.py --out docs/results/fidelity_ablation.csv \\
        LABEL=GATES[@SCOPE] [LABEL=GATES[@SCOPE] ...]

GATES is anything `--gates` takes; SCOPE the adapter scope (all | skipped; default: the gates'
own). Writes one row per (text, label, budget) and a matched-savings table next to it
(`*_matched.csv`): quality at 10 / 20 / 30% net FLOPs saved, interpolated along each curve.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

import pandas as pd
import torch

from analysis.experiments.quality import evaluate, evaluation_blocks, reference
from analysis.experiments.sweep import at_matched_savings, sweep
from gateskip_core import load_model
from gateskip_core.data import pydoc_texts

BUDGETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def texts() -> dict[str, list[str]]:
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"  # legal text: in no training data
    return {"pydoc": pydoc_texts("validation"), "legal": [license_file.read_text()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="LABEL=GATES[@SCOPE]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    model = load_model(args.model)
    rows = []
    for text_name, text in texts().items():
        blocks = evaluation_blocks(model, text, n_blocks=args.blocks)
        ref = reference(model, blocks)
        baselines_done = False
        for config in args.configs:
            label, _, rest = config.partition("=")
            gates, _, scope = rest.partition("@")
            model.load_gates(gates)
            scope = scope or "auto"
            for budget in budgets:
                t0 = time.perf_counter()
                result = evaluate(model, ref, model.make_plan(budget, "quantile", adapter_scope=scope))
                rows.append({"text": text_name, "method": label, "skip_budget": budget, **result})
                print(
                    f"{text_name} {label} b={budget:g}: ppl {result['ppl']:.2f} KL {result['kl_to_full']:.3f} "
                    f"top-1 {result['top1_agreement']:.3f} saved {result['flops_saved']:.3f} "
                    f"({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                )
            if not baselines_done:  # ShortGPT does not depend on the gates: once per text
                table = sweep(model, budgets, ("shortgpt", "shortgpt-calibration"), blocks)
                for row in table.to_dict("records"):
                    rows.append({"text": text_name, **{k: v for k, v in row.items() if k != "setting"}})
                baselines_done = True
    df = pd.DataFrame(rows)
    out = Path(args.out)
    df.to_csv(out, index=False)
    matched = pd.concat([at_matched_savings(part).assign(text=name) for name, part in df.groupby("text", sort=False)])
    matched.to_csv(out.with_name(out.stem + "_matched.csv"), index=False)
    original = {
        name: float(df[(df.text == name) & (df.method == "shortgpt") & (df.skip_budget == 0)].ppl.iloc[0])
        for name in df.text.unique()
    }
    print(f"original model perplexity: {original}")
    print(matched.to_string())


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    main()
