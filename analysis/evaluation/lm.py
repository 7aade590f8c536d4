"""`gateskip`: our gated model as an lm-evaluation-harness model, with one skip plan per run.

`GateSkipLM` is lm-eval's own `HFLM` with the model call and the generation loop replaced by
the gated walk, so every convention that decides a task's numbers is HFLM's, unchanged:
tokenisation with `add_bos_token` (True here, as the GateSkip reference code builds HFLM),
context truncation from the left, the request order and batching, the one-token-continuation
logits cache, rolling windows, stop sequences and the chat template. At budget 0 in adapter
scope `skipped` the gated walk is the original model, so its numbers are `hf`'s (tested).

Two things HFLM does not need and we do, and one it does not do:
- a mask for the right-padded rows of a loglikelihood batch: HFLM calls the model without one
  (padding after a causal row changes nothing), but the quantile policy ranks a row's eligible
  tokens and must not count its padding. The row lengths are planned from the same `Collator`
  HFLM batches with, and checked against every batch;
- logits only where HFLM reads them: the LM head runs on each row's continuation positions, not
  on every position (on Gemma-3's 262k-word vocabulary the head was most of a forward). The
  planned rows carry each continuation's length; the result equals the all-positions one (tested);
- the compute account, summed over every request: `account` (dense and skipping FLOPs, gates
  charged) and the skipped fraction.

From lm-eval's command line: `lm_eval --model gateskip --model_args
pretrained=smollm2-135m-instruct,gates=default,skip=0.2 --tasks ...` (after `import analysis.evaluation.lm`,
which `gateskip eval` does).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator

from gateskip_core import GatedModel, GateSkipError, SkipPlan, load_model
from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.forward.execution import Capture
from gateskip_core.forward.generation import generate
from gateskip_core.model import Batch
from gateskip_core.traces.compute import ComputeAccount, account_sequence


@dataclass
class EvalAccount:
    """The compute account of every sequence a run scored or generated (one process's share)."""

    compute: ComputeAccount = field(default_factory=lambda: ComputeAccount(0.0, 0.0, 0.0, 0.0, 0))
    skipped_cells: int = 0  # (token, layer, branch) cells that skipped
    cells: int = 0  # (token, layer, branch) cells of real tokens
    sequences: int = 0

    def add_rows(self, model: GatedModel, plan: SkipPlan, skipped: torch.Tensor, real: torch.Tensor) -> None:
        """Rows of one forward: `skipped` [B, T, L, 2], `real` [B, T]. The LM head is charged at every
        real position, as `hf` runs it and as traces count a pass (`GateSkipLM` computes it only where
        HFLM reads it; the same on both sides of the account, so this only makes the saving smaller)."""
        skipped, real = skipped.cpu(), real.bool().cpu()
        for b in range(skipped.shape[0]):
            row = skipped[b][real[b]].numpy()
            self.add_sequence(model, plan, row, lm_head_tokens=row.shape[0])

    def add_sequence(self, model: GatedModel, plan: SkipPlan, skipped: np.ndarray, lm_head_tokens: int) -> None:
        # "physical": what executing these decisions saves, as `gateskip sweep` counts it
        self.compute = self.compute + account_sequence(
            model.spec,
            skipped,
            model.gate_flops(),
            lm_head_tokens,
            "physical",
            kv_copy=plan.kv == "copy",
            **model.overheads(plan),
        )
        self.skipped_cells += int(skipped.sum())
        self.cells += int(skipped.size)
        self.sequences += 1

    @property
    def net_flops_saved(self) -> float:
        return self.compute.net_saved_fraction

    @property
    def gross_flops_saved(self) -> float:
        """The skips alone, the gates' own cost not charged (what ShortGPT is matched to)."""
        dense, skipping = self.compute.dense_flops, self.compute.skipping_flops - self.compute.gate_flops
        return 1.0 - skipping / dense if dense else 0.0

    @property
    def skipped_fraction(self) -> float:
        return self.skipped_cells / self.cells if self.cells else 0.0

    def totals(self) -> np.ndarray:
        c = self.compute
        return np.array(
            [c.dense_flops, c.skipping_flops, c.executed_flops, c.gate_flops, c.tokens]
            + [self.skipped_cells, self.cells, self.sequences],
            dtype=np.float64,
        )

    @classmethod
    def from_totals(cls, totals: np.ndarray) -> EvalAccount:
        *flops, tokens, skipped, cells, sequences = totals.tolist()
        return cls(ComputeAccount(*flops, int(tokens)), int(skipped), int(cells), int(sequences))


@dataclass(frozen=True)
class ScoredRow:
    """One row of a loglikelihood batch: its length (context + continuation, the last token
    dropped) and how many of its last positions HFLM scores (the continuation's tokens)."""

    length: int
    continuation: int


@register_model("gateskip")
class GateSkipLM(HFLM):
    """An lm-eval model running `model` (a `GatedModel`, or a registry name loaded with `gates`)
    under one skip plan: `plan`, or the one `make_plan` builds from the skip arguments."""

    def __init__(
        self,
        pretrained: str | GatedModel = DEFAULT_MODEL,
        gates: str = "default",
        plan: SkipPlan | None = None,
        skip: float = 0.0,
        policy: str = "quantile",
        path: str = "masked",
        branches: str = "both",
        allocation: str = "auto",
        adapter_scope: str = "auto",
        protect_bos: bool = True,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        weights: str = "fp32",
        batch_size: int | str = 1,
        add_bos_token: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> None:
        if str(batch_size).startswith("auto"):
            raise GateSkipError("batch size 'auto' is not supported by the gateskip model; give a number")
        # lm-eval bootstraps the perplexity stderr in a forked multiprocessing pool; forking a process whose
        # torch threads hold locks can leave the child waiting forever (seen: `gateskip eval` stuck after
        # "bootstrapping for stddev"). Its documented switch keeps the bootstrap in this process (~1 s for 60 items at
        # lm-eval's 100,000 draws, on a busy core).
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        if isinstance(pretrained, GatedModel):
            model = pretrained
        else:
            model = load_model(pretrained, gates, device=_usable_device(device), dtype=dtype, weights=weights)
        self.gated = model
        self.seed = seed
        self.plan = plan or model.make_plan(
            skip,
            policy,
            path=path,
            branches=branches,
            protect_bos=protect_bos,
            seed=seed,
            allocation=allocation,
            adapter_scope=adapter_scope,
        )
        super().__init__(
            pretrained=model.original,
            tokenizer=model.tokenizer,
            batch_size=int(batch_size),
            add_bos_token=add_bos_token,
            max_length=max_length,
            **kwargs,
        )
        self._join_launch()
        self.account = EvalAccount()
        self._planned_rows: deque[list[ScoredRow]] = deque()

    def _join_launch(self) -> None:
        """Under `accelerate launch` (more than one process): take this process's share of the
        requests, as HFLM does for a model it loads itself (it assumes one process for a model
        passed in)."""
        from accelerate import Accelerator

        from analysis.experiments.collect import process_state

        state = process_state()
        if state.num_processes > 1:
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self._rank, self._world_size = state.process_index, state.num_processes

    # ---- loglikelihood: HFLM's loop, with our model call
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        self._planned_rows = deque(self._planned_batches(requests))
        results = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if self._planned_rows:
            raise RuntimeError("lm-eval's batching no longer matches the planned rows")
        return results

    def _planned_batches(self, requests) -> list[list[ScoredRow]]:
        """Every row of every batch HFLM's `_loglikelihood_tokens` will build, in order: the same
        Collator (sort and context grouping) and the same left truncation."""

        def sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        collator = Collator(
            requests,
            sort_fn=sort_key,
            group_by="contexts" if self.backend == "causal" and self.logits_cache else None,
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        limit = self.max_length + 1
        return [
            [ScoredRow(len((ctx + cont)[-limit:][:-1]), len(cont)) for _, ctx, cont in chunk]
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None)
        ]

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            raise GateSkipError("the gateskip model is a decoder-only (causal) model")
        if not self._planned_rows:  # a call from outside `_loglikelihood_tokens`: every position
            rows = [ScoredRow(inps.shape[1], inps.shape[1])] * inps.shape[0]
        else:
            rows = self._planned_rows.popleft()
        lengths = [row.length for row in rows]
        if len(rows) != inps.shape[0] or max(lengths) != inps.shape[1]:
            raise RuntimeError(f"batch of shape {tuple(inps.shape)} does not match the planned rows {lengths}")
        mask = (torch.arange(inps.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
        # The walk's own head runs on one position per row; ours on the rows HFLM scores.
        result = self.gated.forward(inps, mask, self.plan, logits_for="last", capture=Capture(hidden_states=True))
        self.account.add_rows(self.gated, self.plan, result.skipped, mask)
        return self._scored_logits(result.hidden_states[-1], rows).to(inps.device)

    def _scored_logits(self, final_hidden: torch.Tensor, rows: list[ScoredRow]) -> torch.Tensor:
        """Logits [B, W, V] of the last W positions of the batch, W = the fewest that hold every
        row's continuation, computed only where a continuation is (zero elsewhere: never read).

        HFLM reads row b's continuation at `[inplen + W - T - contlen, inplen + W - T)` of what the
        model call returns (`_select_cont_toks`), so the last W positions are all it needs. On
        Gemma-3 (a 262k-word vocabulary) the head over every position was most of a forward."""
        T, device = final_hidden.shape[1], final_hidden.device
        width = max(T - row.length + row.continuation for row in rows)
        batch_index = torch.cat([torch.full((row.continuation,), b, device=device) for b, row in enumerate(rows)])
        position = torch.cat([torch.arange(row.length - row.continuation, row.length, device=device) for row in rows])
        logits = self.gated.spec.logits(final_hidden[batch_index, position])
        out = logits.new_zeros((len(rows), width, logits.shape[-1]))
        out[batch_index, position + width - T] = logits
        return out

    # ---- generation: our cached decoding under the plan
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        mask = generation_kwargs.pop("attention_mask", None)
        mask = torch.ones_like(context) if mask is None else mask
        temperature = float(generation_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = bool(generation_kwargs.get("do_sample", False)) and temperature > 0
        batch = Batch(context.cpu(), mask.cpu(), [False] * context.shape[0])
        new_tokens, trace = generate(
            self.gated,
            batch,
            self.plan,
            max_new_tokens=max(1, max_length - context.shape[1]),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            seed=self.seed,
            stop=_stop_check(self.tokenizer, stop),
        )
        for sequence in trace.sequences:
            self.account.add_sequence(self.gated, self.plan, sequence.skipped, sequence.compute.tokens)
        width = max(len(t) for t in new_tokens)
        pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.pad_token_id
        rows = [t + [pad] * (width - len(t)) for t in new_tokens]
        return torch.cat([context.cpu(), torch.tensor(rows, dtype=torch.long).reshape(len(rows), width)], 1)

    def get_model_info(self) -> dict:
        return {
            "model": self.gated.name,
            "gates": self.gated.gates_label,
            "skip_budget": self.plan.budget.describe(),
            "policy": self.plan.policy.name if self.plan.policy is not None else "none",
            "adapter_scope": self.plan.adapter_scope,
        }

    # ---- the account of the whole run
    def gathered_account(self) -> EvalAccount:
        """The account summed over every process of the run (this process's alone without a launcher)."""
        totals = torch.tensor(self.account.totals())
        if self.world_size > 1:
            totals = self.accelerator.reduce(totals.to(self.device), reduction="sum").cpu()
        return EvalAccount.from_totals(totals.numpy())


def _usable_device(device: str) -> str:
    """HFLM's rule for the device lm-eval's command line passes (`cuda:0` unless told otherwise): a
    CUDA device on a machine without CUDA means the CPU."""
    return "cpu" if str(device).startswith("cuda") and not torch.cuda.is_available() else device


def _stop_check(tokenizer, stop: list[str]):
    """A generation stops once its decoded new text holds a stop sequence (HF's stopping criteria)."""
    stops = [s for s in stop if s]

    def reached(new_tokens: list[int]) -> bool:
        text = tokenizer.decode(new_tokens, skip_special_tokens=False)
        return any(s in text for s in stops)

    return reached
