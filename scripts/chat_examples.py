"""Chat continuations (greedy, 48 new tokens), ungated original vs shipped default gates at the dashboard's default budget, per policy.

python3 scripts/chat_examples.py [--gates default] [--skip 0.25] [--policies quantile,calibrated] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateskip_core import load_model
from gateskip_core.files import atomic_write

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for sleeping better.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short, friendly message inviting a colleague to lunch.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gates", default="default")
    parser.add_argument("--skip", type=float, default=0.25)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--policies", default="quantile,calibrated", help="the dashboard's default first")
    parser.add_argument("--out", default="docs/chat_examples.md")
    args = parser.parse_args()
    model = load_model(gates=args.gates)
    original = model.view()
    lines = [f"# Chat continuations: original vs {model.gates_label}, budget {args.skip:g}", ""]
    for prompt in PROMPTS:
        plain = original.generate(prompt, max_new_tokens=args.new_tokens, chat=True)
        lines += [f"## {prompt}", "", f"- original: {plain.text.strip()!r}"]
        for policy in args.policies.split(","):
            gated = model.generate(prompt, max_new_tokens=args.new_tokens, chat=True, skip=args.skip, policy=policy)
            seq = gated.trace.sequences[0]
            prompt_rate = seq.skipped[: seq.prompt_length].mean()
            new_rate = seq.skipped[seq.prompt_length :].mean() if seq.n_tokens > seq.prompt_length else 0.0
            lines += [
                f"- {policy}: {gated.text.strip()!r}",
                f"  (skipped branch fraction: prompt {prompt_rate:.1%}, generated {new_rate:.1%}; "
                f"net FLOPs saved over the call {seq.compute.net_saved_fraction:+.1%}"
                + (f"; thresholds: {sets}" if (sets := gated.skip_rates().thresholds) else "")
                + ")",
            ]
        lines.append("")
    text = "\n".join(lines)
    atomic_write(Path(args.out), lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
