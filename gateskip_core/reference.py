"""How a run's next-token distributions compare with a reference run's (the original model's, or a
teacher's): the KL divergence to the reference and top-1 agreement, per position.

Every quality figure the project reports (sweeps, chat fidelity, the dashboard's prompt quality,
forced-skip harm, the allocation's sensitivities, the training objective) goes through these two
functions, so that "KL to the reference" means one thing everywhere: KL(reference || run), summed
over the vocabulary, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities in float32 (the precision every comparison is made in)."""
    return F.log_softmax(logits.float(), -1)


def kl_to_reference(reference_log_probs: torch.Tensor, run_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || run) per position: sum over the vocabulary (last axis) of
    p_ref * (log p_ref - log p_run). Callers sum or average over positions as their figure needs."""
    return (reference_log_probs.exp() * (reference_log_probs - run_log_probs)).sum(-1)


def top1_agreement(reference_log_probs: torch.Tensor, run_log_probs: torch.Tensor) -> torch.Tensor:
    """Per position, 1.0 where the run's most likely next token is the reference's, else 0.0."""
    return (run_log_probs.argmax(-1) == reference_log_probs.argmax(-1)).float()
