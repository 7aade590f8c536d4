"""The paper's interpretive findings checked causally, in both adapter scopes, on held-out prose.

    OMP_NUM_THREADS=1 python3 scripts/findings.py --update-docs         # SmolLM2, shipped default (~30 min)
    OMP_NUM_THREADS=1 python3 scripts/findings.py --model gemma3-270m --texts 12 --harm-texts 3 --max-tokens 48 --update-docs

Texts: the first --texts paragraphs of the held-out pydoc split (`pydoc_texts("validation")`) with at
least --max-tokens tokens, each cut to --max-tokens. Three settings are measured on them
(`analysis.experiments.causal.corpus_effects`): the original model, and the gates in adapter scope
`all` (the paper's: gates scale every kept branch) and `skipped` (the shipped default). Gates and skip
decisions at --skip; the exact harm of single forced skips (BOS's included) on the first --harm-texts
texts, --per-branch random positions per (layer, branch) each.

Writes, under --out-dir (docs/results/):
- docs/results/{model}_findings.csv: one row per (finding, scope), `analysis.experiments.findings.findings_table`;
- docs/results/{model}_bos_causal.csv: BOS against other tokens per setting and (layer, branch) (`bos_table`);
- docs/results/{model}_layer_causal.csv: per setting and (layer, branch), gate statistics beside rel_norm and harm
  (`causal.layer_effects`).
The measured cells are kept under --cache-dir (runs/findings/), so `--tables-only` rebuilds the
tables without the model. `--update-docs` rewrites the generated tables in docs/analysis.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.experiments.causal import corpus_effects, layer_effects  # noqa: E402
from analysis.experiments.findings import bos_table, findings_table  # noqa: E402
from gateskip_core import load_model  # noqa: E402
from gateskip_core.data import paragraphs, pydoc_texts  # noqa: E402

SETTINGS = {"original": ("none", "all"), "all": (None, "all"), "skipped": (None, "skipped")}


def heldout_texts(model, n_texts: int, max_tokens: int) -> list[str]:
    """The first `n_texts` held-out pydoc paragraphs with at least `max_tokens` tokens."""
    chosen = []
    for text in pydoc_texts("validation"):
        for paragraph in paragraphs(text):
            if len(model.tokenizer(paragraph).input_ids) >= max_tokens:
                chosen.append(paragraph)
            if len(chosen) == n_texts:
                return chosen
    raise SystemExit(f"only {len(chosen)} held-out paragraphs have {max_tokens} tokens; ask for fewer texts")


def measure(args: argparse.Namespace, cache: Path) -> dict[str, pd.DataFrame]:
    """The cells of every setting, measured now (and cached) or read from the cache."""
    cells = {}
    for setting, (gates, scope) in SETTINGS.items():
        path = cache / f"{args.model}-{setting}.parquet"
        if args.tables_only:
            cells[setting] = pd.read_parquet(path)
            continue
        model = load_model(args.model, gates=gates or args.gates)
        texts = heldout_texts(model, args.texts, args.max_tokens)
        start = time.time()
        table = corpus_effects(
            model,
            texts,
            max_tokens=args.max_tokens,
            skip=args.skip,
            per_branch=args.per_branch,
            harm_texts=args.harm_texts,
            include_bos=True,
            adapter_scope=scope,
            seed=args.seed,
            batch_size=args.batch_size,
            on_step=lambda done, total, name=setting: print(f"  {name}: text {done}/{total}", flush=True),
        )
        print(f"{setting}: {len(texts)} texts in {time.time() - start:.0f} s", flush=True)
        table.to_parquet(path)
        cells[setting] = table
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--gates", default="default")
    parser.add_argument("--texts", type=int, default=24, help="held-out paragraphs for the gate and norm statistics")
    parser.add_argument("--harm-texts", type=int, default=5, help="of which this many get forced-skip harm")
    parser.add_argument("--per-branch", type=int, default=1, help="random positions per (layer, branch) and text")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip", type=float, default=0.25, help="budget of the gate statistics")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "findings"))
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the cached cells")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the generated tables in docs/analysis.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out, cache = Path(args.out_dir), Path(args.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    cells = measure(args, cache)
    boot = dict(resamples=args.resamples, seed=args.seed)
    gated = {scope: cells[scope] for scope in ("all", "skipped")}
    findings = findings_table(gated, cells["original"], args.model, **boot)
    findings.to_csv(out / f"{args.model}_findings.csv", index=False)
    bos_table(cells, **boot).to_csv(out / f"{args.model}_bos_causal.csv", index=False)
    layers = [layer_effects(table, **boot).assign(setting=setting) for setting, table in cells.items()]
    pd.concat(layers, ignore_index=True).to_csv(out / f"{args.model}_layer_causal.csv", index=False)
    print(findings.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.update_docs:
        from analysis.experiments.findings_docs import update_analysis_page

        update_analysis_page(ROOT / "docs" / "analysis.md", out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
