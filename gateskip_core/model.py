"""`GatedModel`: the front door. A pretrained model, optional gates, and the calls users make.

    model = load_model("smollm2-135m-instruct", gates="default")
    trace = model.trace("The cat sat on the mat.", skip=0.25, policy="quantile")
    text, trace = model.generate("Tell me a joke.", max_new_tokens=32, skip=0.25, policy="calibrated")
    estimated = model.estimate(trace, skip=0.5)   # re-threshold captured gates, no model call

Everything that steers a call (`SkipArgs`: budget, allocation, policy, path, kv
mode, ...) is an argument of that call, declared once here. The only state kept
between calls is the model, the gates and a memo of calibrated thresholds (a
pure function of gates and budget). The walk itself is `execution.py`, cached
decoding `generation.py`, threshold fitting `calibration.py`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from typing_extensions import TypedDict, Unpack

from gateskip_core import validation
from gateskip_core.backbone.architecture import ArchSpec, arch_spec
from gateskip_core.backbone.quantisation import parse_weights, quantise_backbone
from gateskip_core.backbone.registry import DEFAULT_MODEL, REGISTRY, load_backbone
from gateskip_core.branches import BRANCHES
from gateskip_core.errors import GateSkipError
from gateskip_core.forward.cache import KVCache
from gateskip_core.forward.execution import Capture, ForwardResult, gated_forward
from gateskip_core.forward.generation import Generation, generate, with_generated_thresholds
from gateskip_core.forward.speculative import speculative_generate
from gateskip_core.gating.adapter import ADAPTED, LoraAdapter
from gateskip_core.gating.checkpoint import GateCheckpoint, load_gates
from gateskip_core.gating.fill import fill_flops
from gateskip_core.gating.gates import GateSet, parse_gate_variant
from gateskip_core.skipping.allocation import ALLOCATIONS, allocate_budget
from gateskip_core.skipping.calibration import Calibrator, fit_thresholds
from gateskip_core.skipping.estimate import estimate_trace
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import CalibratedPolicy, Forced, SkipBudget, SkipPolicy, resolve_policy
from gateskip_core.traces.compute import account_sequence, branch_saving_flops
from gateskip_core.traces.trace import SequenceTrace, Trace, applied_gates

SHIPPED_GATES_DIR = Path(__file__).parent / "shipped_gates"
# Gate specs that name a shipped file, and the file's suffix: {model}-{suffix}.safetensors
SHIPPED_GATES = {"default": "default", "default-v2": "default-v2", "default-scalar": "scalar"}
# Gate specs that shipped once and were retired (to keep the shipped files small): how to rebuild them.
RETIRED_GATES = {"default-v1": "bash scripts/train_shipped_gates.sh writes it to runs/"}


class SkipArgs(TypedDict, total=False):
    """The skip settings every call takes (see `GatedModel.make_plan`)."""

    skip: float | Sequence[float] | np.ndarray | SkipBudget | None
    policy: str | SkipPolicy
    path: str
    branches: str | Sequence[str]
    protect_bos: bool
    kv: str
    seed: int
    allocation: str
    forced: Sequence[Forced]
    adapter_scope: str


def shipped_gate_path(model_name: str, spec: str = "default") -> Path:
    """Where the shipped gates `spec` ('default', 'default-v2', 'default-scalar') for `model_name` live."""
    return SHIPPED_GATES_DIR / f"{model_name}-{SHIPPED_GATES[spec]}.safetensors"


def shipped_gate_specs(model_name: str) -> list[str]:
    """The shipped gate specs that exist for `model_name`."""
    return [spec for spec in SHIPPED_GATES if shipped_gate_path(model_name, spec).is_file()]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T], left padded
    attention_mask: torch.Tensor
    truncated: list[bool]


class GatedModel:
    """The user's model (`original`, never modified: the ungated reference), the backbone the
    gated walk runs (`backbone`: the original, or an adapted copy for gates that came with a
    full fine-tune), the gates, and a LoRA adapter they came with (`lora`: added per row on the
    original weights, never merged into a copy)."""

    def __init__(
        self,
        backbone,
        tokenizer,
        name: str,
        gates: GateSet | None = None,
        gates_label: str = "none",
        weights: str = "fp32",
    ):
        self.original = backbone
        self.weights = weights  # the backbone's projections: fp32, int8, int4 (backbone/quantisation.py)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.name = name
        self.spec: ArchSpec = arch_spec(backbone)
        self.original_spec: ArchSpec = self.spec
        self.gates: GateSet | None = None
        self.gates_label = "none"
        self.checkpoint: GateCheckpoint | None = None
        self.lora: LoraAdapter | None = None
        self._calibrator = Calibrator()
        self._lock = threading.Lock()
        if gates is not None:
            self.attach_gates(gates, gates_label)

    @property
    def device(self) -> torch.device:
        return next(self.original.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.original.parameters()).dtype

    # ---- gates
    def attach_gates(
        self, gates: GateSet, label: str = "custom", checkpoint: GateCheckpoint | None = None, merge: bool = False
    ) -> None:
        """Use `gates` (and the adapter and stand-ins `checkpoint` carries). `merge`: run a LoRA
        adapter merged into a copy of the weights instead of as per-row deltas (the other adapter
        form, for comparison: one dense call per projection, a second copy of every weight,
        adapter scope 'all' only)."""
        if gates.n_layers != self.spec.n_layers or gates.d_model != self.spec.d_model:
            raise GateSkipError(
                f"gates are for {gates.n_layers} layers and d={gates.d_model}; "
                f"{self.name} has {self.spec.n_layers} layers and d={self.spec.d_model}"
            )
        backbone, lora = self.original, None
        if merge and (checkpoint is None or checkpoint.adapter.kind != "lora"):
            raise GateSkipError("only a LoRA adapter can be merged; these gates have none")
        if checkpoint is not None and checkpoint.adapter.kind == "lora" and not merge:
            lora = LoraAdapter.from_checkpoint(
                self.original_spec.layers, checkpoint.adapter, checkpoint.adapter_tensors
            )
            lora.to(device=self.device, dtype=self.dtype)
        elif checkpoint is not None and checkpoint.adapter.kind != "none":  # full, or a LoRA adapter to merge
            backbone = ADAPTED.get(
                self.original, checkpoint.adapter, checkpoint.adapter_key(), checkpoint.adapter_tensors
            )
        if checkpoint is not None and checkpoint.adapter.kind != "none":
            form = " merged" if merge else ""
            label = f"{label} [{gates.variant_label} gates, {checkpoint.adapter.label} adapter{form}]"
        if checkpoint is not None and checkpoint.fill is not None:
            label = f"{label} [{checkpoint.fill_label} fill]"
            checkpoint.fill.to(device=self.device, dtype=self.dtype)
        gates.to(device=self.device, dtype=self.dtype)  # the walk feeds the gates the backbone's activations
        with self._lock:
            self.gates = gates
            self.gates_label = label
            self.checkpoint = checkpoint
            self.lora = lora
            if backbone is not self.backbone:
                self.backbone = backbone
                self.spec = arch_spec(backbone)
        self._calibrator.clear()

    @property
    def adapter(self) -> str:
        """The adaptation of the backbone the gates run on: 'none', 'lora:R' or 'full'."""
        return self.checkpoint.adapter.label if self.checkpoint is not None else "none"

    @property
    def adapter_scope(self) -> str:
        """The adapter scope the gates were trained for ('all' without a checkpoint): what 'auto' means."""
        return self.checkpoint.adapter_scope if self.checkpoint is not None else "all"

    @property
    def fill(self):
        """The stand-ins for skipped branches that came with the gates (None: the paper's zero)."""
        return self.checkpoint.fill if self.checkpoint is not None else None

    def view(self, gates: GateSet | None = None, label: str = "none", checkpoint: GateCheckpoint | None = None):
        """Another GatedModel over the user's original model (no copy) with other gates: safe to use
        concurrently with this one. `model.view()` is the ungated reference: the original model,
        without the gates' adapter."""
        other = GatedModel(self.original, self.tokenizer, self.name, weights=self.weights)
        if gates is not None:
            other.attach_gates(gates, label, checkpoint)
        return other

    def remove_gates(self) -> None:
        """Back to the original model: it was never modified."""
        with self._lock:
            self.gates = None
            self.gates_label = "none"
            self.checkpoint = None
            self.lora = None
            if self.backbone is not self.original:
                self.backbone = self.original
                self.spec = arch_spec(self.original)
        self._calibrator.clear()

    def load_gates(self, gates: str | Path) -> None:
        """'none', 'default' (the shipped gates), 'default-v2' (the previous default), 'default-scalar',
        'untrained[:variant]', or a file."""
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
        elif spec in RETIRED_GATES:
            raise GateSkipError(f"the gates '{spec}' no longer ship; {RETIRED_GATES[spec]}, then pass that file")
        else:
            ckpt = load_gates(spec, self.spec.fingerprint())
            self.attach_gates(ckpt.gates, Path(spec).name, ckpt)

    # ---- tokenisation
    @property
    def max_context(self) -> int:
        return int(getattr(self.backbone.config, "max_position_embeddings", 2048))

    def encode(self, texts: Sequence[str], chat: bool = False, max_tokens: int | None = None) -> Batch:
        """Token ids (BOS first), truncated to the context, left padded into one batch."""
        limit = (
            self.max_context
            if max_tokens is None
            else min(validation.whole_number("max_tokens", max_tokens), self.max_context)
        )
        rows, truncated = [], []
        for text in validation.texts(texts):
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
        # On the CPU: a batch is host data until a forward moves it to the model's device.
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device="cpu")
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device="cpu")
        return Batch(input_ids, mask, truncated)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # ---- skip settings
    def make_plan(
        self,
        skip: float | Sequence[float] | np.ndarray | SkipBudget | None = 0.0,
        policy: str | SkipPolicy = "quantile",
        path: str = "masked",
        branches: str | Sequence[str] = BRANCHES,
        protect_bos: bool = True,
        kv: str = "compute",
        seed: int = 0,
        allocation: str = "auto",
        forced: Sequence[Forced] = (),
        adapter_scope: str = "auto",
    ) -> SkipPlan:
        """The plan of one call: `skip` spread by `allocation` (see `budget`), a policy by name
        ('quantile', 'calibrated', 'random') or object, the execution path and kv mode, and where
        the gates' adapter applies: 'all' tokens, only tokens from their first 'skipped' branch on
        (with nothing skipped the model is then exactly the original), or 'auto' (what the gates
        were trained for)."""
        if adapter_scope == "auto":
            adapter_scope = self.adapter_scope
        if adapter_scope == "skipped" and self.adapter == "full":
            raise GateSkipError(
                "adapter scope 'skipped' needs a LoRA adapter (a full fine-tune also changes norms, embedding and head)"
            )
        if adapter_scope == "skipped" and self.adapter.startswith("lora") and self.lora is None:
            raise GateSkipError("a merged adapter runs adapter scope 'all' only; pass adapter_scope='all'")
        if isinstance(policy, CalibratedPolicy) and skip is None and policy.budget is not None:
            skip = policy.budget
        budget = self.budget(0.0 if skip is None else skip, branches, allocation)
        resolved = resolve_policy(policy, seed, lambda: self.calibrate(budget, protect_bos=protect_bos))
        if resolved.needs_gates and self.gates is None and not budget.is_zero():
            raise GateSkipError(f"policy {resolved.name!r} ranks tokens by their gates; load gates or use 'random'")
        forced = tuple(forced)
        for decision in forced:
            if not isinstance(decision, Forced):
                raise GateSkipError(f"forced decisions must be Forced(layer, branch, position, skip), got {decision!r}")
            decision.check(self.spec.n_layers, protect_bos)
        return SkipPlan(budget, resolved, path, kv, protect_bos, forced, adapter_scope)

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
        """Thresholds whose average skip rate on calibration text matches `budget`: the checkpoint's
        stored ones when it has them for this budget, else fitted on `texts` (default: the
        pydoc calibration split) and memoised."""
        if self.gates is None and not budget.is_zero():
            raise GateSkipError("policy 'calibrated' needs gates; load gates or use 'random'")
        return self._calibrator.policy(self, budget, protect_bos, texts)

    def calibrate_generated(self, budget: SkipBudget, protect_bos: bool = True) -> CalibratedPolicy | None:
        """Thresholds for generated tokens, fitted on decode steps of the model's own answers: the
        checkpoint's stored ones, else fitted on the prompts it records and memoised; None when the
        gates carry no decode calibration (see `calibration.Calibrator.generated_policy`)."""
        return self._calibrator.generated_policy(self, budget, protect_bos)

    def fit_thresholds(self, budget: SkipBudget, protect_bos: bool = True, texts=None) -> CalibratedPolicy:
        """Fit calibrated thresholds now (no checkpoint lookup, no memo)."""
        return fit_thresholds(self, budget, protect_bos, texts)

    # ---- calls
    def walk(
        self,
        input_ids,
        attention_mask,
        plan: SkipPlan,
        cache: KVCache | None = None,
        logits_for: str = "all",
        capture: Capture = Capture(),
    ) -> ForwardResult:
        """One gated pass with this model's gates, stand-ins and weights (gradients as the caller sets)."""
        return gated_forward(
            self.spec,
            self.gates,
            input_ids,
            attention_mask,
            plan,
            cache=cache,
            logits_for=logits_for,
            capture=capture,
            fill=self.fill,
            lora=self.lora,
        )

    def forward(
        self,
        input_ids,
        attention_mask,
        plan: SkipPlan,
        cache: KVCache | None = None,
        logits_for: str = "all",
        capture: Capture = Capture(),
    ) -> ForwardResult:
        """One gated pass without gradients, on the model's device."""
        device = self.device
        with torch.no_grad():
            return self.walk(
                input_ids.to(device),
                attention_mask.to(device),
                plan,
                cache=cache,
                logits_for=logits_for,
                capture=capture,
            )

    def trace(
        self,
        text_or_texts: str | Sequence[str],
        chat: bool = False,
        gate_vectors: bool = False,
        max_tokens: int | None = None,
        batch_size: int = 8,
        **skip_args: Unpack[SkipArgs],
    ) -> Trace:
        """Run the gated model over one text or a list; one `SequenceTrace` per text."""
        texts = validation.texts(text_or_texts)
        batch_size = validation.whole_number("batch_size", batch_size)
        plan = self.make_plan(**skip_args)
        sequences, notices, cut = [], [], []
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size], chat=chat, max_tokens=max_tokens)
            for i, was_cut in enumerate(batch.truncated):
                if was_cut:
                    limit = min(max_tokens or self.max_context, self.max_context)
                    notices.append(f"text {start + i} truncated to its first {limit} tokens")
                    cut.append(start + i)
            # A trace keeps decisions, not logits: only the last position's are computed (the
            # vocabulary projection of every position was a fifth of a SmolLM2 forward). The
            # compute account still describes a full pass that scores every position.
            result = self.forward(
                batch.input_ids,
                batch.attention_mask,
                plan,
                logits_for="last",
                capture=Capture(gate_vectors=gate_vectors),
            )
            sequences.extend(self.sequence_traces(batch.input_ids, batch.attention_mask, result, plan))
        return dataclasses.replace(self.make_trace(sequences, plan), notices=tuple(notices), truncated=tuple(cut))

    def trace_of(self, batch: Batch, result: ForwardResult, plan: SkipPlan) -> Trace:
        """The trace of a forward pass already run (when the caller also needs its logits)."""
        return self.make_trace(self.sequence_traces(batch.input_ids, batch.attention_mask, result, plan), plan)

    def estimate(self, captured: Trace, **skip_args: Unpack[SkipArgs]) -> Trace:
        """Estimate mode: the skip settings applied to `captured`'s gate values, no model call
        (later layers do not see the changed residuals; `trace` does)."""
        plan = self.make_plan(**skip_args)
        return estimate_trace(captured, plan, self.spec, self.gate_flops(), self.overheads(plan))

    def make_trace(self, sequences: list[SequenceTrace], plan: SkipPlan) -> Trace:
        return Trace(
            sequences=sequences,
            model=self.name,
            gates=self.gates_label + (" (adapter scope: skipped)" if plan.adapter_scope == "skipped" else ""),
            policy=plan.policy.name if plan.policy is not None else "none",
            skip_budget=np.asarray(plan.budget.fractions, dtype=np.float64),
            branches=plan.budget.branches,
            path=plan.path,
            kv=plan.kv,
            protect_bos=plan.protect_bos,
            adapter_scope=plan.adapter_scope,
            weights=self.weights,
        )

    def gate_flops(self) -> tuple[int, int]:
        """FLOPs per token of evaluating the (attention, MLP) gates: what the compute account charges."""
        if self.gates is None:
            return (0, 0)
        return (self.gates.flops_per_token("attn"), self.gates.flops_per_token("mlp"))

    def fill_flops(self) -> tuple[int, int]:
        """FLOPs per skipped token of the (attention, MLP) stand-ins: what the compute account charges."""
        return fill_flops(self.fill)

    def adapter_flops(self) -> tuple[int, int, int]:
        """FLOPs per adapted row and layer of the LoRA deltas (k + v, q + o, MLP): what the account charges."""
        return self.lora.flops_per_row(self.spec.layers) if self.lora is not None else (0, 0, 0)

    def overheads(self, plan: SkipPlan) -> dict:
        """What the compute account charges besides the branches, for `account_sequence`."""
        return dict(fill_flops=self.fill_flops(), adapter_flops=self.adapter_flops(), adapter_scope=plan.adapter_scope)

    def sequence_traces(
        self,
        input_ids,
        attention_mask,
        result: ForwardResult,
        plan: SkipPlan,
        prompt_lengths: Sequence[int] | None = None,
        lm_head_tokens: Sequence[int] | None = None,
    ) -> list[SequenceTrace]:
        """One `SequenceTrace` per row (padding dropped). `lm_head_tokens`: positions whose logits
        were computed (default: every position)."""
        gate, threshold = result.gate.cpu(), result.threshold.cpu()
        skipped_all, eligible = result.skipped.cpu(), result.eligible.cpu()
        vectors = None if result.gate_vectors is None else result.gate_vectors.cpu()
        out = []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool().cpu()
            ids = input_ids[b].cpu()[real].numpy()
            skipped = skipped_all[b][real].numpy()
            n_head = len(ids) if lm_head_tokens is None else lm_head_tokens[b]
            out.append(
                SequenceTrace(
                    token_ids=ids.astype(np.int64),
                    tokens=self.token_strings(ids),
                    gate=gate[b][real].numpy().astype(np.float32),
                    threshold=threshold[b][real].numpy().astype(np.float64),
                    skipped=skipped,
                    gate_applied=applied_gates(skipped, plan.adapter_scope, self.gates is not None),
                    eligible=eligible[b][real].numpy(),
                    compute=account_sequence(
                        self.spec,
                        skipped,
                        self.gate_flops(),
                        n_head,
                        plan.path,
                        kv_copy=plan.kv == "copy",
                        **self.overheads(plan),
                    ),
                    prompt_length=len(ids) if prompt_lengths is None else prompt_lengths[b],
                    gate_vectors=None if vectors is None else vectors[b][real].numpy(),
                )
            )
        return out

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        chat: bool = False,
        stop_at_eos: bool = True,
        draft_skip: float | None = None,
        draft_tokens: int | None = None,
        generated_thresholds: str = "auto",  # or 'prompt' (drafts keep the prompt's): generation.with_generated_thresholds
        **skip_args: Unpack[SkipArgs],
    ) -> Generation:
        """Generate with a KV cache under skipping (default policy: calibrated); returns the
        continuation(s) and a trace of all tokens.

        `draft_skip=B` turns on self-speculative decoding (greedy only): the gated model at
        budget B (the skip settings apply to it; default path physical) drafts `draft_tokens`
        (default 4) tokens, the ungated original checks them in one pass, and the output is the
        original's greedy output. The trace is then the original's (nothing skips) and
        `Generation.speculative` says what was drafted and accepted (see `forward/speculative.py`)."""
        prompts = validation.texts(prompt, "prompt")
        max_new_tokens = validation.whole_number("max_new_tokens", max_new_tokens)
        if do_sample:
            temperature = validation.positive_number("temperature", temperature)
            top_k = None if top_k is None else validation.whole_number("top_k", top_k)
        if draft_skip is not None or draft_tokens is not None:
            draft_tokens, plans = self._speculative_plans(draft_skip, draft_tokens, do_sample, skip_args)
        else:
            plan = self.make_plan(**{"policy": "calibrated", **skip_args})
        batch = self.encode(prompts, chat=chat)
        if draft_tokens is None:  # generated tokens decide with the gates' decode-fitted thresholds, if any
            plan = with_generated_thresholds(self, plan, generated_thresholds, skip_args, batch.attention_mask.sum(1))
        longest = int(batch.attention_mask.sum(1).max())
        if longest >= self.max_context or any(batch.truncated):
            raise GateSkipError(
                f"the prompt fills the model's context ({self.max_context} tokens); shorten it to generate"
            )
        notices = ()
        if longest + max_new_tokens > self.max_context:  # keep the prompt whole, generate what fits
            notices = (
                f"max_new_tokens={max_new_tokens} runs past the model's context of {self.max_context} tokens; "
                f"generating {self.max_context - longest}",
            )
            max_new_tokens = self.max_context - longest
        record = None
        if draft_tokens is not None:
            new_tokens, trace, record = speculative_generate(
                self, self.view(), batch, *plans, draft_tokens, max_new_tokens, stop_at_eos
            )
        else:
            new_tokens, trace = generate(
                self, batch, plan, max_new_tokens, do_sample, temperature, top_k, skip_args.get("seed", 0), stop_at_eos
            )
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
        text = texts[0] if isinstance(prompt, str) else texts
        return Generation(text, dataclasses.replace(trace, notices=notices), record)

    def _speculative_plans(
        self, draft_skip: float | None, draft_tokens: int | None, do_sample: bool, skip_args: dict
    ) -> tuple[int, tuple[SkipPlan, SkipPlan]]:
        """The draft count and the (draft, verifier) plans of a speculative call; one-line errors
        for the combinations it cannot honour."""
        if draft_skip is None:
            raise GateSkipError("draft_tokens needs draft_skip (the draft's skip budget)")
        if do_sample:
            raise GateSkipError("speculative decoding is greedy only; drop do_sample or draft_skip")
        if skip_args.get("skip") not in (None, 0, 0.0):
            raise GateSkipError(
                "with draft_skip the output is the original's; set the draft's budget with draft_skip, not skip"
            )
        draft_tokens = validation.whole_number("draft_tokens", 4 if draft_tokens is None else draft_tokens)
        if skip_args.get("policy") == "quantile":
            raise GateSkipError(
                "the draft needs a policy that decides token by token (calibrated or random); "
                "quantile ranks against the cache's history, which holds the original's tokens"
            )
        args = {"policy": "calibrated", "path": "physical", **skip_args, "skip": draft_skip}
        draft = self.make_plan(**args)
        verifier = SkipPlan(self.budget(0.0, allocation="uniform"), None, protect_bos=draft.protect_bos)
        return draft_tokens, (draft, verifier)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    gates: str | Path = "none",
    progress=lambda msg: None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    weights: str = "fp32",
) -> GatedModel:
    """Load a registry model, checkpoint directory or hub id on `device` in `dtype`, and attach gates.

    gates: 'none', 'default' (the shipped trained gates, adapter and stand-ins), 'default-v2', 'default-scalar',
    'untrained[:vector|scalar|mlp|lowrank:R]' (freshly initialised), or a .safetensors path.
    weights: 'fp32' (as loaded), 'int8' or 'int4' (weight-only quantisation of every projection by
    optimum-quanto, run as its dequantised weights), 'int8:quanto' / 'int4:quanto' (quanto's own
    modules and kernels). The gates, adapter and stand-ins stay float (`backbone/quantisation.py`).
    """
    device, dtype, spec = resolve_device(device), resolve_dtype(dtype), parse_weights(weights)
    backbone, tokenizer, name = load_backbone(name_or_path, progress)
    if spec.quantised and not spec.kernels:  # quantise the float32 weights once (cached), then cast
        quantise_backbone(backbone, spec, cache_key=_weight_cache_key(name))
    backbone.to(device=device, dtype=dtype)
    if spec.kernels:  # quanto's modules quantise on the device, from the weights in `dtype`
        quantise_backbone(backbone, spec)
    model = GatedModel(backbone, tokenizer, name, weights=spec.label)
    model.load_gates(gates)
    return model


def _weight_cache_key(name: str) -> str | None:
    """Registry models converted from a GGUF keep their quantised weights cached (tiny models are built, not cached)."""
    entry = REGISTRY.get(name)
    return name if entry is not None and entry.build is None else None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'mps' -> a device that exists here (one-line error otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GateSkipError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise GateSkipError(f"device {device!r} is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GateSkipError("device 'mps' is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise GateSkipError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
