"""`GatedModel`: a pretrained backbone, optional gates, and the calls users make.

    model = load_model("smollm2-135m-instruct", gates="default")
    trace = model.trace("The cat sat on the mat.", skip=0.25, policy="quantile")
    text, trace = model.generate("Tell me a joke.", max_new_tokens=32, skip=0.25, policy="calibrated")

Everything that steers a call (budget, policy, path, kv mode) is an argument of
that call. The only state kept between calls is the backbone, the gates and a
memo of calibrated thresholds (a pure function of gates and budget).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .architecture import ArchSpec, arch_spec
from .checkpoint import GateCheckpoint, load_gates
from .compute import account_sequence
from .data import first_blocks, pydoc_texts
from .errors import GateSkipError
from .execution import ForwardResult, KVCache, SkipPlan, gated_forward
from .adapter import ADAPTED
from .compute import branch_saving_flops
from .gates import BRANCHES, GateSet, parse_gate_variant
from .allocation import ALLOCATIONS, allocate_budget
from .policies import (
    POLICY_NAMES,
    BranchInput,
    CalibratedPolicy,
    Decision,
    QuantilePolicy,
    RandomPolicy,
    SkipBudget,
    SkipPolicy,
)
from .registry import DEFAULT_MODEL, load_backbone
from .trace import SequenceTrace, Trace

SHIPPED_GATES_DIR = Path(__file__).parent / "shipped_gates"
# Gate specs that name a shipped file, and the file's suffix: {model}-{suffix}.safetensors
SHIPPED_GATES = {"default": "default", "default-scalar": "scalar"}
CALIBRATION_BUDGETS = np.round(np.arange(0.05, 0.6001, 0.05), 2)


def shipped_gate_path(model_name: str, spec: str = "default") -> Path:
    """Where the shipped gates `spec` ('default', 'default-scalar') for `model_name` live."""
    return SHIPPED_GATES_DIR / f"{model_name}-{SHIPPED_GATES[spec]}.safetensors"


def shipped_gate_specs(model_name: str) -> list[str]:
    """The shipped gate specs that exist for `model_name`."""
    return [spec for spec in SHIPPED_GATES if shipped_gate_path(model_name, spec).is_file()]


class Generation(NamedTuple):
    text: str | list[str]  # the generated continuation(s), prompt excluded
    trace: Trace  # prompt and generated tokens


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T], left padded
    attention_mask: torch.Tensor
    truncated: list[bool]


TIE_TOLERANCE = 1e-6


def _threshold_between(sorted_values: torch.Tensor, k: int) -> float:
    """A threshold that skips the k smallest values, placed midway to the next distinct value.

    Placing it on an observed value would make decisions flip on rounding noise:
    at layer 0 a gate depends only on the token id, so calibration text contains
    exact copies of most tokens' importances.
    """
    if k <= 0:
        return -math.inf
    low = float(sorted_values[k - 1])
    above = sorted_values[sorted_values > low + TIE_TOLERANCE]
    high = float(above[0]) if above.numel() else low + 2 * TIE_TOLERANCE
    return (low + high) / 2


class _ThresholdFitter(SkipPolicy):
    """Fits calibrated thresholds in one pass: each branch takes the budget's quantile over
    all eligible calibration tokens, given the decisions already made in earlier layers."""

    name = "calibrating"

    def __init__(self, n_layers: int):
        self.thresholds = np.full((n_layers, 2), -math.inf)

    def decide(self, inp: BranchInput) -> Decision:
        values = torch.sort(inp.importance[inp.eligible].double()).values
        k = int(math.floor(inp.budget * values.numel() + 1e-9))
        thr = _threshold_between(values, k)
        self.thresholds[inp.layer, BRANCHES.index(inp.branch)] = thr
        threshold = torch.full_like(inp.importance, thr)
        return Decision(skip=inp.eligible & (inp.importance <= threshold), threshold=threshold)


class GatedModel:
    """The user's model (`original`, never modified: the ungated reference), the backbone the
    gated walk runs (`backbone`: the original, or an adapted copy when the gates came with an
    adapter) and the gates."""

    def __init__(self, backbone, tokenizer, name: str, gates: GateSet | None = None, gates_label: str = "none"):
        self.original = backbone
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.name = name
        self.spec: ArchSpec = arch_spec(backbone)
        self.gates: GateSet | None = None
        self.gates_label = "none"
        self.checkpoint: GateCheckpoint | None = None
        self._calibration_memo: dict[tuple, CalibratedPolicy] = {}
        self._lock = threading.Lock()
        if gates is not None:
            self.attach_gates(gates, gates_label)

    # ---- gates
    def attach_gates(self, gates: GateSet, label: str = "custom", checkpoint: GateCheckpoint | None = None) -> None:
        if gates.n_layers != self.spec.n_layers or gates.d_model != self.spec.d_model:
            raise GateSkipError(
                f"gates are for {gates.n_layers} layers and d={gates.d_model}; "
                f"{self.name} has {self.spec.n_layers} layers and d={self.spec.d_model}"
            )
        backbone = self.original
        if checkpoint is not None and checkpoint.adapter.kind != "none":
            backbone = ADAPTED.get(self.original, checkpoint.adapter, checkpoint.adapter_key(), checkpoint.adapter_tensors)
            label = f"{label} [{gates.variant_label} gates, {checkpoint.adapter.label} adapter]"
        with self._lock:
            self.gates = gates
            self.gates_label = label
            self.checkpoint = checkpoint
            if backbone is not self.backbone:
                self.backbone = backbone
                self.spec = arch_spec(backbone)
            self._calibration_memo.clear()

    @property
    def adapter(self) -> str:
        """The adaptation of the backbone the gates run on: 'none', 'lora:R' or 'full'."""
        return self.checkpoint.adapter.label if self.checkpoint is not None else "none"

    def view(self, gates: GateSet | None = None, label: str = "none", checkpoint: GateCheckpoint | None = None):
        """Another GatedModel over the user's original model (no copy) with other gates: safe to use
        concurrently with this one. `model.view()` is the ungated reference: the original model,
        without the gates' adapter."""
        other = GatedModel(self.original, self.tokenizer, self.name)
        if gates is not None:
            other.attach_gates(gates, label, checkpoint)
        return other

    def remove_gates(self) -> None:
        """Back to the original model: it was never modified."""
        with self._lock:
            self.gates = None
            self.gates_label = "none"
            self.checkpoint = None
            if self.backbone is not self.original:
                self.backbone = self.original
                self.spec = arch_spec(self.original)
            self._calibration_memo.clear()

    def load_gates(self, gates: str | Path) -> None:
        """'none', 'default' (shipped vector gates), 'default-scalar', 'untrained[:variant]', or a file."""
        spec = str(gates)
        if spec == "none":
            self.remove_gates()
        elif spec.startswith("untrained"):
            variant, rank = parse_gate_variant(spec.partition(":")[2] or "vector")
            torch.manual_seed(0)
            gates = GateSet(self.spec.n_layers, self.spec.d_model, variant, rank=rank)
            self.attach_gates(gates, f"untrained {gates.variant_label}")
        elif spec in SHIPPED_GATES:
            path = shipped_gate_path(self.name, spec)
            if not path.is_file():
                raise GateSkipError(f"no trained gates '{spec}' ship for {self.name}; train some with `gateskip train`")
            ckpt = load_gates(path, self.spec.fingerprint())
            self.attach_gates(ckpt.gates, f"shipped {spec}", ckpt)
        else:
            ckpt = load_gates(spec, self.spec.fingerprint())
            self.attach_gates(ckpt.gates, Path(spec).name, ckpt)

    # ---- tokenisation
    @property
    def max_context(self) -> int:
        return int(getattr(self.backbone.config, "max_position_embeddings", 2048))

    def encode(self, texts: Sequence[str], chat: bool = False, max_tokens: int | None = None) -> Batch:
        """Token ids (BOS first), truncated to the context, left padded into one batch."""
        limit = min(max_tokens or self.max_context, self.max_context)
        rows, truncated = [], []
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise GateSkipError("text is empty")
            if chat:
                if not self.tokenizer.chat_template:
                    raise GateSkipError(f"{self.name} has no chat template; use plain text")
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
                ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            else:
                ids = self.tokenizer(text, add_special_tokens=True).input_ids
                bos = self.tokenizer.bos_token_id
                if bos is not None and (not ids or ids[0] != bos):
                    ids = [bos] + ids
            truncated.append(len(ids) > limit)
            rows.append(ids[:limit])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return Batch(input_ids, mask, truncated)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # ---- policies
    def make_plan(
        self,
        skip: float | Sequence[float] | np.ndarray | SkipBudget | None = 0.0,
        policy: str | SkipPolicy = "quantile",
        path: str = "masked",
        branches: str | Sequence[str] = BRANCHES,
        protect_bos: bool = True,
        kv: str = "compute",
        seed: int = 0,
        capture_gate_vectors: bool = False,
        allocation: str = "auto",
    ) -> SkipPlan:
        if isinstance(policy, CalibratedPolicy) and skip is None and policy.budget is not None:
            skip = policy.budget
        budget = self.budget(0.0 if skip is None else skip, branches, allocation)
        if isinstance(policy, SkipPolicy):
            resolved = policy
        elif policy == "quantile":
            resolved = QuantilePolicy()
        elif policy == "random":
            resolved = RandomPolicy(seed=seed)
        elif policy == "calibrated" and budget.is_zero():
            resolved = CalibratedPolicy(thresholds=np.full((self.spec.n_layers, 2), -math.inf), budget=budget)
        elif policy == "calibrated":
            resolved = self.calibrate(budget, protect_bos=protect_bos)
        else:
            raise GateSkipError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        if resolved.needs_gates and self.gates is None and not budget.is_zero():
            raise GateSkipError(f"policy {resolved.name!r} ranks tokens by their gates; load gates or use 'random'")
        return SkipPlan(budget, resolved, path, kv, protect_bos, capture_gate_vectors)

    def budget(
        self,
        skip: float | Sequence[float] | np.ndarray | SkipBudget,
        branches: str | Sequence[str] = BRANCHES,
        allocation: str = "auto",
    ) -> SkipBudget:
        """The per-(layer, branch) table for `skip`.

        A single number is spread by `allocation`: 'uniform' (the paper's rule: the same
        fraction everywhere), 'global' (one compute budget spent unevenly across layers
        and branches, see `policies.allocate_budget`, with the sensitivity profile stored
        in the gate checkpoint), or 'auto' (global when the gates carry a profile).
        Per-layer lists and tables are used as given.
        """
        if allocation not in (*ALLOCATIONS, "auto"):
            raise GateSkipError(f"allocation must be one of {', '.join(ALLOCATIONS)} or auto, got {allocation!r}")
        sensitivity = self.checkpoint.sensitivity if self.checkpoint is not None else None
        if allocation == "auto":
            allocation = "global" if sensitivity is not None else "uniform"
        if allocation == "uniform" or isinstance(skip, SkipBudget) or np.ndim(skip) != 0:
            return SkipBudget.make(skip, self.spec.n_layers, branches)
        if sensitivity is None:
            raise GateSkipError("allocation 'global' needs gates trained with a sensitivity profile; use 'uniform'")
        total = float(SkipBudget.make(skip, self.spec.n_layers).fractions[0, 0])  # validates the number
        table = allocate_budget(total, sensitivity, branch_saving_flops(self.spec), branches)
        return SkipBudget.make(table, self.spec.n_layers, branches, total=total)

    def calibrate(
        self, budget: SkipBudget, protect_bos: bool = True, texts: Sequence[str] | None = None
    ) -> CalibratedPolicy:
        """Thresholds whose average skip rate on calibration text matches `budget`.

        Uses the checkpoint's stored thresholds when it has them for this budget
        (uniform, both branches, protected BOS); otherwise fits them on the
        built-in calibration split of the pydoc text (memoised per budget).
        """
        if self.gates is None:
            raise GateSkipError("policy 'calibrated' needs gates; load gates or use 'random'")
        ckpt = self.checkpoint
        if texts is None and ckpt is not None and budget.branches == BRANCHES and protect_bos:
            if budget.total is not None:  # a global allocation of `total`
                stored, total = ckpt.global_thresholds, budget.total
            else:
                stored, total = ckpt.calibration_thresholds, budget.fractions[0, 0] if budget.is_uniform() else None
            hits = np.flatnonzero(np.isclose(ckpt.calibration_budgets, total)) if total is not None else []
            if len(hits) and len(stored):
                return CalibratedPolicy(thresholds=stored[hits[0]], budget=budget)
        key = (budget.fractions.tobytes(), budget.branches, protect_bos, None if texts is None else tuple(texts))
        with self._lock:
            memo = self._calibration_memo.get(key)
        if memo is not None:
            return memo
        fitted = self.fit_thresholds(budget, protect_bos, texts)
        with self._lock:
            self._calibration_memo[key] = fitted
        return fitted

    def fit_thresholds(
        self, budget: SkipBudget, protect_bos: bool = True, texts: Sequence[str] | None = None,
        n_blocks: int = 8, seq_len: int = 128,
    ) -> CalibratedPolicy:  # fmt: skip
        texts = list(texts) if texts is not None else pydoc_texts("calibration")
        input_ids = first_blocks(self.tokenizer, texts, seq_len, n_blocks)
        fitter = _ThresholdFitter(self.spec.n_layers)
        plan = SkipPlan(budget, fitter, "masked", "compute", protect_bos)
        self.forward(input_ids, torch.ones_like(input_ids), plan)
        return CalibratedPolicy(thresholds=fitter.thresholds, budget=budget)

    # ---- calls
    def forward(self, input_ids, attention_mask, plan: SkipPlan, cache: KVCache | None = None, **kw) -> ForwardResult:
        with torch.no_grad():
            return gated_forward(self.spec, self.gates, input_ids, attention_mask, plan, cache=cache, **kw)

    def trace(
        self,
        text_or_texts: str | Sequence[str],
        skip: float | Sequence[float] | np.ndarray | SkipBudget | None = 0.0,
        policy: str | SkipPolicy = "quantile",
        path: str = "masked",
        branches: str | Sequence[str] = BRANCHES,
        protect_bos: bool = True,
        kv: str = "compute",
        seed: int = 0,
        chat: bool = False,
        gate_vectors: bool = False,
        max_tokens: int | None = None,
        batch_size: int = 8,
    ) -> Trace:
        """Run the gated model over one text or a list; one `SequenceTrace` per text."""
        texts = [text_or_texts] if isinstance(text_or_texts, str) else list(text_or_texts)
        if not texts:
            raise GateSkipError("no text given")
        plan = self.make_plan(skip, policy, path, branches, protect_bos, kv, seed, gate_vectors)
        sequences = []
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size], chat=chat, max_tokens=max_tokens)
            for i, was_cut in enumerate(batch.truncated):
                if was_cut:
                    limit = min(max_tokens or self.max_context, self.max_context)
                    warnings.warn(f"text {start + i} truncated to its first {limit} tokens", stacklevel=2)
            result = self.forward(batch.input_ids, batch.attention_mask, plan)
            sequences.extend(self.trace_of(batch, result, plan).sequences)
        return self._make_trace(sequences, plan)

    def trace_of(self, batch: Batch, result: ForwardResult, plan: SkipPlan) -> Trace:
        """The trace of a forward pass already run (when the caller also needs its logits)."""
        sequences = self._sequence_traces(batch.input_ids, batch.attention_mask, result, plan, "all")
        return self._make_trace(sequences, plan)

    def _make_trace(self, sequences: list[SequenceTrace], plan: SkipPlan) -> Trace:
        return Trace(
            sequences=sequences,
            model=self.name,
            gates=self.gates_label,
            policy=plan.policy.name if plan.policy is not None else "none",
            skip_budget=np.asarray(plan.budget.fractions, dtype=np.float64),
            branches=plan.budget.branches,
            path=plan.path,
            kv=plan.kv,
            protect_bos=plan.protect_bos,
        )

    def _gate_flops(self) -> tuple[int, int]:
        if self.gates is None:
            return (0, 0)
        return (self.gates.flops_per_token("attn"), self.gates.flops_per_token("mlp"))

    def _sequence_traces(self, input_ids, attention_mask, result: ForwardResult, plan: SkipPlan, logits_for: str,
                         prompt_lengths: Sequence[int] | None = None, lm_head_tokens: Sequence[int] | None = None):  # fmt: skip
        out = []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            ids = input_ids[b][real].numpy()
            skipped = result.skipped[b][real].numpy()
            n_head = len(ids) if logits_for == "all" else 1
            if lm_head_tokens is not None:
                n_head = lm_head_tokens[b]
            out.append(
                SequenceTrace(
                    token_ids=ids.astype(np.int64),
                    tokens=self.token_strings(ids),
                    gate=result.importance[b][real].numpy().astype(np.float32),
                    threshold=result.threshold[b][real].numpy().astype(np.float64),
                    skipped=skipped,
                    eligible=result.eligible[b][real].numpy(),
                    compute=account_sequence(
                        self.spec, skipped, self._gate_flops(), n_head, plan.path, kv_copy=plan.kv == "copy"
                    ),
                    prompt_length=len(ids) if prompt_lengths is None else prompt_lengths[b],
                    gate_vectors=None if result.gate_vectors is None else result.gate_vectors[b][real].numpy(),
                )
            )
        return out

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 32,
        skip: float | Sequence[float] | np.ndarray | SkipBudget | None = 0.0,
        policy: str | SkipPolicy = "calibrated",
        path: str = "masked",
        branches: str | Sequence[str] = BRANCHES,
        protect_bos: bool = True,
        kv: str = "compute",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        chat: bool = False,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Generate with a KV cache under skipping; returns the continuation(s) and a trace of all tokens."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if max_new_tokens < 1:
            raise GateSkipError("max_new_tokens must be at least 1")
        if do_sample and temperature <= 0:
            raise GateSkipError("temperature must be positive when sampling")
        plan = self.make_plan(skip, policy, path, branches, protect_bos, kv, seed)
        batch = self.encode(prompts, chat=chat, max_tokens=self.max_context - max_new_tokens)
        rng = torch.Generator().manual_seed(seed)
        cache = KVCache()
        B = len(prompts)
        all_ids, all_mask = [batch.input_ids], [batch.attention_mask]
        results = []
        result = self.forward(batch.input_ids, batch.attention_mask, plan, cache=cache, logits_for="last")
        results.append(result)
        done = torch.zeros(B, dtype=torch.bool)
        new_tokens: list[list[int]] = [[] for _ in range(B)]
        heads = [1] * B
        for step in range(max_new_tokens):
            logits = result.logits[:, -1].float()
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=rng).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            for b in range(B):
                if not done[b]:
                    new_tokens[b].append(int(nxt[b]))
                    if stop_at_eos and int(nxt[b]) == self.tokenizer.eos_token_id:
                        done[b] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            # Finished sequences feed padding (masked out) so the batch stays aligned.
            feed = torch.where(done, torch.full_like(nxt, self.tokenizer.pad_token_id), nxt)[:, None]
            mask = (~done).long()[:, None]
            for b in range(B):
                heads[b] += int(mask[b, 0])
            all_ids.append(feed)
            all_mask.append(mask)
            result = self.forward(feed, mask, plan, cache=cache, logits_for="last")
            results.append(result)
        merged = ForwardResult(
            logits=torch.empty(0),
            importance=torch.cat([r.importance for r in results], 1),
            threshold=torch.cat([r.threshold for r in results], 1),
            skipped=torch.cat([r.skipped for r in results], 1),
            eligible=torch.cat([r.eligible for r in results], 1),
            positions=torch.cat([r.positions for r in results], 1),
            gate_values=None,
            gate_vectors=None,
        )
        ids, mask = torch.cat(all_ids, 1), torch.cat(all_mask, 1)
        prompt_lengths = batch.attention_mask.sum(1).tolist()
        sequences = self._sequence_traces(ids, mask, merged, plan, "last", prompt_lengths, heads)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
        trace = self._make_trace(sequences, plan)
        trace.extra["generated_token_ids"] = new_tokens
        return Generation(texts[0] if isinstance(prompt, str) else texts, trace)


def load_model(name_or_path: str = DEFAULT_MODEL, gates: str | Path = "none", progress=lambda msg: None) -> GatedModel:
    """Load a registry model, checkpoint directory or hub id, and attach gates.

    gates: 'none', 'default' (the shipped trained vector gates), 'default-scalar',
    'untrained[:vector|scalar|mlp]' (freshly initialised), or a .safetensors path.
    """
    backbone, tokenizer, name = load_backbone(name_or_path, progress)
    model = GatedModel(backbone, tokenizer, name)
    model.load_gates(gates)
    return model
