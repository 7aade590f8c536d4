"""What gate training minimises: the task loss (cross-entropy, or KL to the original model), the gates'
sparsity and, optionally, a ranking loss toward each skip's cost (see `loop.py`'s docstring)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gateskip_core.backbone.architecture import arch_spec
from gateskip_core.branches import branch_evaluations
from gateskip_core.forward.execution import Capture, gated_forward
from gateskip_core.gating.adapter import LoraAdapter
from gateskip_core.gating.fill import SkipFill
from gateskip_core.gating.gates import GateSet
from gateskip_core.reference import kl_to_reference
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import QuantilePolicy, SkipBudget

RANK_TARGETS = ("residual", "first-order")  # what the ranking loss orders tokens by


class ObjectiveConfig(Protocol):
    """What the objective reads of a run's settings (`loop.TrainConfig` has these and more)."""

    adapter_scope: str
    skip_gradient: str
    rank_weight: float
    rank_target: str
    bf16: bool
    distill: bool
    teacher_top_k: int
    sparsity_loss: str
    sparsity_weight: float


class GateObjective(nn.Module):
    """Loss of one batch; a module so that Accelerate can wrap it for data parallelism.

    `student` is the backbone the walk runs: the original itself, frozen, with a LoRA adapter
    (`lora`, trainable, added per row by the walk), or a trainable copy for a full fine-tune; the
    original model is also the frozen teacher, kept out of the registered modules. With
    `teacher_top_k`, the teacher's top-k log-probs of each training block are computed the
    first time the block is used and reused after (a block is seen once per epoch).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        gates: GateSet,
        fill: SkipFill | None,
        config: ObjectiveConfig,
        lora: LoraAdapter | None = None,
    ):
        super().__init__()
        self.gates = gates
        self.fill = fill
        self.lora = lora
        self.backbone = student  # registered so that its trainable weights train and DDP syncs them
        self.backbone_dtype = next(student.parameters()).dtype
        self.spec = arch_spec(student)
        self._teacher = (teacher,)  # a tuple: not a submodule, never trained
        self._teacher_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.config = config

    def teacher_log_probs(self, input_ids: torch.Tensor, rows: torch.Tensor | None):
        """The teacher's next-token log-probs [B, T-1, V], or (top-k indices, log-probs) when cached."""
        k = self.config.teacher_top_k
        with torch.no_grad():
            if rows is None or not k:
                return F.log_softmax(self._teacher[0](input_ids=input_ids).logits[:, :-1].float(), -1)
            missing = [i for i, r in enumerate(rows.tolist()) if r not in self._teacher_cache]
            if missing:
                logits = self._teacher[0](input_ids=input_ids[missing]).logits[:, :-1].float()
                top = F.log_softmax(logits, -1).topk(k, -1)
                for j, i in enumerate(missing):
                    self._teacher_cache[int(rows[i])] = (top.indices[j].to(torch.int32), top.values[j])
        cached = [self._teacher_cache[int(r)] for r in rows.tolist()]
        return torch.stack([c[0] for c in cached]).long(), torch.stack([c[1] for c in cached]).float()

    def forward(self, input_ids: torch.Tensor, budget: np.ndarray, rows: torch.Tensor | None = None):
        spec, cfg = self.spec, self.config
        plan = SkipPlan(
            SkipBudget.make(budget, spec.n_layers),
            QuantilePolicy(),
            "masked",
            adapter_scope=cfg.adapter_scope,
            skip_gradient=cfg.skip_gradient,
        )
        mask = torch.ones_like(input_ids)
        # The first-order target needs the task gradient: validation (no grad) leaves the ranking term out.
        ranked = cfg.rank_weight > 0 and (cfg.rank_target == "residual" or torch.is_grad_enabled())
        first_order = ranked and cfg.rank_target == "first-order"
        # Autocast on the device the batch is on (a CPU autocast would leave a GPU's passes in float32). A
        # backbone stored in bfloat16 / float16 runs under it too, so the float32 gates meet its activations.
        stored = self.backbone_dtype
        low = torch.bfloat16 if stored == torch.float32 else stored
        with torch.autocast(input_ids.device.type, dtype=low, enabled=cfg.bf16 or stored != torch.float32):
            out = gated_forward(
                spec,
                self.gates,
                input_ids,
                mask,
                plan,
                capture=Capture(
                    gate_values=True,
                    skip_change=ranked and cfg.rank_target == "residual",
                    branch_deltas=first_order,
                    skip_direction=first_order,
                ),
                fill=self.fill,
                lora=self.lora,
            )
            teacher = self.teacher_log_probs(input_ids, rows) if cfg.distill else None
        log_probs = F.log_softmax(out.logits[:, :-1].float(), -1)
        if teacher is None:
            task = F.nll_loss(log_probs.flatten(0, 1), input_ids[:, 1:].flatten())
        elif isinstance(teacher, tuple):  # top-k KL with the student's exact normaliser
            # KL over the top k tokens plus one bucket for the rest of the vocabulary (so it is >= 0).
            index, teacher_lp = teacher
            student_lp = log_probs.gather(-1, index)
            teacher_p = teacher_lp.exp()
            tail_t = (1 - teacher_p.sum(-1)).clamp(min=1e-6)
            tail_s = (1 - student_lp.exp().sum(-1)).clamp(min=1e-6)
            task = ((teacher_p * (teacher_lp - student_lp)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())).mean()
        else:
            task = kl_to_reference(teacher, log_probs).mean()
        per_branch = [
            (g.float().pow(2) if cfg.sparsity_loss == "l2" else g.float().abs()).mean() for g in out.gate_values
        ]
        sparsity = torch.stack(per_branch).mean()
        eligible = branch_evaluations(out.eligible.sum(), spec.n_layers)
        skip_rate = out.skipped.sum() / eligible.clamp(min=1)
        loss = task + cfg.sparsity_weight * sparsity
        if ranked:
            targets = first_order_costs(task, out.branch_deltas, out.skip_direction) if first_order else out.skip_change
            loss = loss + cfg.rank_weight * ranking_loss(out.gate_values, targets, out.eligible)
        return loss, task.detach(), sparsity.detach(), skip_rate


