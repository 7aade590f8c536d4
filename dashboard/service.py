"""What the dashboard asks of the library, without any Streamlit code.

- `ModelHub`: each backbone is loaded once per process and shared by every
  browser session; sessions get their own `GatedModel.view` with their gates.
- `explore`: one exact run (the gated model with the skips applied) and the
  prompt's quality against the ungated model.
- `estimate`: re-threshold captured gate values (no model call).
- `compare_decisions`: where estimate and exact decisions differ.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gateskip_core import GatedModel, GateSkipError, Trace, load_gates, load_model
from gateskip_core.model import shipped_gate_specs

MAX_PROMPT_TOKENS = 512
EXAMPLE_PROMPTS = {
    "Python prose": "A list comprehension consists of brackets containing an expression followed by a for clause, "
    "then zero or more for or if clauses. The result is a new list.",
    "Story": "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories "
    "to anyone who would listen.",
    "Arithmetic": "Question: Tom has 3 apples and buys 5 more. How many apples does he have? Answer: 8.",
    "Chat: explain": "Explain in two sentences why the sky is blue.",
}


class ModelHub:
    """Process-wide model cache; loading is serialised, use is concurrent."""

    def __init__(self) -> None:
        self._models: dict[str, GatedModel] = {}
        self._lock = threading.Lock()

    def base(self, name: str, progress=lambda msg: None) -> GatedModel:
        with self._lock:
            if name not in self._models:
                self._models[name] = load_model(name, progress=progress)
            return self._models[name]

    def view(self, name: str, gates: str, uploaded: bytes | None = None) -> GatedModel:
        """The shared backbone with the chosen gates attached (cache the result per choice)."""
        base = self.base(name)
        view = base.view()
        if gates == "upload":
            if uploaded is None:
                raise GateSkipError("choose a .safetensors gate file to upload")
            ckpt = gates_from_bytes(uploaded, base)
            view.attach_gates(ckpt.gates, "uploaded", ckpt)
        else:
            view.load_gates(gates)
        return view


def gates_from_bytes(data: bytes, model: GatedModel):
    """Validate an uploaded gate checkpoint against `model` (one-line GateSkipError on any problem)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "uploaded.safetensors"
        path.write_bytes(data)
        return load_gates(path, model.spec.fingerprint())


def gate_choices(model_name: str) -> list[str]:
    """Gate options for a model: shipped ones first when they exist."""
    return shipped_gate_specs(model_name) + ["untrained", "untrained:scalar", "none", "upload"]


@dataclass(frozen=True)
class Settings:
    """Everything the sidebar chose: the model view and the skip settings of every call."""

    model_name: str
    view: GatedModel
    mode: str  # estimate | exact
    budget: float | list[float]
    branches: str
    policy: str
    protect_bos: bool
    seed: int
    allocation: str
    adapter_scope: str = "auto"  # auto | all | skipped

    def skip_args(self, view: GatedModel | None = None) -> dict:
        """The `SkipArgs` of a call on `view` (default: the sidebar's view)."""
        view = view or self.view
        return dict(
            skip=self.budget,
            policy=policy_for(view, self.policy),
            branches=self.branches,
            protect_bos=self.protect_bos,
            seed=self.seed,
            allocation=self.allocation if view.gates is not None else "uniform",
            adapter_scope=self.adapter_scope,
        )


def settings_for(settings: Settings, model_name: str, view: GatedModel) -> Settings:
    """The sidebar's settings for another model's view: per-layer budgets become their mean (the
    other model has its own layers), everything else carries over."""
    import dataclasses

    budget = settings.budget
    if not isinstance(budget, (int, float)) and model_name != settings.model_name:
        budget = float(np.mean(budget))
    return dataclasses.replace(settings, model_name=model_name, view=view, budget=budget)


def policy_for(view: GatedModel, policy: str) -> str:
    """The one fallback rule: without gates every gate counts as 1.0, so only random skipping can choose."""
    return policy if view.gates is not None else "random"


@dataclass
class PromptQuality:
    kl_to_full: float  # mean over positions of KL(ungated || skipped)
    top1_agreement: float


def prompt_quality(model: GatedModel, batch, gated_logits: torch.Tensor) -> PromptQuality:
    """KL and top-1 agreement of the gated run's logits against the ungated model on the same tokens."""
    full = model.view().forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0))
    lp_full = F.log_softmax(full.logits[0].float(), -1)
    lp = F.log_softmax(gated_logits[0].float(), -1)
    kl = float((lp_full.exp() * (lp_full - lp)).sum(-1).mean())
    agree = float((lp.argmax(-1) == lp_full.argmax(-1)).float().mean())
    return PromptQuality(kl, agree)


@dataclass
class Continuations:
    ungated: list[str]
    skipping: list[str]
    first_divergence: int | None  # index of the first differing token, None if identical


def continuations(model: GatedModel, text: str, chat: bool, n_new: int, **skip_kwargs) -> Continuations:
    plain = model.view().generate(text, max_new_tokens=n_new, skip=0.0, chat=chat)
    skipping = model.generate(text, max_new_tokens=n_new, chat=chat, **skip_kwargs)
    a = plain.trace.extra["generated_token_ids"][0]
    b = skipping.trace.extra["generated_token_ids"][0]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return Continuations(model.token_strings(a), model.token_strings(b), first)


