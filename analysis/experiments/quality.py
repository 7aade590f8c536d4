"""Quality of a gated model against its ungated self, on held-out text.

`evaluate` runs one skip plan over fixed token blocks and reports perplexity,
KL divergence to the ungated model's next-token distribution, top-1 agreement
with it, the skipped fraction and the net FLOPs saved (gate cost included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gateskip_core import GatedModel, GateSkipError, SkipPlan, account_sequence
from gateskip_core.branches import skipped_fraction
from gateskip_core.data import first_blocks, pydoc_texts
from gateskip_core.reference import kl_to_reference, log_probs, top1_agreement
from gateskip_core.validation import whole_number


@dataclass(frozen=True)
class Reference:
    """The ungated model's log-probabilities on the evaluation blocks (computed once)."""

    blocks: torch.Tensor  # [N, T]
    log_probs: list[torch.Tensor]  # per batch [b, T-1, V]
    batch_size: int


def evaluation_blocks(
    model: GatedModel, texts: Sequence[str] | None = None, n_blocks: int = 8, seq_len: int = 128
) -> torch.Tensor:
    """Fixed token blocks of held-out text (default: the pydoc validation split)."""
    n_blocks = whole_number("n_blocks", n_blocks)
    seq_len = whole_number("seq_len", seq_len, minimum=2)
    texts = list(texts) if texts is not None else pydoc_texts("validation")
    return first_blocks(model.tokenizer, texts, seq_len, n_blocks)


def reference(model: GatedModel, blocks: torch.Tensor, batch_size: int = 4) -> Reference:
    """Run the original (ungated, unadapted) model once; every evaluation compares against it."""
    reference_log_probs = []
    blocks = blocks.to(model.device)  # token ids are host data until here; every evaluation reads them there
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            logits = model.original(input_ids=blocks[i : i + batch_size]).logits[:, :-1].float()
            reference_log_probs.append(log_probs(logits))
    return Reference(blocks, reference_log_probs, batch_size)


def evaluate(model: GatedModel, ref: Reference, plan: SkipPlan) -> dict[str, float]:
    """ppl, kl_to_full, top1_agreement, skipped_fraction, flops_saved (net, gates charged) of one plan."""
    nll = kl = agree = count = 0.0
    skipped = eligible = 0
    dense = executed = gate_cost = 0.0
    gate_flops = model.gate_flops()
    for i, ref_lp in enumerate(ref.log_probs):
        ids = ref.blocks[i * ref.batch_size : (i + 1) * ref.batch_size]
        out = model.forward(ids, torch.ones_like(ids), plan)
        lp = log_probs(out.logits[:, :-1])
        target = ids[:, 1:]
        nll += float(-lp.gather(-1, target[..., None]).sum())
        kl += float(kl_to_reference(ref_lp, lp).sum())
        agree += float(top1_agreement(ref_lp, lp).sum())
        count += target.numel()
        skipped += int(out.skipped.sum())
        eligible += int(out.eligible.sum())
        for b in range(ids.shape[0]):
            acc = account_sequence(
                model.spec,
                out.skipped[b].cpu().numpy(),
                gate_flops,
                ids.shape[1],
                "physical",
                kv_copy=plan.kv == "copy",
                **model.overheads(plan),
            )
            dense += acc.dense_flops
            executed += acc.skipping_flops
            gate_cost += acc.gate_flops
    return {
        "ppl": float(np.exp(nll / count)),
        "kl_to_full": kl / count,
        "top1_agreement": agree / count,
        "skipped_fraction": skipped_fraction(skipped, eligible, model.spec.n_layers),
        "flops_saved": 1.0 - executed / dense,
        "flops_saved_gross": 1.0 - (executed - gate_cost) / dense,  # the skips alone, gates not charged
        "tokens": int(count),
    }