def first_order_costs(
    task: torch.Tensor, deltas: list[torch.Tensor], directions: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per (layer, branch) [B, T]: |dL/dh . (branch - stand-in)|, the first-order change of the task
    loss if the token skipped the branch (or, skipped, ran it): dL/dh is the gradient at the residual
    right after the branch adds (= at what it added), taken without touching any parameter's grad."""
    grads = torch.autograd.grad(task, deltas, retain_graph=True)
    return [(g.float() * d.float()).sum(-1).abs().detach() for g, d in zip(grads, directions, strict=True)]


def ranking_loss(gate_values: list[torch.Tensor], targets: list[torch.Tensor], eligible: torch.Tensor) -> torch.Tensor:
    """Pairwise logistic ranking loss: within each (sequence, branch), for every pair of eligible
    tokens, softplus(-(s_i - s_j)) where token i's target is the larger, s = logit(mean gate).
    0 when every pair is ordered with a wide margin; log 2 per pair for gates that cannot tell."""
    gate = torch.stack([g.float().mean(-1) for g in gate_values], 1).clamp(1e-6, 1 - 1e-6)  # [B, 2L, T]
    score = torch.logit(gate)
    target = torch.stack(targets, 1).float()  # [B, 2L, T]
    pair = eligible[:, None, :, None] & eligible[:, None, None, :]  # [B, 1, T, T]
    order = torch.sign(target[..., :, None] - target[..., None, :])  # +1 where i should rank above j
    weight = pair & (order != 0)
    per_pair = F.softplus(-order * (score[..., :, None] - score[..., None, :]))
    return (per_pair * weight).sum() / weight.sum().clamp(min=1)