def capture(model: GatedModel, text: str, chat: bool, adapter_scope: str = "auto") -> tuple[Trace, bool]:
    """The prompt's gate values with nothing skipped (the basis of estimate mode), and whether it was cut."""
    batch = model.encode([text], chat=chat, max_tokens=MAX_PROMPT_TOKENS)
    plan = model.make_plan(0.0, adapter_scope=adapter_scope)
    trace = model.trace_of(batch, model.forward(batch.input_ids, batch.attention_mask, plan), plan)
    return trace, bool(batch.truncated[0])


def estimate(model: GatedModel, captured: Trace, settings: Settings) -> Trace:
    """Estimate-mode trace: the policy applied to the captured gates, no forward pass."""
    return model.estimate(captured, **settings.skip_args(model))


def exact(model: GatedModel, text: str, chat: bool, settings: Settings) -> tuple[Trace, PromptQuality, float]:
    """Exact-mode trace (later layers see the changed residuals), prompt quality and seconds taken."""
    start = time.perf_counter()
    plan = model.make_plan(**settings.skip_args(model))
    batch = model.encode([text], chat=chat, max_tokens=MAX_PROMPT_TOKENS)
    result = model.forward(batch.input_ids, batch.attention_mask, plan)  # one gated pass: trace and logits
    trace = model.trace_of(batch, result, plan)
    quality = prompt_quality(model, batch, result.logits)
    return trace, quality, time.perf_counter() - start


def lens(model: GatedModel, text: str, settings: Settings):
    """The logit lens of the exact gated run of `text`: a `LensGrid` and its settled table."""
    from analysis.logit_lens import grid_counts, logit_lens, settled_table

    grid = logit_lens(model, text, max_tokens=MAX_PROMPT_TOKENS, **settings.skip_args(model))
    return grid, settled_table(grid_counts(grid))


def compare_decisions(estimated: Trace, exact_trace: Trace) -> np.ndarray:
    """[T, L, 2] bool: cells where estimate and exact decisions differ."""
    return estimated.sequences[0].skipped != exact_trace.sequences[0].skipped


def prompt_blocks(model: GatedModel, text: str) -> torch.Tensor:
    batch = model.encode([text], max_tokens=MAX_PROMPT_TOKENS)
    return batch.input_ids


def attribution(model: GatedModel, text: str, chat: bool, settings: Settings, layer: int, branch: str):
    """Gate attribution of one (layer, branch) for every position, in the exact run of these settings."""
    from analysis.attribution import gate_attributions

    return gate_attributions(
        model, text, layer, branch, max_tokens=MAX_PROMPT_TOKENS, chat=chat, **settings.skip_args(model)
    )


def attention_sources(
    model: GatedModel, text: str, chat: bool, settings: Settings, layer: int, branch: str, position: int, source: int
):
    """The term of attention layer `source` in the gate at (position, layer, branch), by source token."""
    from analysis.attribution import attention_sources as split

    return split(
        model,
        text,
        layer,
        branch,
        position,
        source,
        max_tokens=MAX_PROMPT_TOKENS,
        chat=chat,
        **settings.skip_args(model),
    )


def why(model: GatedModel, text: str, n_entries: int, skip_fraction: float, on_step=None):
    """Exact harm of `n_entries` single skips on `text` and the signal comparison: (entries, signals)."""
    from analysis.faithfulness import faithfulness

    return faithfulness(
        model,
        text,
        n_exact=n_entries,
        max_tokens=MAX_PROMPT_TOKENS,
        skip_fraction=skip_fraction,
        show_progress=False,
        on_step=on_step,
    )


# ---- corpus
def corpus_db(path: str):
    """A DuckDB view of a trace dataset (or trace file); each session opens its own connection."""
    from analysis.tracedb import TraceDB

    if not str(path).strip():
        raise GateSkipError("enter the path of a trace dataset folder (or a .parquet / .csv trace file)")
    return TraceDB(Path(str(path).strip()).expanduser())


def collect_corpus(model: GatedModel, text: str, name: str, folder: Path, on_progress=None, **skip_args) -> Path:
    """Trace an uploaded text (paragraphs split on blank lines) into a dataset folder."""
    from analysis.dataset import collect_dataset
    from gateskip_core.data import paragraphs

    paras = paragraphs(text)
    if not paras:
        raise GateSkipError(f"{name} holds no text")
    collect_dataset(
        model,
        [(name, paras)],
        folder,
        max_tokens=128,
        shard_size=64,
        show_progress=False,
        log=lambda msg: None,
        on_progress=on_progress,
        **skip_args,
    )
    return folder


def corpus_folder(settings: Settings, digest: str) -> Path:
    """Where a dataset collected in the dashboard goes: one folder per (model, gates, text, settings)."""
    import hashlib
    import json
    import os

    root = Path(os.environ.get("GATESKIP_CACHE", Path.home() / ".cache" / "gateskip")) / "datasets"
    key = json.dumps([settings.model_name, settings.view.gates_label, digest, settings.skip_args()], default=repr)
    return root / f"{settings.model_name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