def quality_table(
    model: GatedModel,
    gate_sets: dict[str, str],
    budgets: Sequence[float],
    blocks: torch.Tensor,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Rows per (gates, policy, budget): the issue's quality evidence table.

    `gate_sets` maps a label to a gates spec for `GatedModel.load_gates`; each is
    evaluated with the quantile policy, and the first also with random skipping.
    """
    for spec in gate_sets.values():  # a bad gate spec fails here, before any progress bar
        model.load_gates(spec)
    ref = reference(model, blocks)
    rows = []
    model.remove_gates()
    rows.append(
        {"gates": "ungated", "policy": "none", "skip_budget": 0.0, **evaluate(model, ref, model.make_plan(0.0))}
    )
    jobs = [(label, spec, "quantile", b) for label, spec in gate_sets.items() for b in budgets]
    first = next(iter(gate_sets))
    jobs += [(first, gate_sets[first], "random", b) for b in budgets]
    current = None
    for label, spec, policy, budget in tqdm(jobs, disable=not show_progress, desc="quality"):
        if spec != current:
            model.load_gates(spec)
            current = spec
        plan = model.make_plan(budget, policy)
        rows.append(
            {
                "gates": label if policy != "random" else "random skipping",
                "policy": policy,
                "skip_budget": budget,
                **evaluate(model, ref, plan),
            }
        )
    return pd.DataFrame(rows)


# Chat prompts used by no training, calibration or example: the chat-fidelity check's held-out set.
HELDOUT_CHAT_PROMPTS = [
    "What is the difference between a virus and a bacterium?",
    "Write a limerick about a forgetful cat.",
    "How do noise-cancelling headphones work?",
    "Give me three ideas for a rainy Sunday afternoon.",
    "Explain what inflation means for my savings.",
    "Why do leaves change colour in the autumn?",
    "Write a thank-you note to a neighbour who watered my plants.",
    "What are the rules of tic-tac-toe?",
    "How can I make my bread rise better?",
    "Describe a lighthouse to someone who has never seen one.",
    "What is a prime number? Give two examples.",
    "Suggest a short stretching routine for office workers.",
    "Why is the ocean salty?",
    "Explain how a refrigerator keeps food cold.",
    "Write two sentences that open a mystery novel.",
    "What should I consider when adopting a dog?",
    "How does a compass find north?",
    "Summarise the story of Cinderella in three sentences.",
    "What is the purpose of a bibliography?",
    "Give tips for staying focused while studying.",
]


def chat_fidelity(
    model: GatedModel,
    budgets: Sequence[float] = (0.0, 0.25, 0.5),
    policies: Sequence[str] = ("quantile", "calibrated"),
    prompts: Sequence[str] = HELDOUT_CHAT_PROMPTS,
    max_new_tokens: int = 64,
    show_progress: bool = True,
    adapter_scope: str = "auto",
) -> pd.DataFrame:
    """Teacher-forced fidelity on the original model's own chat answers: the original answers each
    held-out prompt (greedy), then the gated model reads prompt + answer and is scored on the answer's
    positions (KL to the original's next-token distribution, top-1 agreement). One row per (policy, budget)."""
    if not model.tokenizer.chat_template:
        raise GateSkipError(f"{model.name} has no chat template")
    original = model.view()
    answers = original.generate(list(prompts), max_new_tokens=max_new_tokens, chat=True, skip=0.0)
    sequences = [(s.token_ids, s.prompt_length) for s in answers.trace.sequences if s.n_tokens > s.prompt_length + 1]
    inputs = [torch.as_tensor(np.asarray(ids))[None] for ids, _ in sequences]
    refs = [log_probs(original.forward(i, torch.ones_like(i), original.make_plan(0.0)).logits) for i in inputs]
    rows = []
    jobs = [(p, b) for p in policies for b in budgets]
    for policy, budget in tqdm(jobs, disable=not show_progress, desc="chat fidelity"):
        plan = model.make_plan(budget, policy, adapter_scope=adapter_scope)
        kl = agree = count = 0.0
        skipped = eligible = 0
        for ids_t, ref, (_, n_prompt) in zip(inputs, refs, sequences):
            out = model.forward(ids_t, torch.ones_like(ids_t), plan)
            lp = log_probs(out.logits)
            answer = slice(n_prompt - 1, ids_t.shape[1] - 1)  # positions that predict the answer's tokens
            kl += float(kl_to_reference(ref[0, answer], lp[0, answer]).sum())
            agree += float(top1_agreement(ref[0, answer], lp[0, answer]).sum())
            count += answer.stop - answer.start
            skipped += int(out.skipped.sum())
            eligible += int(out.eligible.sum())
        rows.append(
            {
                "policy": policy,
                "skip_budget": budget,
                "kl_to_full": kl / count,
                "top1_agreement": agree / count,
                "skipped_fraction": skipped_fraction(skipped, eligible, model.spec.n_layers),
                "answer_tokens": int(count),
                "answers": len(sequences),
            }
        )
    return pd.DataFrame(rows)
